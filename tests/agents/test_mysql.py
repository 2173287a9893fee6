"""agents/mysql against a real MariaDB on a loop-mounted ext4 datadir (root; Debian's mariadb-server installed).

Each test gets its own datadir on one loop filesystem for the module, its own port and its own node-local
socket/pid under a 0755 tmp dir (the server runs as mysql and must reach them). Finalizers stop and then KILL any
server whose command line names a test's option file, unmount and detach the loop device, whatever happened.
"""

from __future__ import annotations

import itertools
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from ocftester import ocf_tester

from hastore.agentlib.mysql import default_paths

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
AGENT = str(REPO / "agents" / "mysql")
SMALL_INNODB = "[mysqld]\ninnodb_buffer_pool_size=32M\ninnodb_log_file_size=8M\n"


def _sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=60).stdout.strip()


def _kill_servers_under(prefix: str) -> None:
    """SIGCONT+SIGKILL every process whose command line mentions `prefix` (a test's own tmp dir)."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace")
        except OSError:
            continue
        if prefix in argv and int(entry) != os.getpid():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(int(entry), sig)
                except ProcessLookupError:
                    pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _pids_mentioning(prefix):
        time.sleep(0.1)


def _pids_mentioning(prefix: str) -> list[int]:
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if prefix.encode() in f.read():
                    with open(f"/proc/{entry}/stat") as st:
                        if st.read().rsplit(")", 1)[1].split()[0] != "Z":
                            out.append(int(entry))
        except (OSError, IndexError):
            continue
    return out


@pytest.fixture(scope="module")
def base():
    """A tmp dir the mysql user can traverse (pytest's own tmp dirs are 0700)."""
    shutil.which("mariadbd", path="/usr/sbin:/usr/bin") or pytest.fail(
        "mariadb-server is not installed (apt-get install -y mariadb-server mariadb-client)", pytrace=False)
    d = tempfile.mkdtemp(prefix="hastore-mysqltest-")
    os.chmod(d, 0o755)
    try:
        yield Path(d)
    finally:
        _kill_servers_under(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def loopfs(base):
    """An ext4 filesystem on a loop device, mounted under `base`: stands in for the DRBD-backed disk."""
    image, mnt = base / "disk.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    loop = _sh("losetup", "-f", "--show", str(image))
    try:
        _sh("mkfs.ext4", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1", loop)
        _sh("mount", loop, str(mnt))
        try:
            yield mnt
        finally:
            _kill_servers_under(str(base))
            for _ in range(50):
                if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.2)
            else:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


_serial = itertools.count()


def _free_port() -> int:
    for _ in range(200):
        port = random.randint(33000, 33999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 33000-33999")


def run_agent(action: str, params: dict[str, str], timeout_ms: int | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the agent as the runner does; capture_output also proves the server does not keep our pipes open."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCF_")}
    env.update({"OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": "test-mysql"})
    env.update({f"OCF_RESKEY_{k}": v for k, v in params.items()})
    if timeout_ms:
        env["OCF_RESKEY_CRM_meta_timeout"] = str(timeout_ms)
    return subprocess.run([AGENT, action], env=env, capture_output=True, text=True, timeout=timeout)


def sql(params: dict[str, str], statement: str) -> str:
    r = subprocess.run(["mariadb", "--no-defaults", f"--socket={params['socket']}", "-uroot", "-N", "-B",
                        "-e", statement], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def server_pid(params: dict[str, str]) -> int:
    return int(Path(params["pid"]).read_text().strip())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _make_params(base: Path, datadir: Path, name: str) -> dict[str, str]:
    run_dir = base / f"run-{name}"
    cnf = base / f"small-{name}.cnf"
    cnf.write_text(SMALL_INNODB)
    return {"datadir": str(datadir), "port": str(_free_port()), "bind_address": "127.0.0.1",
            "socket": f"{run_dir}/mysqld.sock", "pid": f"{run_dir}/mysqld.pid", "config": str(cnf)}


@pytest.fixture
def res(request, base, loopfs):
    """Parameters of one mysql resource with its own empty datadir (owned by mysql) on the loop filesystem."""
    name = f"t{next(_serial)}"  # short: the socket path must stay under 108 bytes
    datadir = loopfs / name / "data"
    datadir.mkdir(parents=True)
    ent = pwd.getpwnam("mysql")
    os.chown(datadir, ent.pw_uid, ent.pw_gid)
    params = _make_params(base, datadir, name)
    try:
        yield params
    finally:
        try:
            for pid in _pids_mentioning(str(base / f"run-{name}")):
                os.kill(pid, signal.SIGCONT)
            run_agent("stop", params, timeout_ms=10000, timeout=20)
        finally:
            _kill_servers_under(str(base / f"run-{name}"))


def test_start_initialises_and_data_survives_a_restart(res):
    assert run_agent("monitor", res).returncode == 7  # the probe before anything started
    r = run_agent("start", res)
    assert r.returncode == 0, r.stderr
    assert "initialising the empty datadir" in r.stderr
    assert os.path.isdir(os.path.join(res["datadir"], "mysql"))
    assert run_agent("monitor", res).returncode == 0
    pid = server_pid(res)
    assert os.getsid(pid) == pid, "the server must run in a session of its own, detached from the agent"

    again = run_agent("start", res)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr and server_pid(res) == pid

    sql(res, "CREATE DATABASE hs; CREATE TABLE hs.t (id INT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB; "
             "INSERT INTO hs.t VALUES (1, 'kept')")
    r = run_agent("stop", res)
    assert r.returncode == 0, r.stderr
    assert not alive(pid)
    assert run_agent("monitor", res).returncode == 7
    assert not os.path.lexists(res["pid"]) and not os.path.lexists(res["socket"])

    r = run_agent("start", res)
    assert r.returncode == 0, r.stderr
    assert "initialising" not in r.stderr
    assert sql(res, "SELECT v FROM hs.t WHERE id = 1") == "kept"
    assert run_agent("stop", res).returncode == 0
    assert run_agent("stop", res).returncode == 0  # stopping a stopped server succeeds


def test_kill_9_then_start_recovers_the_data(res):
    assert run_agent("start", res).returncode == 0
    sql(res, "CREATE DATABASE hs; CREATE TABLE hs.t (id INT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB; "
             "INSERT INTO hs.t VALUES (7, 'committed')")
    pid = server_pid(res)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    assert os.path.exists(res["pid"]), "a killed server leaves its pid file behind"
    m = run_agent("monitor", res)
    assert m.returncode == 7, m.stderr

    r = run_agent("start", res)  # InnoDB crash recovery
    assert r.returncode == 0, r.stderr
    assert "removing stale" in r.stderr
    assert server_pid(res) != pid
    assert sql(res, "SELECT v FROM hs.t WHERE id = 7") == "committed"
    assert run_agent("stop", res).returncode == 0


def test_a_server_of_another_node_sharing_the_kernel_is_not_ours(res):
    """In the namespace lab both nodes see every process: the other node's server (same datadir path, same
    command line) must be neither reported running here nor stopped from here."""
    assert run_agent("start", res).returncode == 0
    pid = server_pid(res)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCF_")}
    env.update({"OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": "test-mysql"})
    env.update({f"OCF_RESKEY_{k}": v for k, v in res.items()})
    # The other node: its own mount namespace and its own (empty) node-local run directory.
    run_dir = os.path.dirname(res["pid"])
    other = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs other-node "$1" && shift && exec "$@"', "other", run_dir, AGENT]
    for action, rc in (("monitor", 7), ("stop", 0)):
        r = subprocess.run([*other, action], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == rc, (action, r.stderr)
    assert alive(pid), "the other node's stop left this node's server alone"
    assert run_agent("monitor", res).returncode == 0, "and it is still found here (by its command line)"


def test_stop_kills_a_server_that_ignores_term(res):
    assert run_agent("start", res).returncode == 0
    pid = server_pid(res)
    os.kill(pid, signal.SIGSTOP)  # a hung server: TERM stays pending
    m = run_agent("monitor", res, timeout_ms=3000)
    assert m.returncode == 1, (m.returncode, m.stderr)  # running, but the query does not answer

    t0 = time.monotonic()
    r = run_agent("stop", res, timeout_ms=6000)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert "sending KILL" in r.stderr
    assert took < 6, f"stop took {took:.1f} s, past its 6 s timeout"
    assert not alive(pid)
    assert run_agent("monitor", res).returncode == 7
    assert not os.path.lexists(res["pid"]) and not os.path.lexists(res["socket"])

    r = run_agent("start", res)  # and the killed server's datadir starts again
    assert r.returncode == 0, r.stderr
    assert run_agent("stop", res).returncode == 0


def test_refuses_what_it_must_not_touch(base, loopfs):
    missing = _make_params(base, loopfs / "nowhere" / "data", "refuse-missing")
    r = run_agent("start", missing)
    assert r.returncode == 6 and "does not exist" in r.stderr, r.stderr
    assert run_agent("monitor", missing).returncode == 7
    assert run_agent("stop", missing).returncode == 0

    foreign = loopfs / "refuse-foreign"
    foreign.mkdir()
    (foreign / "precious.dat").write_text("not a database")
    r = run_agent("start", _make_params(base, foreign, "refuse-foreign"))
    assert r.returncode == 6 and "holds no mysql/ system tables" in r.stderr, r.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["precious.dat"]

    on_root = base / "refuse-rootfs"  # an unmounted shared disk looks like this: an empty dir on /
    on_root.mkdir()
    r = run_agent("start", _make_params(base, on_root, "refuse-rootfs"))
    assert r.returncode == 6 and "root filesystem" in r.stderr, r.stderr
    assert list(on_root.iterdir()) == []
    assert not (base / "run-refuse-rootfs").exists(), "a refused start writes nothing node-local"

    r = run_agent("start", dict(missing, config=str(base / "no-such.cnf")))
    assert r.returncode == 6 and "no-such.cnf" in r.stderr, r.stderr
    assert run_agent("monitor", dict(missing, config=str(base / "no-such.cnf"))).returncode == 7

    bad = dict(missing, port="99999", user="no-such-user-hs", initialize="maybe", socket="/run/" + "s" * 120)
    r = run_agent("validate-all", bad)
    assert r.returncode == 6
    for word in ("port '99999'", "no-such-user-hs", "initialize 'maybe'", "longer than the 107 bytes"):
        assert word in r.stderr, r.stderr
    assert run_agent("validate-all", {}).returncode == 6  # datadir is required
    r = run_agent("start", dict(missing, binary="/nonexistent/mariadbd"))
    assert r.returncode == 5 and "not installed" in r.stderr, r.stderr
    assert run_agent("stop", dict(missing, binary="/nonexistent/mariadbd")).returncode == 0
    assert not _pids_mentioning(str(base / "run-refuse"))


def test_failed_initialisation_and_failed_start_leave_nothing_behind(res, base):
    bad_cnf = base / "bad-option.cnf"
    bad_cnf.write_text("[mysqld]\nno-such-option-hs=1\n")
    r = run_agent("start", dict(res, config=str(bad_cnf)))
    assert r.returncode == 1, r.stderr
    assert "failed" in r.stderr and "no-such-option-hs" in r.stderr and "empty again" in r.stderr
    assert os.listdir(res["datadir"]) == [], "a failed initialisation leaves the datadir empty for a retry"
    assert run_agent("monitor", res).returncode == 7

    assert run_agent("start", res).returncode == 0  # initialises this time
    assert run_agent("stop", res).returncode == 0
    t0 = time.monotonic()
    r = run_agent("start", dict(res, additional_parameters="--no-such-option-hs"))
    assert r.returncode == 1 and "exited" in r.stderr and "no-such-option-hs" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10, "a server that dies at once is reported at once, not at the timeout"
    assert run_agent("monitor", res).returncode == 7
    assert not _pids_mentioning(os.path.dirname(res["pid"]))
    r = run_agent("start", res)
    assert r.returncode == 0, r.stderr
    assert run_agent("stop", res).returncode == 0


def test_ocf_tester_passes_with_the_default_node_local_paths(res):
    params = {k: v for k, v in res.items() if k not in ("socket", "pid")}
    sock, pid = default_paths(params["datadir"])  # /run/hastore-mysql/HASH.*, HASH from this test's datadir
    try:
        r = ocf_tester(AGENT, params, timeout=120)  # raises AssertionError with ocf-tester's output on failure
        assert "passed all tests" in r.stdout
        assert not _pids_mentioning(pid.removesuffix(".pid")), "ocf-tester's last stop left the server running"
        assert not os.path.lexists(sock) and not os.path.lexists(pid)
    finally:
        run_agent("stop", params, timeout_ms=10000, timeout=20)
        _kill_servers_under(pid.removesuffix(".pid") + ".cnf")
