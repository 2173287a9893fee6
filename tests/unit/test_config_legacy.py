"""The legacy front door: ha.cf + authkeys + haresources, as Heartbeat 3.0.6 reads them."""

import os
from pathlib import Path

import pytest

from hastore.config import ConfigError, load
from hastore.config.hacf import HANDLERS, IGNORED
from hastore.config.model import AuthAlgorithm, AutoFailback, LinkKind, PingGroup, Resource, Respawn

HACF = """\
# a shared ha.cf
keepalive 1
deadtime 10
warntime 5
initdead 20
udpport 694
bcast eth1 eth2
mcast eth0 239.1.2.3 694 1 0
ucast eth1 10.0.0.2
node alpha beta
auto_failback off
"""
KEYS = "auth 1\n1 sha1 s3cret\n"


def hb(tmp_path, hacf=HACF, authkeys=KEYS, haresources=None, mode=0o600):
    (tmp_path / "ha.cf").write_text(hacf)
    if authkeys is not None:
        (tmp_path / "authkeys").write_text(authkeys)
        os.chmod(tmp_path / "authkeys", mode)
    if haresources is not None:
        (tmp_path / "haresources").write_text(haresources)
    return str(tmp_path)


def errors_of(path, node="alpha", **kw):
    with pytest.raises(ConfigError) as info:
        load(path, node=node, **kw)
    return [e.replace(path + "/", "") for e in info.value.errors]


def warnings_of(cfg, path):
    return [w.replace(path + "/", "") for w in cfg.warnings]


def test_minimal_config_loads(tmp_path):
    cfg = load(hb(tmp_path), node="alpha")
    assert cfg.node == "alpha" and cfg.nodes == ("alpha", "beta") and cfg.peers == ("beta",)
    assert [link.id for link in cfg.links] == [
        "bcast:eth1", "bcast:eth2", "mcast:eth0:239.1.2.3", "ucast:eth1:10.0.0.2"]
    assert all(link.port == 694 for link in cfg.links)
    t = cfg.timing
    assert (t.keepalive_ms, t.deadtime_ms, t.warntime_ms, t.initdead_ms) == (1000, 10000, 5000, 20000)
    assert cfg.auth.active_key == 1 and cfg.auth.key(1).algorithm is AuthAlgorithm.SHA1
    assert cfg.auth.key(1).secret == b"s3cret"
    assert cfg.auto_failback is AutoFailback.OFF
    assert cfg.groups == () and cfg.warnings == ()
    assert cfg.source == str(tmp_path)


def test_path_may_name_the_ha_cf_file(tmp_path):
    hb(tmp_path)
    assert load(str(tmp_path / "ha.cf"), node="alpha").nodes == ("alpha", "beta")


def test_heartbeat_defaults_and_auto_failback_warning(tmp_path):
    path = hb(tmp_path, "bcast eth0\nnode alpha beta\n")
    cfg = load(path, node="alpha")
    t = cfg.timing
    assert (t.keepalive_ms, t.deadtime_ms, t.warntime_ms, t.initdead_ms) == (1000, 30000, 15000, 30000)
    assert cfg.auto_failback is AutoFailback.LEGACY
    assert warnings_of(cfg, path) == [
        "ha.cf: no auto_failback line: Heartbeat's default 'legacy' applies; "
        "write 'auto_failback on' or 'auto_failback off'"]


@pytest.mark.parametrize("deadtime, initdead", [("5", 12000), ("8", 16000), ("10", 20000), ("20", 20000)])
def test_initdead_default_follows_heartbeat(tmp_path, deadtime, initdead):
    path = hb(tmp_path, f"keepalive 1\ndeadtime {deadtime}\nbcast eth0\nnode alpha beta\nauto_failback on\n")
    assert load(path, node="alpha").timing.initdead_ms == initdead


