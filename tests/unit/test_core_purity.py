"""The decision core does no I/O: no module under hastore/core imports anything that touches the OS or the clock."""

import ast
import pathlib

import hastore.core

FORBIDDEN = {"socket", "asyncio", "subprocess", "time", "os", "select", "selectors", "threading", "signal",
             "serial", "pyroute2", "sh", "structlog", "logging", "shutil", "io", "pathlib", "datetime", "random",
             "multiprocessing", "fcntl", "termios", "ctypes", "hastore.io", "hastore.cli", "hastore.daemon",
             "hastore.lab"}


def imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("__import__", "open", "eval", "exec"):
            names.add(f"<call {node.func.id}>")
    return names


def test_core_modules_import_nothing_that_does_io():
    core = pathlib.Path(hastore.core.__file__).parent
    files = sorted(core.glob("*.py"))
    assert len(files) >= 6, files  # events, actions, wire, membership, arbitration, engine, ...
    offenders = {}
    for f in files:
        bad = {m for m in imported_modules(f) if m.startswith("<call") or m.split(".")[0] in FORBIDDEN
               or any(m == x or m.startswith(x + ".") for x in FORBIDDEN)}
        if bad:
            offenders[f.name] = sorted(bad)
    assert offenders == {}


def test_the_checker_catches_an_offender(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("import os\nfrom time import monotonic\nopen('x')\n")
    assert imported_modules(f) == {"os", "time", "<call open>"}
