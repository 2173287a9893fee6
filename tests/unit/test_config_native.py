"""The native front door: hastore.toml."""

import os
import shutil
from pathlib import Path

import pytest

from hastore.config import ConfigError, load
from hastore.config.model import AuthAlgorithm, AutoFailback, LinkKind, PingGroup, Resource, Respawn

FIXTURES = Path(__file__).parent.parent / "fixtures" / "config" / "native"
MINIMAL = """\
[cluster]
nodes = ["alpha", "beta"]

[[links]]
kind = "ucast"
interface = "eth1"
address = "10.0.0.2"

[auth]
[[auth.keys]]
id = 1
algorithm = "sha256"
secret = "s3cret"
"""


def write(tmp_path, text, name="hastore.toml", mode=0o600):
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def errors_of(path, node="alpha", **kw):
    with pytest.raises(ConfigError) as info:
        load(path, node=node, **kw)
    return [e.replace(str(Path(path).parent) + "/", "") for e in info.value.errors]


def test_full_example_loads(tmp_path):
    path = tmp_path / "hastore.toml"
    shutil.copy(FIXTURES / "full.toml", path)
    os.chmod(path, 0o600)
    write(tmp_path, "supersecret\n", name="key2")
    cfg = load(str(path), node="beta")
    assert cfg.node == "beta" and cfg.peers == ("alpha",)
    t = cfg.timing
    assert (t.keepalive_ms, t.warntime_ms, t.deadtime_ms, t.initdead_ms) == (200, 1000, 2000, 20000)
    assert [(link.id, link.port) for link in cfg.links] == [
        ("ucast:eth1:10.0.0.2", 694), ("mcast:eth2:239.0.0.1", 1694), ("bcast:eth3", 694)]
    assert cfg.links[1].kind is LinkKind.MCAST
    assert cfg.auth.active_key == 2
    assert cfg.auth.key(1).secret == b"\x00\xff\x10"
    assert cfg.auth.key(2).secret == b"supersecret" and cfg.auth.key(2).algorithm is AuthAlgorithm.SHA256
    assert cfg.ping_nodes == ("10.0.0.254",)
    assert cfg.ping_groups == (PingGroup("routers", ("10.0.0.1", "10.0.0.2")),)
    (group,) = cfg.groups
    assert (group.name, group.preferred_node) == ("db", "alpha")
    assert group.resources[0] == Resource("drbd", (), (("resource", "r0"),), raw="drbd", start_timeout_ms=30000)
    assert (group.max_restarts, group.restart_window_ms) == (2, 600000)
    mysql = group.resources[3]
    assert (mysql.start_timeout_ms, mysql.stop_timeout_ms, mysql.monitor_timeout_ms, mysql.monitor_interval_ms) == (
        120000, 90000, 5000, 10000)
    assert group.resources[2].params == (("ip", "10.0.0.100"), ("cidr_netmask", "24"), ("nic", "eth0"))
    assert group.resources[1].raw == "Filesystem::/dev/drbd0::/var/lib/mysql::ext4"
    assert cfg.respawn == (Respawn("root", "/usr/local/bin/watcher --quiet"),)
    assert cfg.stonith.type == "external/ipmi"
    assert cfg.stonith.hosts == (("*", "external/ipmi", ("beta", "10.0.1.2")),)
    assert cfg.watchdog == "/dev/watchdog" and cfg.logging.logfile == "/var/log/hastore.log"
    assert cfg.warnings == ()


def test_minimal_defaults(tmp_path):
    cfg = load(write(tmp_path, MINIMAL), node="alpha")
    t = cfg.timing
    assert (t.keepalive_ms, t.warntime_ms, t.deadtime_ms, t.initdead_ms) == (1000, 15000, 30000, 30000)
    assert cfg.auto_failback is AutoFailback.OFF
    assert cfg.auth.active_key == 1 and not cfg.auth.allow_insecure
    assert cfg.control_socket == "/run/hastore/hastore.sock" and cfg.state_dir == "/var/lib/hastore"
    assert cfg.udpport == 694 and cfg.autojoin == "none"


