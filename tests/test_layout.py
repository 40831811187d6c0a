"""The layout holds: imports only run down the floors, Flower stays in protocol/ and deploy/, no circles.

Floors of ``fedapp`` (a module may import its own floor's packages and those below):
config, files, log → data → model → train, eval, privacy → protocol → runs → report, deploy → cli.
The apps and strategies sit above all of it; ``fedapp`` never imports them.
"""

from __future__ import annotations

import ast
import shutil
import subprocess

import pytest

from fedapp.deploy.simulation import REPO

FLOORS = {
    "config": 0, "files": 0, "log": 0,
    "data": 1,
    "model": 2,
    "train": 3, "eval": 3, "privacy": 3,
    "protocol": 4,
    "runs": 5,
    "report": 6, "deploy": 6,
    "cli": 7, "__main__": 8,
}
FLOWER_ALLOWED = {"protocol", "deploy"}
OUTSIDE = {"client_app", "server_app", "strategies", "tests", "bench", "scripts"}


def _modules() -> dict[str, set[str]]:
    """Every fedapp module and the fedapp modules and top-level packages it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "fedapp").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names if node.module == "fedapp"
                                or node.module.count(".") == 1)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        graph[name] = imported
    return graph


def _floor(module: str) -> int:
    return FLOORS[module.split(".")[1]]


def test_every_fedapp_package_has_a_floor() -> None:
    packages = {name.split(".")[1] for name in _modules() if name != "fedapp"}
    assert packages <= set(FLOORS), f"give these a floor in tests/test_layout.py: {sorted(packages - set(FLOORS))}"


def test_imports_only_run_down_and_flower_stays_in_protocol_and_deploy() -> None:
    graph = _modules()
    problems = []
    for module, imported in graph.items():
        if module == "fedapp":
            continue
        package = module.split(".")[1]
        for target in imported:
            top = target.split(".")[0]
            if top in OUTSIDE:
                problems.append(f"{module} imports {target}: fedapp never imports the apps, strategies or tests")
            elif top == "flwr" and package not in FLOWER_ALLOWED:
                problems.append(f"{module} imports {target}: only fedapp.protocol and fedapp.deploy may import Flower")
            elif top == "fedapp" and target.count(".") >= 1 and target.split(".")[1] in FLOORS:
                if _floor(target) > _floor(module):
                    problems.append(f"{module} (floor {_floor(module)}) imports {target} (floor {_floor(target)})")
    assert not problems, "\n".join(problems)


def test_no_import_circles_between_modules() -> None:
    graph = _modules()
    edges = {m: {t for t in imported if t in graph and t != m} for m, imported in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [])):
            raise AssertionError("import circle: " + " -> ".join(cycle))


def test_no_sys_path_edits_anywhere() -> None:
    edits = ("sys.path." + "insert", "sys.path." + "append")
    offenders = [str(p.relative_to(REPO)) for folder in ("fedapp", "client_app", "server_app", "strategies",
                                                          "tests", "bench", "scripts")
                 for p in (REPO / folder).rglob("*.py") if any(edit in p.read_text() for edit in edits)]
    assert offenders == [], offenders


def test_no_source_file_is_ignored_by_git() -> None:
    """A source file git ignores never reaches a clean clone (``runs/`` once hid ``fedapp/runs/rows.py``)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    sources = [str(p.relative_to(REPO)) for top in ("fedapp", "client_app", "server_app", "strategies", "tests",
                                                    "bench", "scripts") for p in (REPO / top).rglob("*.py")
               if "__pycache__" not in p.parts]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *sources], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    assert not ignored, f"git ignores these source files; fix .gitignore: {ignored}"