def test_durations_in_ms_and_us(tmp_path):
    path = hb(tmp_path, "keepalive 500ms\ndeadtime 3000000us\nwarntime 1.5\ninitdead 12\n"
                        "bcast eth0\nnode alpha beta\nauto_failback on\n")
    t = load(path, node="alpha").timing
    assert (t.keepalive_ms, t.deadtime_ms, t.warntime_ms, t.initdead_ms) == (500, 3000, 1500, 12000)


def test_udpport_applies_to_links_before_and_after_it(tmp_path):
    path = hb(tmp_path, "bcast eth0\nudpport 6942\nucast eth1 10.0.0.2\nmcast eth2 239.0.0.1 700 2 1\n"
                        "node alpha beta\nauto_failback on\n")
    cfg = load(path, node="alpha")
    assert cfg.udpport == 6942
    assert [(link.port, link.ttl, link.loop) for link in cfg.links] == [
        (6942, 1, False), (6942, 1, False), (700, 2, True)]


def test_serial_links_take_baud_before_or_after(tmp_path):
    dev1, dev2 = tmp_path / "ttyS0", tmp_path / "ttyS1"
    dev1.write_text("")
    dev2.write_text("")
    path = hb(tmp_path, f"serial {dev1}\nbaud 115200\nserial {dev2}\nnode alpha beta\nauto_failback on\n")
    cfg = load(path, node="alpha")
    assert [(link.id, link.kind, link.baud) for link in cfg.links] == [
        (f"serial:{dev1}", LinkKind.SERIAL, 115200), (f"serial:{dev2}", LinkKind.SERIAL, 115200)]


def test_missing_serial_device_is_a_clear_error(tmp_path):
    path = hb(tmp_path, "serial /dev/ttyNOPE9\nbcast eth0\nnode alpha beta\nauto_failback on\n")
    assert errors_of(path) == [
        "ha.cf:1: serial device /dev/ttyNOPE9 does not exist on this machine "
        "(check the cable's port name, or remove the serial line)"]


def test_comments_commas_and_case(tmp_path):
    path = hb(tmp_path, "  # comment\n\nkeepalive 2 # two seconds\nbcast eth0\t# trailing\n"
                        "node Alpha, BETA\nauto_failback yes\n")
    cfg = load(path, node="ALPHA")
    assert cfg.nodes == ("alpha", "beta") and cfg.node == "alpha"
    assert cfg.timing.keepalive_ms == 2000 and cfg.auto_failback is AutoFailback.ON


def test_node_lines_accumulate(tmp_path):
    path = hb(tmp_path, "bcast eth0\nnode alpha\nnode beta\nnode beta\nauto_failback on\n")
    cfg = load(path, node="beta")
    assert cfg.nodes == ("alpha", "beta")
    assert warnings_of(cfg, path) == ["ha.cf:4: node beta is listed twice"]


def test_ucast_to_own_address_is_kept(tmp_path):
    path = hb(tmp_path, "ucast eth0 10.0.2.15\nucast eth0 10.0.2.16\nnode alpha beta\nauto_failback on\n")
    assert len(load(path, node="alpha").links) == 2


def test_every_documented_directive_is_known(tmp_path):
    documented = (
        "apiauth autojoin auto_failback baud bcast cluster compression compression_threshold "
        "conn_logd_time coredumps coreroot crm deadping deadtime debug debugfile enable_config_writes "
        "env hbgenmethod hopfudge initdead keepalive log_badpack logfacility logfile max_rexmit_delay "
        "mcast memreserve msgfmt nice_failback node normalpoll ping ping_group quorum_server realtime "
        "record_config_changes record_pengine_inputs respawn rtprio serial stonith stonith_host "
        "traditional_compression ucast udp udpport use_apphbd use_logd uuidfrom warntime watchdog"
    ).split()
    assert set(documented) <= set(HANDLERS) | set(IGNORED)


def test_ignored_directives_warn(tmp_path):
    path = hb(tmp_path, HACF + "compression bz2\nhopfudge 1\ncrm on\n")
    assert warnings_of(load(path, node="alpha"), path) == [
        "ha.cf:12: 'compression' is a Heartbeat directive hastore ignores",
        "ha.cf:13: 'hopfudge' is a Heartbeat directive hastore ignores",
        "ha.cf:14: 'crm' is a Heartbeat directive hastore ignores: hastore manages resources itself, "
        "from haresources (Heartbeat v1 style)",
    ]


