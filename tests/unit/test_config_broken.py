"""Broken input never escapes as a traceback: load() raises ConfigError, and every message says where."""

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hastore.config import ConfigError, load
from hastore.config.hacf import HANDLERS, IGNORED

GOOD_HACF = "keepalive 1\ndeadtime 10\nbcast eth0\nnode a b\nauto_failback on\n"
GOOD_KEYS = "auth 1\n1 sha1 k\n"
# Problems that concern a whole file or the whole configuration, so they carry no line number.
WHOLE_FILE = ("cannot read", "mode 0", "no cluster nodes", "no heartbeat links", "no authentication keys",
              "no 'auth N' line", "no auto_failback line", "not valid UTF-8")

PILE = [
    ("keepalive\n", GOOD_KEYS, None),
    ("keepalive -1\ndeadtime 1e9\nwarntime ms\ninitdead 1.2.3\n", GOOD_KEYS, None),
    ("bcast\nmcast\nucast\nserial\nping\nping_group\nnode\nrespawn\nstonith\nstonith_host\n", GOOD_KEYS, None),
    ("mcast eth0 1.2.3.4 x y z\nucast eth0 not-an-ip\nudpport 70000\nbaud fast\n", GOOD_KEYS, None),
    (GOOD_HACF + "node c d e\nauto_failback sometimes\nlogfacility kernel\nautojoin maybe\n", GOOD_KEYS, None),
    (GOOD_HACF + "\x00\x01\x02 weird\n{{ template }}\n// comment\n", GOOD_KEYS, None),
    (GOOD_HACF, "auth x\n1\n2 rot13 k\nauth 1\nauth 2\n99 sha1\n-1 md5 k\n", None),
    (GOOD_HACF, GOOD_KEYS, "\\\nz res\na\na ::\na IPaddr::::\na 300.1.1.1\na 1.1.1.1::z \\"),
    (GOOD_HACF, GOOD_KEYS, "a " + "x" * 10000 + "\n" + "a b\\\n" * 50),
    ("ping_group g 1.2.3.4\nping_group g bad!addr\nping 999.1.1.1\nrespawn u rel/path\n", "", ""),
    ("\n\n\n", "\n", "\n"),
    ("keepalive 1 # c\r\ndeadtime 10\r\nbcast eth0\r\nnode a b\r\n", "auth 1\r\n1 sha1 k\r\n", None),
]

TOML_PILE = [
    "[cluster\n",
    "cluster = 5\ntiming = []\nlinks = {}\nauth = 1\ngroups = 'x'\n",
    "[cluster]\nnodes = [1, 2]\nudpport = true\nauto_failback = 'maybe'\n",
    "[[links]]\n[[links]]\nkind = 5\n[[links]]\nkind = 'mcast'\nttl = 'x'\nloop = 2\n",
    "[auth]\nkeys = [1, 2]\nactive_key = 'one'\n",
    "[auth]\n[[auth.keys]]\n[[auth.keys]]\nid = 'x'\nalgorithm = 'rot13'\nsecret_hex = 'zz'\n",
    "[[groups]]\n[[groups]]\nname = 5\nresources = [{}]\n[[groups.resources]]\nagent = 1\nparams = {a = [1]}\n",
    "[timing]\nkeepalive = '1h'\ndeadtime = 3.5\ninitdead = true\n[ping]\nnodes = 'x'\ngroups = [1]\n",
    "[stonith]\nhosts = [{}]\ntype = 1\n[logging]\nuse_logd = 'yes'\n[[respawn]]\n[daemon]\nstate_dir = 'rel'\n",
    "\ufeff[cluster]\n",
]


def write_dir(tmp_path, hacf, keys, hares):
    for name, text in (("ha.cf", hacf), ("authkeys", keys), ("haresources", hares)):
        if text is not None:
            (tmp_path / name).write_text(text)
    if keys is not None:
        os.chmod(tmp_path / "authkeys", 0o600)
    return str(tmp_path)


def check_messages(messages, base):
    for msg in messages:
        assert "internal error" not in msg, msg
        match = re.match(re.escape(base) + r"/[^:]+(:\d+)?: ", msg)
        assert match, f"message does not start with file[:line]: {msg!r}"
        if match.group(1) is None and ".toml" not in msg.split(": ")[0]:
            assert any(w in msg for w in WHOLE_FILE), f"message lacks a line number: {msg!r}"


@pytest.mark.parametrize("hacf, keys, hares", PILE)
def test_broken_legacy_files_name_file_and_line(tmp_path, hacf, keys, hares):
    path = write_dir(tmp_path, hacf, keys, hares)
    try:
        cfg = load(path, node="a")
    except ConfigError as exc:
        assert exc.errors and str(exc) == "\n".join(exc.errors)
        check_messages(exc.errors + exc.warnings, path)
    else:
        check_messages(list(cfg.warnings), path)


@pytest.mark.parametrize("text", TOML_PILE)
def test_broken_toml_names_file_and_key(tmp_path, text):
    path = tmp_path / "hastore.toml"
    path.write_text(text)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as info:
        load(str(path), node="a")
    for msg in info.value.errors:
        assert "internal error" not in msg, msg
        assert re.match(re.escape(str(path)) + r"(:\d+: |: [A-Za-z_][\w.\[\]]*: )", msg), msg


WORDS = list(HANDLERS) + list(IGNORED) + ["auth", "1", "sha1", "crc", "eth0", "10.0.0.1", "239.0.0.1",
                                          "a", "b", "::", "/", "\\", "#", "//", "{{", "ms", "-", "0", "ü"]
lines = st.lists(st.sampled_from(WORDS) | st.text(max_size=6), max_size=6).map(" ".join)
files = st.lists(lines, max_size=8).map("\n".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hacf=files, keys=files, hares=st.none() | files)
def test_fuzzed_legacy_files_never_crash(tmp_path, hacf, keys, hares):
    for name in ("ha.cf", "authkeys", "haresources"):
        (tmp_path / name).unlink(missing_ok=True)
    path = write_dir(tmp_path, hacf, keys, hares)
    try:
        load(path, node="a")
    except ConfigError as exc:
        check_messages(exc.errors, path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_fuzzed_bytes_never_crash(tmp_path, data):
    for name in ("hastore.toml", "ha.cf"):
        (tmp_path / name).write_bytes(data)
        os.chmod(tmp_path / name, 0o600)
    (tmp_path / "authkeys").write_bytes(data)
    os.chmod(tmp_path / "authkeys", 0o600)
    for path in (tmp_path / "hastore.toml", tmp_path):
        try:
            load(str(path), node="a")
        except ConfigError as exc:
            assert not any("internal error" in e for e in exc.errors), exc.errors
