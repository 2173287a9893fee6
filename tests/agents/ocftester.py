"""Run Debian's ocf-tester (package resource-agents) on one of our agents.

    from ocftester import ocf_tester
    ocf_tester(REPO / "agents" / "Dummy", {"state": str(tmp_path / "state")})
    ocf_tester(agent, {"ip": "10.90.0.50"}, prefix=node.command([]))    # inside a lab node

ocf-tester walks the OCF contract: meta-data valid against ra-api-1.dtd (also as user nobody),
validate-all, probe of a stopped resource -> 7, start, start again, monitor -> 0, stop, stop again,
monitor -> 7.  Any failure raises AssertionError carrying ocf-tester's whole output.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OCF_TESTER = "/usr/sbin/ocf-tester"
OCF_ROOT = "/usr/lib/ocf"


def ocf_tester(agent_path: str | os.PathLike, params: Mapping[str, str], timeout: float = 120, *,
               name: str | None = None, prefix: Sequence[str] = (),
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ocf-tester -v on agent_path with params as OCF_RESKEY_*; return the finished process.

    prefix: a command that runs the rest elsewhere, e.g. ``node.command([])`` (a lab node) or
    ``["nsenter", "-t", PID, "-m", "--"]`` (a private mount namespace).  env: extra variables.
    The agent gets PYTHONPATH=<repo root> so `hastore.agentlib` imports without an install.
    """
    agent = Path(agent_path).resolve()
    if not os.path.exists(OCF_TESTER):
        raise AssertionError(f"{OCF_TESTER} is missing: apt-get install resource-agents")
    if not agent.is_file() or not os.access(agent, os.X_OK):
        raise AssertionError(f"agent {agent} is not an executable file")
    if re.search(r"\s", str(agent)):
        raise ValueError(f"ocf-tester cannot run an agent whose path has white space: {agent}")
    argv = [*prefix, OCF_TESTER, "-v", "-n", name or f"hastore-{agent.name.lower()}-{os.getpid()}"]
    for key, value in params.items():
        # ocf-tester evals `export OCF_RESKEY_key='value'`: keep both within what that survives
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or "'" in str(value):
            raise ValueError(f"ocf-tester cannot pass parameter {key}={value!r}")
        argv += ["-o", f"{key}={value}"]
    argv.append(str(agent))
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("OCF_RESKEY_", "OCF_RESOURCE_"))}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env.setdefault("OCF_ROOT", OCF_ROOT)
    full_env.update(env or {})
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env, cwd="/",
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"ocf-tester on {agent.name} with {dict(params)} did not finish within "
                             f"{timeout} s; output so far:\n{out}\n{err}") from None
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
    result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if result.returncode != 0 or "passed all tests" not in out:
        raise AssertionError(f"ocf-tester failed on {agent.name} (exit {result.returncode}) with "
                             f"{dict(params)}:\n--- stdout\n{out}\n--- stderr\n{err}")
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
