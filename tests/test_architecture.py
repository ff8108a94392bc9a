"""The house's shape, checked: layering contracts (import-linter), no import cycles, small folders, a module map
that matches the tree, and a wheel that ships every subpackage (issue 20)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rollout_plugin"
BIN = Path(sys.executable).parent
MAX_MODULES = 15  # .py files other than __init__.py, per folder


def lint_imports(cwd: Path, env_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(BIN), "PYTHONPATH": str(env_path or cwd), "HOME": str(cwd)}
    return subprocess.run([str(BIN / "lint-imports"), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("plant, line, contract", [
    # a pure module reaching for HTTP
    ("rollout_plugin/pool/policy/routing.py", "import aiohttp", "Policy and core are pure"),
    # an adapter reaching past the public API
    ("rollout_plugin/adapters/verl/admission.py", "from rollout_plugin.pool.core import ledger",
     "Adapters and the gateway use the pool's public API only"),
    # a lower layer importing a higher one
    ("rollout_plugin/pool/core/cuts.py", "from rollout_plugin.pool.dispatch import outcomes",
     "The pool's subpackages are layers"),
])
def test_a_planted_violation_breaks_its_contract(tmp_path, plant, line, contract):
    shutil.copytree(PACKAGE, tmp_path / "rollout_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / plant
    target.write_text(target.read_text() + f"\n{line}  # noqa: E402  (planted)\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout[-2000:]
    assert re.search(re.escape(contract) + r".*BROKEN", done.stdout.replace("\n", " ")), done.stdout[-3000:]


def import_cycles() -> list[list[str]]:
    """Strongly connected components of the package's import graph (function-level imports included, type-only
    ones not): a cycle hidden inside a function still says a helper sits in the wrong home."""
    graph = grimp.build_graph("rollout_plugin", exclude_type_checking_imports=True)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(root: str) -> None:  # iterative Tarjan: the graph is deep enough to matter for recursion
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles():
    assert import_cycles() == []


def test_no_folder_holds_more_than_fifteen_modules():
    crowded = {str(d.relative_to(ROOT)): n for d in [PACKAGE, *PACKAGE.rglob("*")] if d.is_dir()
               if (n := len([f for f in d.glob("*.py") if f.name != "__init__.py"])) > MAX_MODULES}
    assert crowded == {}


def test_the_module_map_in_docs_matches_the_tree():
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `pool/(\w+)/` \| ([^|]+) \|", text, flags=re.M)
    documented = {pkg: set(re.findall(r"`(\w+\.py)`", mods)) for pkg, mods in rows}
    pool = PACKAGE / "pool"
    actual = {d.name: {f.name for f in d.glob("*.py") if f.name != "__init__.py"}
              for d in pool.iterdir() if (d / "__init__.py").exists()}
    assert documented == actual
    assert [f.name for f in pool.glob("*.py")] == ["__init__.py"], "pool/ itself holds only the public API"


@pytest.mark.slow
def test_the_wheel_ships_and_imports_every_subpackage(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("rollout_plugin-*.whl")
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked)
    packages = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")
                      if "__pycache__" not in p.parts)
    missing = [p for p in packages if not (unpacked / p.replace(".", "/") / "__init__.py").exists()]
    assert missing == [], f"listed nowhere in pyproject.toml's packages: {missing}"
    probe = ("import importlib, sys\n"
             f"mods = {packages!r}\n"
             "for m in mods:\n"
             "    mod = importlib.import_module(m)\n"
             f"    assert mod.__file__.startswith({str(unpacked)!r}), (m, mod.__file__)\n"
             "print(len(mods))\n")
    ran = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(unpacked), "PATH": str(BIN), "HOME": str(tmp_path)})
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert int(ran.stdout.split()[-1]) == len(packages)
