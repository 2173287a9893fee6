"""to_toml(cfg) loads back to the same Config (source fields and warnings aside)."""

import dataclasses
import os
import shutil
import tomllib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hastore.config import load, to_toml
from hastore.config.common import default_timing, make_link
from hastore.config.model import (
    Auth, AuthAlgorithm, AuthKey, AutoFailback, Config, Group, LinkKind, Logging, PingGroup, Resource,
    Respawn, Stonith,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "config"


def comparable(cfg: Config) -> Config:
    groups = tuple(dataclasses.replace(g, source="") for g in cfg.groups)
    return dataclasses.replace(cfg, source="", warnings=(), groups=groups)


def reload(cfg: Config, tmp_path: Path) -> Config:
    path = tmp_path / "converted.toml"
    path.write_text(to_toml(cfg))
    os.chmod(path, 0o600)
    return load(str(path), node=cfg.node, allow_insecure_auth=False)


def test_legacy_directory_round_trips(tmp_path):
    dev = tmp_path / "ttyS0"
    dev.write_text("")
    src = tmp_path / "ha.d"
    src.mkdir()
    (src / "ha.cf").write_text(
        "keepalive 500ms\ndeadtime 5\nwarntime 2\ninitdead 30\nudpport 6942\nbcast eth0 eth1\n"
        "mcast eth2 239.9.9.9 6943 3 1\nucast eth3 10.0.0.2\nucast eth3 10.0.0.1\n"
        f"serial {dev}\nbaud 38400\nnode a b\nauto_failback legacy\nping 10.0.0.254 gw.example\n"
        "ping_group routers 10.0.0.1 10.0.0.2\nrespawn hacluster /usr/lib/heartbeat/ipfail\n"
        "watchdog /dev/watchdog\nlogfacility daemon\ndebugfile /var/log/ha-debug\nuse_logd on\n"
        "autojoin none\nstonith baytech /etc/st.cfg\nstonith_host b rps10 /dev/ttyS1 a 0\ncompression bz2\n")
    (src / "authkeys").write_bytes(b"auth 2\n1 md5 caf\xe9 \"quoted\" \\ back\n2 sha256 plain\n")
    os.chmod(src / "authkeys", 0o600)
    (src / "haresources").write_text(
        "a drbddisk::r0 Filesystem::/dev/drbd0::/data::ext4 10.0.0.100/24/eth0 mysql\n"
        "b IPaddr::10.0.0.101 nfs-kernel-server\n")
    cfg = load(str(src), node="b")
    again = reload(cfg, tmp_path)
    assert comparable(again) == comparable(cfg)
    assert "compression" in to_toml(cfg)  # the conversion notes list what was ignored


def test_native_example_round_trips(tmp_path):
    shutil.copy(FIXTURES / "native" / "full.toml", tmp_path / "hastore.toml")
    os.chmod(tmp_path / "hastore.toml", 0o600)
    (tmp_path / "key2").write_text("k")
    os.chmod(tmp_path / "key2", 0o600)
    cfg = load(str(tmp_path / "hastore.toml"), node="alpha")
    assert comparable(reload(cfg, tmp_path)) == comparable(cfg)


def test_allow_insecure_survives(tmp_path):
    (tmp_path / "ha.cf").write_text("bcast eth0\nnode a b\nauto_failback on\n")
    (tmp_path / "authkeys").write_text("auth 1\n1 crc\n")
    os.chmod(tmp_path / "authkeys", 0o600)
    cfg = load(str(tmp_path), node="a", allow_insecure_auth=True)
    assert comparable(reload(cfg, tmp_path)) == comparable(cfg)


# ---------------------------------------------------------------- generated configurations

texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
names = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
ipv4 = st.ip_addresses(v=4).map(str)


@st.composite
def links(draw):
    kind = draw(st.sampled_from([LinkKind.UCAST, LinkKind.BCAST, LinkKind.MCAST]))
    iface = draw(st.from_regex(r"eth[0-9]{1,2}", fullmatch=True))
    port = draw(st.integers(1, 65535))
    if kind is LinkKind.UCAST:
        return make_link(kind, interface=iface, address=draw(ipv4), port=port)
    if kind is LinkKind.BCAST:
        return make_link(kind, interface=iface, port=port)
    group = draw(st.ip_addresses(network="224.0.0.0/4").map(str))
    return make_link(kind, interface=iface, address=group, port=port, ttl=draw(st.integers(1, 255)),
                     loop=draw(st.booleans()))


@st.composite
def resources(draw):
    agent = draw(st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,10}", fullmatch=True))
    args = tuple(draw(st.lists(texts, max_size=3)))
    params = tuple(draw(st.dictionaries(texts, texts, max_size=3)).items())
    raw = "::".join((agent,) + args) if draw(st.booleans()) else draw(texts)
    return Resource(agent, args, params, raw)


@st.composite
def configs(draw):
    nodes = draw(st.lists(names, min_size=2, max_size=2, unique=True))
    k = draw(st.integers(1, 5000))
    d = draw(st.integers(2 * k + 1, 4 * k + 60000))
    timing = default_timing(k, draw(st.integers(k, d)), d, draw(st.integers(d, 2 * d)))
    keys = tuple(AuthKey(i, draw(st.sampled_from([AuthAlgorithm.SHA1, AuthAlgorithm.SHA256,
                                                  AuthAlgorithm.MD5])), draw(st.binary(min_size=1, max_size=20)))
                 for i in draw(st.lists(st.integers(0, 15), min_size=1, max_size=3, unique=True)))
    link_list = draw(st.lists(links(), min_size=1, max_size=4, unique_by=lambda link: link.id))
    udpport = draw(st.sampled_from([694] + [link.port for link in link_list]))
    groups = tuple(Group(f"g{i}", draw(st.sampled_from(nodes)), tuple(draw(st.lists(resources(), min_size=1,
                                                                                  max_size=3))))
                   for i in range(draw(st.integers(0, 2))))
    return Config(
        node=nodes[0], nodes=tuple(nodes), timing=timing, udpport=udpport, links=tuple(link_list),
        auth=Auth(keys, keys[-1].id, draw(st.booleans())), auto_failback=draw(st.sampled_from(AutoFailback)),
        ping_nodes=tuple(draw(st.lists(ipv4, max_size=2))),
        ping_groups=tuple(PingGroup(f"p{i}", (a,)) for i, a in enumerate(draw(st.lists(ipv4, max_size=2)))),
        groups=groups, respawn=(Respawn(draw(names), "/bin/" + draw(names)),) if draw(st.booleans()) else (),
        watchdog=draw(st.none() | st.just("/dev/watchdog")),
        logging=Logging(draw(st.none() | texts), None, draw(st.none() | st.just("local3")), draw(st.booleans())),
        autojoin=draw(st.sampled_from(["none", "other", "any"])),
        stonith=Stonith(draw(st.none() | texts), ((draw(names), "t", tuple(draw(st.lists(texts, max_size=2)))),),
                        draw(st.none() | texts)),
        control_socket="/run/x.sock", state_dir="/var/lib/x",
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs())
def test_generated_configs_round_trip(tmp_path, cfg):
    text = to_toml(cfg)
    tomllib.loads(text)  # always valid TOML
    assert comparable(reload(cfg, tmp_path)) == comparable(cfg)
