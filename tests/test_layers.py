"""Imports point one way (docs/design.md §2.1): core <- backends <- public modules.

Read from the source with `ast`, not by importing: importing any submodule runs
fastrank/__init__.py, which imports everything, so an import-time check could not see
a cycle that the package's import order happens to hide.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Dict, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("rank_sums", "graded", "histogram")

# function-level imports that are not part of the layering: probes of optional pieces (the
# compiled extension, the Triton backend) that must not be imported before they are asked for
ALLOWED_DEFERRED = {
    ("fastrank.core.extension", "fastrank._C"),
    ("fastrank.core.backend", "fastrank.triton_kernels.rank_sums"),
}


def _modules() -> Dict[str, Tuple[str, bool]]:
    """module name -> (file, is_package), for fastrank/ and triton_kernels/ (installed as
    fastrank.triton_kernels)."""
    out = {}
    for top, prefix in (("fastrank", "fastrank"), ("triton_kernels", "fastrank.triton_kernels")):
        base = os.path.join(ROOT, top)
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(("_", "."))]
            rel = os.path.relpath(dirpath, base)
            pkg = prefix if rel == "." else prefix + "." + rel.replace(os.sep, ".")
            for f in files:
                if not f.endswith(".py"):
                    continue
                if f == "__init__.py":
                    out[pkg] = (os.path.join(dirpath, f), True)
                else:
                    out[pkg + "." + f[:-3]] = (os.path.join(dirpath, f), False)
    return out


MODULES = _modules()


def _imports(name: str) -> List[Tuple[str, bool]]:
    """(imported fastrank module, at module level?) for every import statement of `name`."""
    path, is_pkg = MODULES[name]
    tree = ast.parse(open(path).read(), path)
    package = name if is_pkg else name.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    # module-level try/if blocks count as module level
    for n in tree.body:
        if isinstance(n, (ast.Try, ast.If)):
            top_level.update(id(m) for m in ast.walk(n))
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` names a module when pkg.sub is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES or a.name == "_C" else mod
                       for a in node.names]
        for t in targets:
            if t == "fastrank" or t.startswith("fastrank."):
                found.append((t, id(node) in top_level))
    return found


def _layer(name: str) -> int:
    """0 core, 1 backends (naive, chunked, Triton), 2 public modules."""
    parts = name.split(".")
    if parts[:2] == ["fastrank", "core"]:
        return 0
    if parts[:2] == ["fastrank", "triton_kernels"]:
        return 1
    if len(parts) == 3 and parts[1] in FAMILIES and parts[2] in ("naive", "chunked"):
        return 1
    return 2


def _graph() -> Dict[str, Set[str]]:
    """module -> the fastrank modules it imports (the allowed probes left out)."""
    return {m: {t for t, _ in _imports(m) if t in MODULES and t != m and (m, t) not in ALLOWED_DEFERRED}
            for m in MODULES}


def test_the_layers_exist_with_the_same_anatomy_per_family():
    for fam in FAMILIES:
        for part in ("", ".naive", ".chunked"):
            assert f"fastrank.{fam}{part}" in MODULES, f"fastrank.{fam}{part}"
        assert f"fastrank.triton_kernels.{fam}" in MODULES
    assert {"fastrank.core.validate", "fastrank.core.problem", "fastrank.core.registry",
            "fastrank.core.backend", "fastrank.core.epilogue", "fastrank.core.params"} <= set(MODULES)


def test_imports_point_down_only():
    wrong = []
    for m, targets in _graph().items():
        for t in targets:
            if _layer(t) > _layer(m):
                wrong.append(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})")
    assert not wrong, "\n".join(wrong)


def test_backends_import_no_other_family():
    # a backend module sees only the core and its own family (Triton: its shared helpers)
    wrong = []
    for m in MODULES:
        if _layer(m) != 1:
            continue
        for t, _ in _imports(m):
            if t in MODULES and _layer(t) == 1 and t.rpartition(".")[0] != m.rpartition(".")[0]:
                wrong.append(f"{m} imports {t}")
    assert not wrong, "\n".join(wrong)


def test_no_deferred_imports():
    deferred = [(m, t) for m in MODULES for t, top in _imports(m) if not top]
    assert set(deferred) <= ALLOWED_DEFERRED, sorted(set(deferred) - ALLOWED_DEFERRED)


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    state: Dict[str, int] = {}  # 1 on the stack, 2 done
    found: List[List[str]] = []

    def visit(m: str, path: List[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                found.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_can_fail():
    # the import ap -> rank_sums -> core.registry plus a synthetic back edge core.registry -> ap
    graph = _graph()
    graph["fastrank.core.registry"] = graph["fastrank.core.registry"] | {"fastrank.ap"}
    assert any("fastrank.ap" in c and "fastrank.core.registry" in c for c in _cycles(graph))


def _reachable(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for t in graph[m]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def test_core_reaches_nothing_above_it():
    graph = _graph()
    for m in MODULES:
        if _layer(m) == 0:
            above = {t for t in _reachable(graph, m) if _layer(t) > 0}
            assert not above, f"{m} reaches {sorted(above)}"


@pytest.mark.parametrize("module", ["fastrank.core.registry", "fastrank.rank_sums.naive", "fastrank.graded.chunked",
                                    "fastrank.histogram", "fastrank.recall"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    # whatever fastrank/__init__.py imports first, importing this module first must work
    r = subprocess.run([sys.executable, "-c", f"import importlib; importlib.import_module({module!r})"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
