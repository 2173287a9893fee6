"""agents/nfsserver (root; nfs-kernel-server installed).

What this machine cannot test: its kernel has no nfsd (not in /proc/filesystems, no modules to load, no
/proc/fs/nfsd), so start, monitor and stop of a running NFS server -- mounting the nfsd filesystem, rpcbind,
rpc.statd, `exportfs -o`, `rpc.nfsd N` / `rpc.nfsd 0`, rpc.mountd, parsing the live `exportfs -v`, client
locks surviving a failover -- never run here. On such a kernel the honest test is the agent's own answer: exit 5
(ERR_INSTALLED) with its sentence on start, monitor and validate-all, and stop succeeding with nothing to stop.
Where the kernel has nfsd, test_the_kernel_decides_exit_5_or_ocf_tester runs ocf-tester instead (it touches the real
/var/lib/nfs, rpcbind and the exports table of the machine, so it is meant for a throwaway VM).

What is tested everywhere: the parameter checks of validate-all (they come before the kernel check), the
meta-data against the OCF DTD, the parsers of `exports` and of `exportfs -v` on literal text, the first-start
layout of shared_dir (a copy of state_dir that never overwrites) and the bind mount of shared_dir over
state_dir, in tmp dirs through the state_dir parameter, including stop removing a bind left behind.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from ocftester import ocf_tester

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
AGENT = str(REPO / "agents" / "nfsserver")


def _load_agent():
    loader = importlib.machinery.SourceFileLoader("hastore_agent_nfsserver", AGENT)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


nfs = _load_agent()
KERNEL_PROBLEM = nfs.kernel_problem()


def run_agent(action: str, params: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCF_")}
    env.update({"OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": "test-nfs"})
    env.update({f"OCF_RESKEY_{k}": v for k, v in params.items()})
    return subprocess.run([AGENT, action], env=env, capture_output=True, text=True, timeout=timeout)


def _unmount_all_below(path: str) -> None:
    for _ in range(10):
        if not nfs.mounts_at_or_below(path):
            return
        for point in sorted(nfs.mounts_at_or_below(path), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


@pytest.fixture
def dirs():
    """A fake node-local state dir (the layout nfs-common/nfs-kernel-server give /var/lib/nfs) and an empty
    shared dir, both under one tmp dir; anything left mounted there is unmounted afterwards."""
    top = Path(tempfile.mkdtemp(prefix="hastore-nfstest-"))
    state, shared, export = top / "state", top / "shared", top / "export"
    for d in (state, shared, export, state / "sm", state / "sm.bak", state / "v4recovery"):
        d.mkdir()
    (state / "etab").write_text("")
    (state / "rmtab").write_text("")
    (state / "state").write_bytes(b"\x02\x00\x00\x00")
    (state / "sm" / "client.example").write_text("monitored\n")
    os.chown(state / "sm", 65534, 65534)
    os.chown(state / "state", 65534, 0)
    os.chmod(state / "sm", 0o700)
    try:
        yield {"top": top, "state": state, "shared": shared, "export": export}
    finally:
        _unmount_all_below(str(top))
        shutil.rmtree(top, ignore_errors=True)


def test_validate_all_checks_parameters_before_the_kernel(dirs):
    assert run_agent("validate-all", {"shared_dir": str(dirs["shared"])}).returncode == 6  # exports required
    assert run_agent("validate-all", {"exports": "/srv 10.0.0.0/24(rw)"}).returncode == 6  # shared_dir required
    r = run_agent("validate-all", {"exports": "srv/nfs 10.0.0.0/24(rw); /srv/b ; /srv/c host(rw", "threads": "0",
                                   "shared_dir": "relative/dir", "state_dir": str(dirs["state"])})
    assert r.returncode == 6, r.stderr
    for word in ("'srv/nfs' is not an absolute path", "'/srv/b' names no client", "'host(rw' is not a client",
                 "shared_dir 'relative/dir'", "threads '0'"):
        assert word in r.stderr, r.stderr


def test_parse_exports():
    assert nfs.parse_exports("/srv/nfs 10.0.0.0/24(rw,sync,no_subtree_check) *(ro) ;; /srv/b/ host.example") == [
        ("/srv/nfs", "10.0.0.0/24", "rw,sync,no_subtree_check"), ("/srv/nfs", "*", "ro"),
        ("/srv/b", "host.example", "")]
    for bad in ("", " ; ", "srv 1.2.3.4(rw)", "/srv", "/srv a(b)(c)"):
        with pytest.raises(ValueError):
            nfs.parse_exports(bad)


def test_parse_exportfs_v_on_literal_output():
    text = ("/srv/nfs      \t10.0.0.0/24(sync,wdelay,hide,no_subtree_check,sec=sys,rw,secure,root_squash)\n"
            "/srv/nfs      \t<world>(sync,wdelay,hide,no_subtree_check,sec=sys,ro,secure,root_squash)\n"
            "/a/rather/long/path/that/exportfs/wraps\n"
            "\t\t192.168.1.5(sync,wdelay,hide,sec=sys,rw,secure,no_root_squash,no_all_squash)\n"
            "\t\thost.example(sync,wdelay,hide,sec=sys,ro,secure,root_squash,no_all_squash)\n")
    assert nfs.parse_exportfs_v(text) == {
        ("/srv/nfs", "10.0.0.0/24"), ("/srv/nfs", "*"), ("/a/rather/long/path/that/exportfs/wraps", "192.168.1.5"),
        ("/a/rather/long/path/that/exportfs/wraps", "host.example")}
    assert nfs.parse_exportfs_v("") == set()


def test_first_start_copies_the_state_layout_and_never_overwrites(dirs):
    state, shared = dirs["state"], dirs["shared"]
    copied = nfs.prepare_shared(str(shared), str(state))
    assert copied == ["etab", "rmtab", "sm", "sm.bak", "state", "v4recovery"]
    assert (shared / "sm" / "client.example").read_text() == "monitored\n"
    st = os.stat(shared / "sm")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o700)
    assert os.stat(shared / "state").st_uid == 65534
    assert (shared / "state").read_bytes() == b"\x02\x00\x00\x00"

    (shared / "state").write_bytes(b"\x07\x00\x00\x00")  # the NSM state the other node moved on
    shutil.rmtree(shared / "v4recovery")
    assert nfs.prepare_shared(str(shared), str(state)) == ["v4recovery"]
    assert (shared / "state").read_bytes() == b"\x07\x00\x00\x00"


def test_bind_state_and_unbind(dirs):
    state, shared = str(dirs["state"]), str(dirs["shared"])
    nfs.bind_state(shared, state)
    try:
        assert nfs.same_dir(state, shared)
        assert (dirs["shared"] / "etab").exists()
        nfs.bind_state(shared, state)  # again: nothing to do
        assert nfs.mounts_at_or_below(state) == [os.path.realpath(state)]
    finally:
        nfs.unbind_state(shared, state)
    assert not nfs.same_dir(state, shared)
    assert nfs.mounts_at_or_below(state) == []
    nfs.unbind_state(shared, state)  # again: nothing to do


def test_bind_refuses_a_state_dir_with_a_mount_below_it(dirs):
    pipefs = dirs["state"] / "rpc_pipefs"
    pipefs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "hastore-nfstest", str(pipefs)], check=True)
    with pytest.raises(nfs.AgentError) as e:
        nfs.bind_state(str(dirs["shared"]), str(dirs["state"]))
    assert e.value.code == 6 and "rpc_pipefs" in str(e.value)
    assert not nfs.same_dir(str(dirs["state"]), str(dirs["shared"]))


def test_the_kernel_decides_exit_5_or_ocf_tester(dirs):
    """One test, never skipped: without nfsd the agent must say so (5); with nfsd, ocf-tester must pass."""
    if KERNEL_PROBLEM is None:
        return _ocf_tester_on_a_kernel_with_nfsd(dirs)
    params = {"exports": f"{dirs['export']} 127.0.0.1(rw,sync,no_subtree_check)",
              "shared_dir": str(dirs["shared"]), "state_dir": str(dirs["state"])}
    for action in ("validate-all", "start", "monitor"):
        r = run_agent(action, params)
        assert r.returncode == 5, (action, r.returncode, r.stderr)
        assert "this kernel has no NFS server" in r.stderr and "cannot run on this node" in r.stderr
    assert nfs.mounts_at_or_below(str(dirs["top"])) == [], "start on a kernel without nfsd must change nothing"
    assert list(dirs["shared"].iterdir()) == []

    r = run_agent("stop", params)
    assert r.returncode == 0, r.stderr
    nfs.bind_state(str(dirs["shared"]), str(dirs["state"]))  # a bind left behind by a crash
    r = run_agent("stop", params)
    assert r.returncode == 0, r.stderr
    assert nfs.mounts_at_or_below(str(dirs["top"])) == []


def _ocf_tester_on_a_kernel_with_nfsd(dirs):
    """Not run on the development machine (no nfsd): uses the real /var/lib/nfs, rpcbind and exports table."""
    params = {"exports": f"{dirs['export']} 127.0.0.1(rw,sync,no_subtree_check)", "shared_dir": str(dirs["shared"])}
    try:
        ocf_tester(AGENT, params, timeout=120)
    finally:
        run_agent("stop", params)