def test_unknown_directive_names_file_line_and_a_guess(tmp_path):
    path = hb(tmp_path, HACF + "keepalve 2\nfrobnicate yes\n")
    assert errors_of(path) == [
        "ha.cf:12: unknown directive 'keepalve': not an ha.cf directive (did you mean 'keepalive'?)",
        "ha.cf:13: unknown directive 'frobnicate': not an ha.cf directive",
    ]


def test_unsupported_media_is_refused(tmp_path):
    path = hb(tmp_path, HACF + "mcast6 eth0 ff05::1 694 1 0\n")
    assert errors_of(path) == ["ha.cf:12: 'mcast6' is a Heartbeat media type hastore does not support; "
                               "use ucast, bcast, mcast or serial"]


def test_respawn_ipfail_is_kept_with_a_warning(tmp_path):
    path = hb(tmp_path, HACF + "respawn hacluster /usr/lib/heartbeat/ipfail\nrespawn root /usr/bin/my tool\n")
    cfg = load(path, node="alpha")
    assert cfg.respawn == (Respawn("hacluster", "/usr/lib/heartbeat/ipfail"), Respawn("root", "/usr/bin/my tool"))
    (warning,) = warnings_of(cfg, path)
    assert warning.startswith("ha.cf:12: respawn of Heartbeat's ipfail kept") and "ipfail built in" in warning


def test_nice_failback_is_translated(tmp_path):
    path = hb(tmp_path, HACF.replace("auto_failback off", "nice_failback on"))
    cfg = load(path, node="alpha")
    assert cfg.auto_failback is AutoFailback.OFF
    assert "nice_failback is obsolete" in cfg.warnings[0]


def test_ping_ping_group_logging_watchdog_stonith(tmp_path):
    path = hb(tmp_path, HACF + "ping 10.0.0.254 gw.example.com\nping_group routers 10.0.0.1 10.0.0.2\n"
              "watchdog /dev/watchdog\nlogfile /var/log/ha-log\ndebugfile /var/log/ha-debug\n"
              "logfacility LOCAL0\nuse_logd no\nautojoin none\n"
              "stonith baytech /etc/ha.d/conf/stonith.baytech\nstonith_host * rps10 /dev/ttyS1 alpha 0\n")
    cfg = load(path, node="alpha")
    assert cfg.ping_nodes == ("10.0.0.254", "gw.example.com")
    assert cfg.ping_groups == (PingGroup("routers", ("10.0.0.1", "10.0.0.2")),)
    assert cfg.watchdog == "/dev/watchdog"
    assert (cfg.logging.logfile, cfg.logging.debugfile, cfg.logging.logfacility, cfg.logging.use_logd) == (
        "/var/log/ha-log", "/var/log/ha-debug", "local0", False)
    assert cfg.stonith.type == "baytech" and cfg.stonith.config_file == "/etc/ha.d/conf/stonith.baytech"
    assert cfg.stonith.hosts == (("*", "rps10", ("/dev/ttyS1", "alpha", "0")),)


def test_timing_rules_name_both_values(tmp_path):
    path = hb(tmp_path, "keepalive 5\ndeadtime 10\nbcast eth0\nnode alpha beta\nauto_failback on\n")
    assert errors_of(path) == [
        "ha.cf:2: deadtime 10s must be more than 2 x keepalive 5s (= 10s), Heartbeat's rule: "
        "a peer must be allowed to miss two beats before it is declared dead"]
    path = hb(tmp_path, "keepalive 1\ndeadtime 10\nwarntime 20\ninitdead 8\nbcast eth0\nnode alpha beta\n"
                        "auto_failback on\n")
    assert errors_of(path) == [
        "ha.cf:3: warntime 20s must lie between keepalive 1s and deadtime 10s",
        "ha.cf:4: initdead 8s must be at least deadtime 10s",
    ]
    path = hb(tmp_path, "keepalive 200ms\ndeadtime 2\ninitdead 5\nbcast eth0\nnode alpha beta\n"
                        "auto_failback on\n")
    assert warnings_of(load(path, node="alpha"), path) == [
        "ha.cf:3: initdead 5s may be too short for a slow network start "
        "(Heartbeat advises >= deadtime and >= 10s)"]


