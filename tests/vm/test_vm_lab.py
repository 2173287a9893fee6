"""Real DRBD 8.4 in two qemu guests (hastore.lab.vm): initial sync, the drbd agent on an Outdated disk, and hastore
failing the group drbd -> Filesystem -> IPaddr -> mysql over when the active guest is powered off, then back with
auto_failback on; beside it the NFS example group (drbd r1 -> Filesystem -> IPaddr -> nfsserver) on the other guest.

One lab for the module (booting takes ~20 s).  The tests run in file order and build on each other.  Real command
outputs are captured on the way (HASTORE_CAPTURE_FIXTURES=1 writes them to tests/fixtures/drbd/real/, which the
parser tests in tests/unit read).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from hastore.lab.vm import wiring as w
from hastore.lab.vm.lab import wait_until

pytestmark = pytest.mark.vm

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "drbd" / "real"
# HASTORE_CAPTURE_FIXTURES=1 refreshes the committed fixtures; otherwise the outputs go to a scratch directory
# (counters differ from run to run: a test run must not leave the checkout modified).
CAPTURED = REAL if os.environ.get("HASTORE_CAPTURE_FIXTURES") == "1" else \
    Path(tempfile.gettempdir()) / f"hastore-drbd-captured-{os.getpid()}"
CAPTURE = {
    "proc_drbd": ["cat", "/proc/drbd"],
    "role": ["drbdadm", "role", "r0"],
    "cstate": ["drbdadm", "cstate", "r0"],
    "dstate": ["drbdadm", "dstate", "r0"],
    "events2": ["drbdsetup", "events2", "--now", "r0"],
    "status": ["drbdsetup", "status", "r0", "--color=never"],
    "sh_minor": ["drbdadm", "sh-minor", "r0"],
}
AGENT = ["python3", "/hastore/agents/drbd"]
VIP_IP = w.VIP.split("/")[0]
NFS_IP = w.NFS_VIP.split("/")[0]
AGENT_ENV = {"OCF_RESKEY_resource": "r0", "OCF_RESKEY_wait_connect_s": "0", "OCF_ROOT": "/usr/lib/ocf",
             "PYTHONPATH": "/hastore"}


def require_qemu() -> None:
    if shutil.which("qemu-system-x86_64") and shutil.which("mmdebstrap"):
        return
    why = "needs qemu-system-x86_64 and mmdebstrap (scripts/install-deps)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why}; CI=true does not allow skipping it", pytrace=False)
    pytest.skip(why)


def wait_group(vm, what: str, node: str, group: str = "group1"):
    """Until the group runs on node, or 240 s; a timeout shows both guests' `hastore status` and console tail."""
    return wait_until(what, lambda: vm.group_on(node, group), 240, step=1.0,
                      explain=lambda: vm.explain("alpha", "bravo"))


@pytest.fixture(scope="module")
def vm(as_root):
    require_qemu()
    from hastore.lab.vm.lab import VmLab
    d = Path(tempfile.mkdtemp(prefix="hastore-vmtest-"))
    lab = VmLab(d)
    try:
        t0 = time.monotonic()
        lab.up(provision=("configure",))
        print(f"\nlab up (image cached or built, two guests booted, configured) in {time.monotonic() - t0:.1f} s")
        yield lab
    finally:
        lab.down()
        shutil.rmtree(d, ignore_errors=True)
        if CAPTURED != REAL:
            shutil.rmtree(CAPTURED, ignore_errors=True)


def sh(lab, node: str, cmd: str, timeout: float = 60) -> str:
    rc, out, err = lab.exec(node, ["sh", "-c", cmd], timeout=timeout)
    assert rc == 0, f"{node}: `{cmd}` exited {rc}: {err.strip()}"
    return out


def capture(lab, node: str, state: str) -> None:
    """Save what each DRBD command prints in this state (stderr too, with the exit code, when it fails)."""
    CAPTURED.mkdir(parents=True, exist_ok=True)
    for name, argv in CAPTURE.items():
        rc, out, err = lab.exec(node, argv, timeout=20)
        (CAPTURED / f"{state}-{name}.txt").write_text(out)
        if rc != 0 or err.strip():
            (CAPTURED / f"{state}-{name}.stderr").write_text(f"# exit code {rc}\n{err}")


