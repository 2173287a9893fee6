"""agents/Filesystem on a real ext4 loop device, inside a private mount namespace.

The namespace keeps our mounts out of the host's table (and out of copies other test runs take
when they create lab nodes), and dies with its holder process, which releases every mount even
when a test fails half way; the loop device is then detached.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from ocftester import ocf_tester

from hastore.agentlib import proc

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "agents" / "Filesystem"


@dataclass
class Disk:
    ns: list[str]          # command prefix entering the private mount namespace
    holder: int            # pid of the namespace's holder process
    image: Path
    device: str            # /dev/loopN
    mnt: Path              # mount point (not created: the agent makes it)

    def run(self, argv, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run([*self.ns, *map(str, argv)], **kw)

    def agent(self, action: str, timeout_ms: int | None = None, **params: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OCF_")}
        env["PYTHONPATH"] = str(REPO)
        env["OCF_RESOURCE_INSTANCE"] = "data"
        if timeout_ms is not None:
            env["OCF_RESKEY_CRM_meta_timeout"] = str(timeout_ms)
        params = {"device": self.device, "directory": str(self.mnt), "fstype": "ext4", **params}
        env.update({f"OCF_RESKEY_{k}": v for k, v in params.items() if v is not None})
        return self.run([AGENT, action], env=env)

    def mounted(self) -> list[proc.Mount]:
        """Mounts on the mount point as the namespace sees them."""
        info = Path(f"/proc/{self.holder}/mountinfo").read_text()
        return [m for m in proc.parse_mountinfo(info) if m.mount_point == str(self.mnt)]


@pytest.fixture
def disk():
    require_tools("losetup", "mkfs.ext4", "fsck", "unshare", "nsenter", "mount", "umount")
    workdir = Path(tempfile.mkdtemp(prefix="hastore-fs-"))
    holder = None
    device = None
    try:
        holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                   "echo ready; exec sleep infinity"], stdout=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, text=True, cwd="/")
        assert holder.stdout.readline().strip() == "ready"
        image = workdir / "disk.img"
        subprocess.run(["truncate", "-s", "64M", image], check=True)
        device = subprocess.run(["losetup", "-f", "--show", image], check=True, capture_output=True,
                                text=True).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
        yield Disk(["nsenter", "-t", str(holder.pid), "-m", "--"], holder.pid, image, device,
                   workdir / "mnt")
    finally:
        if holder is not None:
            # Unmount politely (processes the test started are gone by now), then drop the namespace.
            ns = ["nsenter", "-t", str(holder.pid), "-m", "--"]
            for _ in range(3):
                if subprocess.run([*ns, "umount", workdir / "mnt"], capture_output=True).returncode:
                    break
            kill_namespace(holder.pid)
            holder.wait()
            holder.stdout.close()
        if device:
            detach(device, (workdir / "disk.img").resolve())
        shutil.rmtree(workdir, ignore_errors=True)


def kill_namespace(holder: int) -> None:
    """SIGKILL every process in the holder's mount namespace (the holder last): once they are
    gone the namespace, and every mount in it, goes with them."""
    try:
        ns = os.readlink(f"/proc/{holder}/ns/mnt")
    except OSError:
        return                          # the holder is gone, and with it the namespace
    for pid in [int(e) for e in os.listdir("/proc") if e.isdigit()]:
        try:
            if pid != holder and os.readlink(f"/proc/{pid}/ns/mnt") == ns:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.kill(holder, signal.SIGKILL)


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    assert not missing, f"missing tools: {', '.join(missing)} (util-linux, mount, e2fsprogs)"


def detach(device: str, image: Path) -> None:
    """losetup -d, retried while the kernel releases the namespace's last mount.  Only while the
    device still carries our image: once free, another test may attach it to something else."""
    deadline = time.monotonic() + 10
    while True:
        backing = proc.loop_backing(os.stat(device).st_rdev)
        if backing != str(image):
            return
        res = subprocess.run(["losetup", "-d", device], capture_output=True, text=True)
        if res.returncode == 0 and proc.loop_backing(os.stat(device).st_rdev) != str(image):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"loop device {device} stays attached to {image}: "
                                 f"{res.stderr.strip()}")
        time.sleep(0.1)


@pytest.fixture
def spawn(disk):
    """Popen that kills what it started at teardown (before `disk` unmounts and detaches)."""
    started: list[subprocess.Popen] = []

    def popen(argv, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("cwd", "/")
        p = subprocess.Popen(argv, **kw)
        started.append(p)
        return p

    yield popen
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stdout:
            p.stdout.close()


def sleeper_in(disk: Disk, spawn, directory: Path) -> subprocess.Popen:
    """`sleep` in the namespace with its cwd in `directory` as the namespace sees it."""
    p = spawn([*disk.ns, "sh", "-c", 'cd "$1" && echo ready && exec sleep 300', "sh", str(directory)],
              stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def python_in(disk: Disk, spawn, code: str) -> subprocess.Popen:
    """python3 in the namespace running `code`, once it printed 'ready'."""
    p = spawn([*disk.ns, "python3", "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


# ------------------------------------------------------------------ tests
def test_filesystem_mountinfo_parsing():
    text = ("36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=x\n"
            "37 35 0:5 / /proc rw - proc proc rw\n")
    a, b = proc.parse_mountinfo(text)
    assert (a.mount_point, a.root, a.fstype, a.source, a.dev) == \
        ("/mnt/with space", "/mnt1", "ext3", "/dev/root", os.makedev(98, 0))
    assert (b.mount_id, b.parent_id, b.fstype) == (37, 35, "proc")


def test_filesystem_start_stop_idempotent_with_fsck(disk):
    assert disk.agent("monitor").returncode == 7
    res = disk.agent("start", options="noatime", fsck="yes")
    assert res.returncode == 0, res.stderr
    assert f"fsck {disk.device}: {disk.device}: clean" in res.stderr    # e2fsck -a ran
    [m] = disk.mounted()
    assert (m.source, m.fstype, m.dev) == (disk.device, "ext4", os.stat(disk.device).st_rdev)
    assert disk.agent("monitor").returncode == 0
    res = disk.agent("start")
    assert res.returncode == 0 and "already mounted" in res.stderr
    assert len(disk.mounted()) == 1
    res = disk.agent("stop")
    assert res.returncode == 0, res.stderr
    assert disk.mounted() == []
    assert disk.agent("monitor").returncode == 7
    res = disk.agent("stop")
    assert res.returncode == 0 and "not mounted" in res.stderr
    res = disk.agent("start", fsck="no")
    assert res.returncode == 0 and "fsck" not in res.stderr
    assert disk.agent("stop").returncode == 0
    res = disk.agent("start")  # auto: ext4 replays its journal at mount, as resource-agents' Filesystem trusts
    assert res.returncode == 0 and f"not checking {disk.device}: ext4 replays its journal" in res.stderr, res.stderr
    assert f"fsck {disk.device}:" not in res.stderr
    assert disk.agent("stop").returncode == 0


def test_filesystem_stop_terms_then_kills_users(disk, spawn):
    disk.mnt.mkdir()
    # cwd in the directory *under* the mount (host namespace): does not keep it busy, must survive
    bystander = spawn(["sleep", "300"], cwd=disk.mnt)
    assert disk.agent("start").returncode == 0
    polite = sleeper_in(disk, spawn, disk.mnt)
    stubborn = python_in(disk, spawn, "import signal, time\n"
                                      "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                      f"f = open('{disk.mnt}/held', 'w')\n"
                                      "print('ready', flush=True)\n"
                                      "time.sleep(300)\n")
    t0 = time.monotonic()
    res = disk.agent("stop", timeout_ms=4000)    # TERM for up to 2 s, then KILL
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert polite.wait(5) == -signal.SIGTERM
    assert stubborn.wait(5) == -signal.SIGKILL
    assert bystander.poll() is None, "a process outside the mount was killed"
    assert 1.8 <= took < 4.0, took
    assert f"sent SIGTERM to {polite.pid} (sleep), which holds cwd" in res.stderr
    assert f"sent SIGKILL to {stubborn.pid} (python3), which holds fd" in res.stderr
    assert disk.mounted() == []
    assert disk.agent("monitor").returncode == 7


def test_filesystem_no_force_unmount_fails_with_users_named(disk, spawn):
    assert disk.agent("start").returncode == 0
    user = sleeper_in(disk, spawn, disk.mnt)
    res = disk.agent("stop", timeout_ms=2000, force_unmount="false")
    assert res.returncode == 1
    assert "cannot unmount" in res.stderr and f"{user.pid} (sleep)" in res.stderr
    assert user.poll() is None and len(disk.mounted()) == 1
    user.kill()
    user.wait()
    assert disk.agent("stop").returncode == 0


def test_filesystem_symlink_and_image_file_devices(disk):
    link = disk.image.parent / "dev-link"
    link.symlink_to(disk.device)
    assert disk.agent("start", device=str(link)).returncode == 0
    # the same device by any name is the same mount
    assert disk.agent("monitor", device=disk.device).returncode == 0
    assert disk.agent("monitor", device=str(disk.image)).returncode == 0    # loop backing file
    res = disk.agent("start", device=str(disk.image))
    assert res.returncode == 0 and "already mounted" in res.stderr
    assert disk.agent("stop", device=str(disk.image)).returncode == 0
    assert disk.mounted() == []


def test_filesystem_refuses_foreign_mount_on_directory(disk):
    disk.mnt.mkdir()
    assert disk.run(["mount", "-t", "tmpfs", "hastore-other", disk.mnt]).returncode == 0
    res = disk.agent("start")
    assert res.returncode == 1
    assert "already has hastore-other (tmpfs) mounted on it" in res.stderr
    assert disk.agent("monitor").returncode == 7
    res = disk.agent("stop")
    assert res.returncode == 0                      # ours is not there: nothing to stop
    assert [m.fstype for m in disk.mounted()] == ["tmpfs"]
    assert disk.run(["umount", disk.mnt]).returncode == 0


def test_filesystem_fsck_failure_blocks_mount(disk):
    # Zero the primary superblock: e2fsck -a gives up (exit 8) and the start must not mount.
    with open(disk.device, "r+b") as dev:
        dev.seek(1024)
        dev.write(b"\0" * 1024)
    res = disk.agent("start", fsck="yes")
    assert res.returncode == 1, res.stderr
    assert f"fsck of {disk.device} exited 8 (operational error); not mounting it" in res.stderr
    assert disk.mounted() == []


def test_filesystem_unsafe_configuration(disk):
    for params, code, words in [
        ({"directory": "/"}, 6, "refusing to mount on /"),
        ({"directory": "data/x"}, 6, "must be an absolute path"),
        ({"directory": "/srv/../etc"}, 6, "must be an absolute path"),
        ({"directory": "/usr/"}, 6, "refusing to mount on /usr"),
        ({"device": "dev/sdz"}, 6, "relative path"),
        ({"fsck": "maybe"}, 6, "fsck must be"),
        ({"force_unmount": "perhaps"}, 6, "force_unmount must be"),
        ({"device": "/dev/hastore-no-such-disk"}, 5, "does not exist on this node"),
    ]:
        for action in ("validate-all", "start"):
            res = disk.agent(action, **params)
            assert res.returncode == code and words in res.stderr, (params, action, res.stderr)
    assert disk.agent("monitor", device="/dev/hastore-no-such-disk").returncode == 7
    assert disk.agent("stop", device="/dev/hastore-no-such-disk").returncode == 0
    assert disk.agent("start", directory=None).returncode == 6


def test_filesystem_passes_ocf_tester(disk):
    try:
        ocf_tester(AGENT, {"device": disk.device, "directory": str(disk.mnt), "fstype": "ext4"},
                   prefix=disk.ns)
    finally:
        disk.agent("stop")
    assert disk.mounted() == []


def test_filesystem_fsck_auto_checks_ext2(disk):
    """ext2 has no journal: auto checks it before mounting (and finds the type by blkid when fstype is empty)."""
    subprocess.run(["mkfs.ext2", "-q", "-F", disk.device], check=True, capture_output=True)
    res = disk.agent("start", fstype=None)
    assert res.returncode == 0, res.stderr
    assert f"fsck {disk.device}: {disk.device}: clean" in res.stderr
    assert [m.fstype for m in disk.mounted()] == ["ext2"]
    assert disk.agent("stop").returncode == 0
