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