def dstate(lab, node: str) -> str:
    return lab.exec(node, ["drbdadm", "dstate", "r0"], timeout=10)[1].strip()


def cstate(lab, node: str) -> str:
    return lab.exec(node, ["drbdadm", "cstate", "r0"], timeout=10)[1].strip()


# ---------------------------------------------------------------------------------------------------------------
def test_boot_connect_and_initial_sync(vm):
    vm.provision("bravo", "drbd")                        # create-md + up; bravo is not the preferred node
    sh(vm, "alpha", "drbdadm create-md --force r0 >/dev/null 2>&1; drbdadm up r0")
    wait_until("r0 connected", lambda: cstate(vm, "alpha") == "Connected", 30)
    assert dstate(vm, "alpha") == "Inconsistent/Inconsistent"
    capture(vm, "alpha", "secondary-inconsistent")
    t0 = time.monotonic()
    vm.provision("alpha", "drbd")
    took = time.monotonic() - t0
    print(f"initial setup on alpha (force primary, mkfs, MariaDB datadir, 256 MiB sync, demote): {took:.1f} s")
    assert dstate(vm, "alpha") == "UpToDate/UpToDate"
    assert dstate(vm, "bravo") == "UpToDate/UpToDate"
    assert vm.exec("alpha", ["drbdadm", "role", "r0"])[1].strip() == "Secondary/Secondary"
    capture(vm, "alpha", "secondary-uptodate")
    # A resync watched from both sides: alpha, Primary, rewrites bravo's copy (invalidate-remote) at a fixed rate
    # slow enough to be seen (each look is a command in a TCG guest). Not the initial sync: twice in CI it was over
    # between two looks (mkfs discards the whole device, which may leave DRBD little to sync).
    for node in ("alpha", "bravo"):
        sh(vm, node, "drbdadm disk-options --c-plan-ahead=0 --resync-rate=16M r0")
    sh(vm, "alpha", "drbdadm primary r0 && drbdadm invalidate-remote r0")
    wait_until("alpha SyncSource", lambda: cstate(vm, "alpha") == "SyncSource", 30)
    capture(vm, "alpha", "syncsource")
    capture(vm, "bravo", "synctarget")
    seen = {st: (CAPTURED / f"{st}-cstate.txt").read_text().strip() for st in ("syncsource", "synctarget")}
    assert seen == {"syncsource": "SyncSource", "synctarget": "SyncTarget"}, seen
    wait_until("the resync", lambda: dstate(vm, "alpha") == "UpToDate/UpToDate"
               and dstate(vm, "bravo") == "UpToDate/UpToDate", 120)
    for node in ("alpha", "bravo"):  # back to the lab's configured rate (vagrant/provision.sh)
        sh(vm, node, "drbdadm disk-options --c-plan-ahead=0 --resync-rate=100M r0")
    capture(vm, "alpha", "primary-uptodate")
    capture(vm, "bravo", "secondary-peer-primary")
    sh(vm, "alpha", "drbdadm secondary r0")


def test_drbd_agent_refuses_to_promote_an_outdated_disk(vm):
    sh(vm, "bravo", "drbdadm disconnect r0 && drbdadm outdate r0")
    wait_until("alpha waiting for its peer", lambda: cstate(vm, "alpha") == "WFConnection", 20)
    capture(vm, "bravo", "outdated-standalone")
    capture(vm, "alpha", "wfconnection")
    rc, out, err = vm.exec("bravo", [*AGENT, "start"], env=AGENT_ENV)
    print(f"drbd agent start on the Outdated disk: exit {rc}: {err.strip()}")
    assert rc == 1
    assert "refusing to promote r0: its local disk is Outdated, not UpToDate" in err
    assert vm.exec("bravo", ["drbdadm", "role", "r0"])[1].strip().startswith("Secondary")
    assert vm.exec("bravo", [*AGENT, "monitor"], env=AGENT_ENV)[0] == 7
    sh(vm, "bravo", "drbdadm connect r0")
    wait_until("resync after reconnect", lambda: dstate(vm, "bravo") == "UpToDate/UpToDate", 60)