def test_every_error_at_once_with_key_paths(tmp_path):
    text = MINIMAL.replace('nodes = ["alpha", "beta"]', 'nodes = ["alpha", "beta"]\nudpport = "694"\nflavour = 1')
    text += '[timing]\nkeepalive = 1\ndeadtime = "soon"\n[[links]]\nkind = "ucast"\ninterface = "eth1"\n' \
            'adress = "10.0.0.3"\n[[links]]\nkind = "carrier-pigeon"\n[[groups]]\nname = "web"\n' \
            'preferred_node = "gamma"\n[[groups.resources]]\nagent = "nginx"\nargs = [1]\n[surprise]\n'
    assert errors_of(write(tmp_path, text)) == [
        "hastore.toml: cluster.udpport: must be an integer, not a string",
        "hastore.toml: cluster.flavour: unknown key (this table takes: auto_failback, autojoin, nodes, udpport)",
        'hastore.toml: timing.keepalive: write durations as strings with a unit, e.g. "2s" or "500ms", not an integer',
        "hastore.toml: timing.deadtime: 'soon' is not a duration; write a number of seconds (\"2\", \"1.5\") "
        "or a number with a unit (\"500ms\", \"2s\", \"1min\")",
        "hastore.toml: links[1].adress: is not a key of a ucast link (it takes: kind, interface, address, port)",
        "hastore.toml: links[1].address: is required",
        "hastore.toml: links[2].kind: 'carrier-pigeon' must be one of: ucast, bcast, mcast, serial",
        "hastore.toml: groups[0].resources[0].args: must be a list of strings",
        "hastore.toml: surprise: unknown key (this table takes: auth, cluster, daemon, groups, links, "
        "logging, ping, respawn, stonith, timing)",
        "hastore.toml: groups[0].preferred_node: preferred node 'gamma' is not a cluster node "
        "(cluster.nodes lists: alpha, beta); the names must match exactly",
    ]


def test_model_checks_use_key_paths(tmp_path):
    text = MINIMAL.replace('address = "10.0.0.2"', 'address = "10.0.0.2"\nport = 0') + (
        '[[links]]\nkind = "mcast"\ninterface = "eth2"\ngroup = "10.1.1.1"\n'
        '[timing]\nkeepalive = "2s"\ndeadtime = "3s"\n')
    assert errors_of(write(tmp_path, text), node="gamma") == [
        "hastore.toml: timing.deadtime: deadtime 3s must be more than 2 x keepalive 2s (= 4s), Heartbeat's "
        "rule: a peer must be allowed to miss two beats before it is declared dead",
        "hastore.toml: cluster.nodes: this node is gamma (uname -n or --node); cluster.nodes lists: alpha, "
        "beta — if this machine is one of them, run with --node NAME",
        "hastore.toml: links[0]: port 0 is not a UDP port (1-65535)",
        "hastore.toml: links[1]: mcast group '10.1.1.1' is not a multicast address (224.0.0.0-239.255.255.255)",
    ]


def test_inline_secret_needs_a_private_file(tmp_path):
    path = write(tmp_path, MINIMAL, mode=0o640)
    assert errors_of(path) == [
        "hastore.toml: mode 0640 lets group or others read or write it, and it holds an inline secret "
        "(or use secret_file); hastore (like Heartbeat) refuses it: run chmod 600 hastore.toml"]


def test_secret_file_lets_the_toml_be_world_readable(tmp_path):
    write(tmp_path, "k3y\r\n", name="key1")
    text = MINIMAL.replace('secret = "s3cret"', 'secret_file = "key1"')
    cfg = load(write(tmp_path, text, mode=0o644), node="alpha")
    assert cfg.auth.key(1).secret == b"k3y"
    os.chmod(tmp_path / "key1", 0o644)
    (error,) = errors_of(str(tmp_path / "hastore.toml"))
    assert error.startswith("key1: mode 0644 lets group or others read")


def test_missing_secret_file(tmp_path):
    text = MINIMAL.replace('secret = "s3cret"', 'secret_file = "/nonexistent/key"')
    assert errors_of(write(tmp_path, text)) == [
        "hastore.toml: auth.keys[0].secret_file: /nonexistent/key: cannot read: no such file"]