def test_this_node_must_be_listed(tmp_path):
    path = hb(tmp_path)
    assert errors_of(path, node="gamma") == [
        "ha.cf:10: this node is gamma (uname -n or --node); ha.cf lists: alpha, beta "
        "— if this machine is one of them, run with --node NAME"]


def test_node_count(tmp_path):
    path = hb(tmp_path, HACF + "node gamma\n")
    assert errors_of(path) == ["ha.cf:10: hastore runs two-node clusters; ha.cf lists 3: alpha, beta, gamma"]
    path = hb(tmp_path, HACF.replace("node alpha beta", "node alpha"))
    assert warnings_of(load(path, node="alpha"), path) == [
        "ha.cf:10: only one node is listed (alpha); there is no peer to fail over to"]


def test_no_links_no_nodes(tmp_path):
    path = hb(tmp_path, "keepalive 1\nauto_failback on\n")
    assert errors_of(path) == [
        "ha.cf: no cluster nodes are listed; hastore needs this node and its peer (ha.cf)",
        "ha.cf: no heartbeat links: add at least one ucast, bcast, mcast or serial link "
        "(two independent paths are better than one)",
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ("mcast eth0 10.0.0.1 694 1 0", "mcast group '10.0.0.1' is not a multicast address"),
        ("mcast eth0 239.0.0.1 694 1", "mcast takes IF GROUP PORT TTL LOOP"),
        ("mcast eth0 239.0.0.1 694 0 0", "mcast ttl 0 must be 1-255"),
        ("mcast eth0 239.0.0.1 99999 1 0", "port 99999 is not a UDP port"),
        ("mcast eth0 239.0.0.1 694 1 2", "mcast loop '2' must be 0 or 1"),
        ("ucast eth0 peer.example.com", "ucast peer address 'peer.example.com' is not an IP address"),
        ("ucast eth0", "ucast takes an interface and the peer's address"),
        ("ucast averyveryverylongifname 10.0.0.2", "needs a network interface name"),
        ("udpport 0", "udpport 0 is not a UDP port (1-65535)"),
        ("udpport http", "udpport 'http' is not a whole number"),
        ("keepalive 1 2", "keepalive takes one duration"),
        ("keepalive soon", "keepalive: 'soon' is not a duration"),
        ("baud 1234", "baud 1234 is not a serial speed Heartbeat supports"),
        ("auto_failback maybe", "auto_failback 'maybe' must be on, off or legacy"),
        ("ping 10.0.0.300x!", "neither an IP address nor a host name"),
        ("ping_group gw", "ping_group takes a group name and one or more addresses"),
        ("respawn hacluster", "respawn takes a user and a command"),
        ("respawn hacluster ipfail", "must be a full path"),
        ("logfacility local9", "logfacility 'local9' is not a syslog facility"),
        ("autojoin all", "autojoin 'all' must be one of: none, other, any"),
        ("use_logd maybe", "use_logd 'maybe' must be yes or no"),
        ("stonith baytech", "stonith takes a STONITH type and its configuration file"),
        ("watchdog /dev/a\nwatchdog /dev/b", "watchdog is given twice (first at line 12)"),
    ],
)
def test_bad_lines_are_reported_with_file_and_line(tmp_path, line, message):
    path = hb(tmp_path, HACF + line + "\n")
    errors = errors_of(path)
    assert len(errors) == 1, errors
    assert errors[0].startswith("ha.cf:1") and message in errors[0], errors


