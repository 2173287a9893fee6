"""vagrant/: the Vagrantfile parses and validates (without a provider: none runs here), and it configures the
nodes only through vagrant/provision.sh, the script the qemu lab runs too, with variables that script reads."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is not installed (scripts/install-deps installs it)")
        pytest.skip(f"{tool} is not installed (scripts/install-deps installs it)")
    return path


def test_the_vagrantfile_is_valid_ruby_and_a_valid_vagrant_configuration(tmp_path):
    r = subprocess.run([_need("ruby"), "-c", "Vagrantfile"], cwd=VAGRANT_DIR, capture_output=True, text=True)
    assert r.returncode == 0 and "Syntax OK" in r.stdout, r.stderr
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "home"), VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
               VAGRANT_CHECKPOINT_DISABLE="1")
    r = subprocess.run([_need("vagrant"), "validate", "--ignore-provider"], cwd=VAGRANT_DIR, capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0 and "Vagrantfile validated successfully" in r.stdout, r.stdout + r.stderr


def test_the_vagrantfile_provisions_only_through_the_shared_script_with_variables_it_reads():
    vf = (VAGRANT_DIR / "Vagrantfile").read_text()
    script = (VAGRANT_DIR / "provision.sh").read_text()
    steps = re.search(r"for step in ([a-z -]+); do", vf).group(1).split()
    assert steps and "bash /hastore/vagrant/provision.sh \"$step\"" in vf
    for step in steps:
        assert re.search(rf"^\s*{step}\)", script, re.M), f"provision.sh has no '{step}' step"
    passed = set(re.findall(r'"(HASTORE_[A-Z_]+)" =>', vf))
    read = set(re.findall(r"\$\{?(HASTORE_[A-Z_]+)", script))
    assert passed and not passed - read, f"the Vagrantfile sets variables provision.sh ignores: {passed - read}"
    assert {"HASTORE_NODE", "HASTORE_PEER", "HASTORE_DISK", "HASTORE_VIP"} <= passed


def test_a_failed_first_initialisation_is_undone_so_that_a_rerun_starts_over(tmp_path):
    """provision.sh drbd with stand-ins for the DRBD and disk tools (they only log their arguments) and a MariaDB
    bootstrap that fails: the resource is demoted, taken down and its metadata reset, the mount undone."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    tools = {"modprobe": "", "mkfs.ext4": "", "mount": "", "umount": "", "chown": "",
             "mariadb-install-db": "exit 1",
             "drbdadm": 'case "$1" in dump-md) echo "No valid meta data found" >&2; exit 1 ;;\n'
                        '  get-gi) echo 0000000000000004:0000000000000000:0:0:0:0:0:0:0:0:0:0 ;;\n'
                        '  cstate) echo WFConnection ;; dstate) echo Inconsistent/DUnknown ;; esac'}
    for name, body in tools.items():
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n{body}\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           "HASTORE_NODE": "alpha", "HASTORE_PEER": "bravo", "HASTORE_PRIMARY": "alpha"}
    res = subprocess.run(["bash", str(VAGRANT_DIR / "provision.sh"), "drbd"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0
    assert "initialising r0 failed; it was reset: run the drbd step again" in res.stderr
    calls = log.read_text().splitlines()
    drbd = [c for c in calls if c.startswith("drbdadm ") and c.split()[1] in ("primary", "secondary", "down",
                                                                              "create-md", "up")]
    assert drbd == ["drbdadm create-md --force r0", "drbdadm up r0", "drbdadm primary --force r0",
                    "drbdadm secondary r0", "drbdadm down r0", "drbdadm create-md --force r0", "drbdadm up r0"]
    mounted = next(c for c in calls if c.startswith("mount "))
    assert f"umount {mounted.split()[-1]}" in calls, "the temporary mount point was not unmounted"