def test_hastore_fails_the_group_over_when_the_active_guest_is_powered_off(vm):
    vm.provision_all("start")  # both daemons at once, as both nodes boot together: they meet within initdead
    t0 = time.monotonic()
    wait_group(vm, "the group running on alpha", "alpha")
    print(f"group started on alpha {time.monotonic() - t0:.1f} s after hastore started")
    # the second example group: an NFS export on r1, preferred by bravo; alpha mounts it through its VIP
    wait_group(vm, "the NFS group running on bravo", "bravo", "group2")
    print(f"NFS group started on bravo {time.monotonic() - t0:.1f} s after hastore started")
    sh(vm, "alpha", f"mkdir -p /mnt/nfs && mount -t nfs -o vers=3,nolock,soft,timeo=50,retrans=2 "
                    f"{NFS_IP}:/srv/nfs/export /mnt/nfs && echo written-through-nfs > /mnt/nfs/from-alpha "
                    f"&& umount /mnt/nfs", timeout=120)
    assert sh(vm, "bravo", "cat /srv/nfs/export/from-alpha").strip() == "written-through-nfs"
    r = vm.sql("CREATE TABLE IF NOT EXISTS w (id INT PRIMARY KEY, at VARCHAR(20))")
    assert r.returncode == 0, r.stderr
    acked = []
    for i in range(1, 21):
        if vm.sql(f"INSERT INTO w VALUES ({i}, @@hostname)").returncode == 0:
            acked.append(i)
    assert len(acked) == 20
    t0 = time.monotonic()
    vm.fault("alpha", "poweroff")
    first = None
    i = 100
    while first is None and time.monotonic() - t0 < 240:
        i += 1
        if vm.sql(f"INSERT INTO w VALUES ({i}, @@hostname)", timeout=3).returncode == 0:
            first = time.monotonic() - t0
            acked.append(i)
        else:
            time.sleep(0.2)
    assert first is not None, "no write through the VIP within 240 s of the power-off"
    print(f"alpha powered off: first write through the VIP on bravo {first:.1f} s after the fault")
    assert vm.group_on("bravo")
    rows = vm.sql("SELECT id, at FROM w").stdout.split("\n")
    stored = {int(line.split()[0]) for line in rows if line.strip()}
    assert set(acked) <= stored, f"acknowledged writes lost: {sorted(set(acked) - stored)}"
    assert "bravo" in vm.sql("SELECT @@hostname").stdout
    assert vm.group_on("bravo", "group2"), "the NFS group stays on bravo, its preferred node"
    # alpha comes back: it rejoins as Secondary and resyncs from bravo (no split brain); the group stays put.
    vm.fault("alpha", "start")
    vm.provision("alpha", "configure")
    vm.provision("alpha", "drbd")
    wait_until("alpha resynced", lambda: dstate(vm, "alpha") == "UpToDate/UpToDate", 120)
    assert cstate(vm, "alpha") == "Connected" and cstate(vm, "bravo") == "Connected"
    assert vm.exec("alpha", ["drbdadm", "role", "r0"])[1].strip() == "Secondary/Primary"
    vm.provision("alpha", "start")
    time.sleep(10)
    assert vm.group_on("bravo"), "auto_failback off: the group stays on bravo"
    assert set(acked) <= {int(x.split()[0]) for x in vm.sql("SELECT id FROM w").stdout.split("\n") if x.strip()}
    # auto_failback on (as an admin would: edit ha.cf, reload): the group goes home to alpha, never on both nodes
    for node in ("alpha", "bravo"):
        sh(vm, node, "sed -i 's/^auto_failback .*/auto_failback on/' /etc/ha.d/ha.cf && hastore reload")
    t0 = time.monotonic()
    both, samples = [], 0
    while not vm.group_on("alpha") and time.monotonic() - t0 < 240:
        holders = [n for n in ("alpha", "bravo") if VIP_IP in vm.exec(n, ["ip", "-o", "addr", "show"], timeout=20)[1]]
        samples += 1
        if len(holders) == 2:
            both.append(round(time.monotonic() - t0, 1))
    assert vm.group_on("alpha"), "auto_failback on: the group did not return to alpha within 240 s"
    print(f"auto_failback: the group is back on alpha {time.monotonic() - t0:.1f} s after the reload "
          f"({samples} samples of both nodes' addresses on the way)")
    assert not both, f"the VIP was on both nodes at {both} s"
    assert vm.exec("bravo", ["drbdadm", "role", "r0"])[1].strip() == "Secondary/Primary"
    stored = {int(x.split()[0]) for x in vm.sql("SELECT id FROM w").stdout.split("\n") if x.strip()}
    assert set(acked) <= stored, f"acknowledged writes lost in the failback: {sorted(set(acked) - stored)}"
    assert vm.group_on("bravo", "group2"), "the NFS group is bravo's: it does not move"