def test_repeated_timer_warns_and_last_wins(tmp_path):
    path = hb(tmp_path, HACF + "keepalive 2\n")
    cfg = load(path, node="alpha")
    assert cfg.timing.keepalive_ms == 2000
    assert warnings_of(cfg, path) == [
        "ha.cf:12: keepalive is given again (first at line 2); this line wins, as in Heartbeat"]


def test_bad_utf8_names_the_line(tmp_path):
    path = hb(tmp_path)
    (tmp_path / "ha.cf").write_bytes(HACF.encode() + b"logfile /var/log/\xff\n")
    assert errors_of(path) == ["ha.cf:12: not valid UTF-8 (byte 0xff); save the file as UTF-8"]


# ---------------------------------------------------------------- authkeys

def test_authkeys_mode_must_be_private(tmp_path):
    path = hb(tmp_path, mode=0o644)
    assert errors_of(path) == [
        "authkeys: mode 0644 lets group or others read or write it, and it holds the heartbeat signing "
        "keys; hastore (like Heartbeat) refuses it: run chmod 600 authkeys"]


def test_missing_authkeys_is_an_error(tmp_path):
    path = hb(tmp_path, authkeys=None)
    assert errors_of(path) == ["authkeys: cannot read: no such file"]


def test_crc_refused_unless_allowed(tmp_path):
    path = hb(tmp_path, authkeys="auth 1\n1 crc\n")
    (error,) = errors_of(path)
    assert error.startswith("authkeys:2: key 1 uses crc, which authenticates nothing")
    assert "--allow-insecure-auth" in error and "split brain" in error
    cfg = load(path, node="alpha", allow_insecure_auth=True)
    assert cfg.auth.allow_insecure and cfg.auth.key(1).algorithm is AuthAlgorithm.CRC


def test_auth_must_name_a_defined_key(tmp_path):
    path = hb(tmp_path, authkeys="auth 3\n1 sha1 abc\n2 md5 def\n")
    assert errors_of(path) == ["authkeys:1: signing key 3 is not defined (defined: 1, 2)"]


def test_authkeys_lines(tmp_path):
    path = hb(tmp_path, authkeys="# keys\nauth 2\n1 md5 Hello!\n2 sha256 a key with spaces \n3 SHA1 x\n")
    auth = load(path, node="alpha").auth
    assert auth.active_key == 2
    assert auth.key(2).secret == b"a key with spaces" and auth.key(2).algorithm is AuthAlgorithm.SHA256
    assert auth.key(3).algorithm is AuthAlgorithm.SHA1


def test_authkeys_secret_bytes_survive(tmp_path):
    path = hb(tmp_path)
    (tmp_path / "authkeys").write_bytes(b"auth 1\n1 sha1 caf\xe9\n")
    assert load(path, node="alpha").auth.key(1).secret == b"caf\xe9"


@pytest.mark.parametrize(
    "authkeys, message",
    [
        ("auth 1\n1 blowfish k\n", "authkeys:2: key 1: unknown algorithm 'blowfish'"),
        ("auth 1\n1\n", "authkeys:2: key 1 needs an algorithm"),
        ("auth\n1 sha1 k\n", "authkeys:1: 'auth' takes one key number"),
        ("auth 1\nauth 1\n1 sha1 k\n", "authkeys:2: a second 'auth' line"),
        ("auth 1\none sha1 k\n", "authkeys:2: expected 'auth N' or 'N ALGORITHM SECRET'"),
        ("1 sha1 k\n", "authkeys: no 'auth N' line says which key signs heartbeats"),
        ("auth 1\n1 sha1\n", "authkeys:2: key 1 (sha1) needs a secret"),
        ("auth 1\n1 sha1 a\n1 md5 b\n", "authkeys:3: key number 1 is defined twice"),
        ("auth 16\n16 sha1 a\n", "authkeys:2: key number 16 must be 0-15"),
        ("", "authkeys: no authentication keys"),
    ],
)
def test_bad_authkeys(tmp_path, authkeys, message):
    errors = errors_of(hb(tmp_path, authkeys=authkeys))
    assert len(errors) == 1 and errors[0].startswith(message), errors


