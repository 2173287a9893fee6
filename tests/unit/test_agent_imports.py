"""hastore runs its own agents with `python -S` (hastore.io.agents.argv_for): no site-packages. So an agent, and
every hastore module it imports, may import only the standard library and hastore. Checked on the source (every
import statement, also those inside functions), and by running each agent's meta-data the way the runner does."""

import ast
import subprocess
import sys
from pathlib import Path

from hastore.io.agents import AGENTS_DIR, REPO_ROOT, Invocation, argv_for

ROOT = Path(__file__).resolve().parents[2]


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def test_agents_import_only_the_standard_library_and_hastore():
    agents = sorted(p for p in Path(AGENTS_DIR).iterdir() if p.is_file())
    assert len(agents) >= 6
    todo, seen, outside = list(agents), set(), {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports(path):
            top = name.split(".")[0]
            if top == "hastore":
                f = module_file(name)
                if f is not None:
                    todo.append(f)
                for i in range(1, name.count(".") + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
                    parent = module_file(name.rsplit(".", i)[0])
                    if parent is not None:
                        todo.append(parent)
            elif top not in sys.stdlib_module_names and top != "__future__":
                outside.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not outside, f"imports from outside the standard library, unavailable under python -S: {outside}"
    assert any(p.name == "ocf.py" for p in seen)


def test_each_agent_runs_as_the_runner_runs_it():
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO_ROOT)}
    for path in sorted(Path(AGENTS_DIR).iterdir()):
        argv = argv_for(Invocation("ocf", str(path)), "meta-data")
        assert argv[:2] == [sys.executable, "-S"]
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "<resource-agent" in r.stdout, (path.name, r.stderr[-500:])