def test_auth_problems(tmp_path):
    text = MINIMAL + '[[auth.keys]]\nid = 2\nalgorithm = "crc"\n'
    errors = errors_of(write(tmp_path, text))
    assert errors[0] == ("hastore.toml: auth.active_key: is required when there are several keys: "
                         "which one signs heartbeats?")
    assert errors[1].startswith("hastore.toml: auth.keys[1]: key 2 uses crc")
    cfg = load(write(tmp_path, text.replace("[auth]", "[auth]\nactive_key = 1\nallow_insecure = true")),
               node="alpha")
    assert cfg.auth.allow_insecure
    both = MINIMAL.replace('secret = "s3cret"', 'secret = "a"\nsecret_hex = "00"')
    assert errors_of(write(tmp_path, both)) == [
        "hastore.toml: auth.keys[0].secret_hex: give only one of secret, secret_hex, secret_file "
        "(found secret, secret_hex)"]


def test_no_auth_no_links_no_nodes(tmp_path):
    assert errors_of(write(tmp_path, "[cluster]\nnodes = []\n")) == [
        "hastore.toml: cluster.nodes: no cluster nodes are listed; hastore needs this node and its peer "
        "(cluster.nodes)",
        "hastore.toml: links: no heartbeat links: add at least one ucast, bcast, mcast or serial link "
        "(two independent paths are better than one)",
        "hastore.toml: auth: no authentication keys: heartbeats must be signed (authkeys: 'auth 1' and "
        "'1 sha1 SECRET'; hastore.toml: [auth] with [[auth.keys]])",
    ]


def test_syntax_error_names_the_line(tmp_path):
    (error,) = errors_of(write(tmp_path, '[cluster]\nnodes = ["a", "b"]\nudpport = = 1\n'))
    assert error.startswith("hastore.toml:3: TOML syntax error: ")


def test_bad_utf8(tmp_path):
    path = tmp_path / "hastore.toml"
    path.write_bytes(b'[cluster]\nnodes = ["\xff"]\n')
    assert errors_of(str(path)) == ["hastore.toml:2: not valid UTF-8 (byte 0xff); save the file as UTF-8"]


def test_missing_paths(tmp_path):
    assert errors_of(str(tmp_path / "nope.toml")) == [
        "nope.toml: no such file or directory (give a hastore.toml file, or a Heartbeat directory "
        "such as /etc/ha.d)"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert errors_of(str(empty)) == ["empty/ha.cf: cannot read: no such file",
                                     "empty/authkeys: cannot read: no such file"]


def test_serial_and_link_keys(tmp_path):
    dev = tmp_path / "ttyS0"
    dev.write_text("")
    text = MINIMAL + f'[[links]]\nkind = "serial"\ndevice = "{dev}"\nbaud = 115200\n'
    cfg = load(write(tmp_path, text), node="alpha")
    assert cfg.links[1].id == f"serial:{dev}" and cfg.links[1].baud == 115200
    bad = MINIMAL + '[[links]]\nkind = "serial"\ndevice = "/dev/ttyNOPE"\nport = 5\n'
    assert errors_of(write(tmp_path, bad)) == [
        "hastore.toml: links[1].port: is not a key of a serial link (it takes: kind, device, baud)",
        "hastore.toml: links[1]: serial device /dev/ttyNOPE does not exist on this machine "
        "(check the cable's port name, or remove the serial line)",
    ]


def test_the_documented_schema_loads(tmp_path):
    doc = (Path(__file__).parent.parent.parent / "docs" / "configuration.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    dev = tmp_path / "ttyS0"
    dev.write_text("")
    cfg = load(write(tmp_path, block.replace("/dev/ttyS0", str(dev))), node="alpha")
    assert [link.kind for link in cfg.links] == [LinkKind.UCAST, LinkKind.MCAST, LinkKind.SERIAL]
    assert cfg.groups[0].resources[0].params == (("fstype", "ext4"),)


def test_model_defaults_match_the_loaders_heartbeat_defaults():
    from hastore.config.common import default_timing
    from hastore.config.model import Timing
    assert default_timing() == Timing()