def peer_view(lab, node: str, peer: str) -> tuple[bool, dict[str, bool]]:
    """(peer alive, {link kind: up}) as `hastore status --json` on `node` shows them (link ids are like
    ucast:eth1:10.93.0.1 and serial:/dev/ttyS1)."""
    rc, text, err = lab.exec(node, ["hastore", "status", "--json"], timeout=30)
    assert rc == 0, f"hastore status on {node}: {err.strip()}"
    p = json.loads(text)["peers"][peer]
    return p["alive"], {link.split(":")[0]: v["up"] for link, v in p["links"].items()}


def test_fault_kinds_serial_down_then_kill_of_the_holders_daemon(vm):
    """The lab's other faults on real DRBD: the serial path down moves nothing; kill -9 of the holder's daemon makes
    its guard stop the group, and the peer takes it over."""
    assert vm.group_on("alpha") and vm.group_on("bravo", "group2"), "the previous test leaves group1 on alpha"
    vm.fault("alpha", "link-down", "serial")
    wait_until("bravo sees alpha over ucast only", lambda: peer_view(vm, "bravo", "alpha") ==
               (True, {"ucast": True, "serial": False}), 60, step=1.0)
    vm.fault("alpha", "heal")
    wait_until("both links up again", lambda: peer_view(vm, "bravo", "alpha") ==
               (True, {"ucast": True, "serial": True}), 60, step=1.0)
    # Not here: the replication NIC down (ucast and DRBD gone, serial left). Under TCG a guest stalls for a second
    # now and then, serial alone then misses deadtime, the peer takes over, and DRBD without fencing lets it: split
    # brain. tests/scenarios covers that fault on the namespace lab; DRBD fencing is a later piece of work.
    r = vm.sql("INSERT INTO w VALUES (1000, 'after-heal')")
    assert r.returncode == 0, r.stderr
    assert vm.group_on("alpha") and vm.group_on("bravo", "group2"), "one path down: nothing moves"
    acked = {int(x.split()[0]) for x in vm.sql("SELECT id FROM w").stdout.split("\n") if x.strip()}
    assert 1000 in acked
    # kill -9 of the holder's daemon: the node is up, its resources must not stay beside the peer's
    t0 = time.monotonic()
    vm.fault("alpha", "kill")
    wait_group(vm, "the group taken over by bravo", "bravo")
    print(f"\nkill -9 of alpha's daemon: group running on bravo {time.monotonic() - t0:.1f} s later")
    assert VIP_IP not in vm.exec("alpha", ["ip", "-o", "addr", "show"], timeout=20)[1], "VIP left on alpha"
    assert " /data " not in vm.exec("alpha", ["cat", "/proc/mounts"], timeout=20)[1], "/data still mounted on alpha"
    assert vm.exec("alpha", ["drbdadm", "role", "r0"])[1].strip() == "Secondary/Primary"
    log = vm.exec("alpha", ["cat", "/var/log/hastore.log"], timeout=20)[1]
    assert "self-fencing done" in log and "held resource(s) stopped" in log, "no guard fencing in alpha's log"
    stored = {int(x.split()[0]) for x in vm.sql("SELECT id FROM w").stdout.split("\n") if x.strip()}
    assert acked <= stored, f"acknowledged writes lost: {sorted(acked - stored)}"