# ---------------------------------------------------------------- haresources

def test_haresources_groups(tmp_path):
    path = hb(tmp_path, haresources=(
        "# groups\n"
        "alpha drbddisk::r0 Filesystem::/dev/drbd0::/data::ext4 \\\n"
        "      IPaddr::192.168.60.200/24/eth0 mysql   # trailing comment\n"
        "\n"
        "Beta 10.0.0.100/24/eth0/10.0.0.255 fe80::1/64/eth0 nfs-kernel-server\n"))
    cfg = load(path, node="alpha")
    g1, g2 = cfg.groups
    assert (g1.name, g1.preferred_node, g1.source) == ("group1", "alpha", f"{path}/haresources:2")
    assert g1.resources == (
        Resource("drbddisk", ("r0",), raw="drbddisk::r0"),
        Resource("Filesystem", ("/dev/drbd0", "/data", "ext4"), raw="Filesystem::/dev/drbd0::/data::ext4"),
        Resource("IPaddr", ("192.168.60.200/24/eth0",), raw="IPaddr::192.168.60.200/24/eth0"),
        Resource("mysql", (), raw="mysql"),
    )
    assert (g2.name, g2.preferred_node) == ("group2", "beta")
    assert [r.agent for r in g2.resources] == ["IPaddr", "IPaddr", "nfs-kernel-server"]
    assert g2.resources[0].args == ("10.0.0.100/24/eth0/10.0.0.255",)


def test_haresources_preferred_node_must_be_a_node(tmp_path):
    path = hb(tmp_path, haresources="web1 192.168.122.100/eth0 nginx\n")
    assert errors_of(path) == [
        "haresources:1: preferred node 'web1' is not a cluster node (ha.cf lists: alpha, beta); "
        "the names must match exactly"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("alpha\n", "haresources:1: line names node 'alpha' but no resources"),
        ("alpha 10.0.0.300/24\n", "haresources:1: '10.0.0.300/24': 10.0.0.300 is not a valid IP address"),
        ("alpha IPaddr::\n", "haresources:1: 'IPaddr::' has an empty part"),
        ("alpha 10.0.0.1::x\n", "haresources:1: '10.0.0.1::x': an address takes no '::' arguments"),
        ("alpha IPaddr::vip/24\n", "haresources:1: IPaddr address 'vip/24' does not start with an IP"),
        ("alpha my/agent\n", "haresources:1: resource agent name 'my/agent' must be"),
        ("alpha nginx //web\n", "haresources:1: '//' does not start a comment in haresources"),
    ],
)
def test_bad_haresources(tmp_path, line, message):
    errors = errors_of(hb(tmp_path, haresources=line))
    assert len(errors) == 1 and errors[0].startswith(message), errors


def test_unreadable_file(tmp_path):
    # root reads files of any mode, so make the read fail another way that also runs in CI (as root)
    path = hb(tmp_path)
    (tmp_path / "haresources").mkdir()
    assert errors_of(path) == ["haresources: cannot read: it is a directory, not a file"]


def test_permission_denied_is_reported_not_raised():
    import shutil
    import subprocess
    import sys
    import tempfile
    tmp_path = Path(tempfile.mkdtemp(prefix="hastore-perm-"))  # under /tmp, traversable by nobody
    os.chmod(tmp_path, 0o755)
    path = hb(tmp_path, haresources="alpha nginx\n")
    os.chmod(tmp_path / "haresources", 0)
    code = ("import sys\nfrom hastore.config import load, ConfigError\n"
            f"try:\n    load({str(path)!r}, node='alpha')\nexcept ConfigError as e:\n    print(e)\n")
    # as root, drop to nobody so the read really fails; as a user the file is unreadable anyway
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    r = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    shutil.rmtree(tmp_path)
    assert "haresources: cannot read: Permission denied" in r.stdout, (r.stdout, r.stderr)
