"""The house's import rules, checked statically (ast, no imports run): every ``import`` in a
module, at the top or inside a function, and transitively through the package's own modules."""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.exists():
            return p
    return None


def _parsed(name: str, source: str | None = None) -> tuple[str, ast.Module]:
    """(the package that relative imports of module ``name`` start from, its syntax tree);
    ``source``: this text instead of the module's file (to test the checkers)."""
    path = _module_file(name)
    pkg = name if path is not None and path.name == "__init__.py" else name.rpartition(".")[0]
    return pkg, ast.parse(source if source is not None else path.read_text(), str(path))


def _resolve(pkg: str, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from X import ...`` (X relative or not)."""
    if not node.level:
        return node.module or ""
    base = pkg.split(".")
    return ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))


@lru_cache(maxsize=None)
def direct_imports(name: str) -> frozenset[str]:
    """Absolute names of what module ``name`` imports (``from a import b`` gives a and a.b)."""
    if _module_file(name) is None:
        return frozenset()
    pkg, tree = _parsed(name)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(pkg, node)
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return frozenset(out)


def _ours(name: str) -> bool:
    return name.split(".")[0] in ("msc_dist", "serving") and _module_file(name) is not None


def closure(name: str) -> dict[str, str]:
    """Every module reachable from ``name`` through the project's own modules -> one importer.
    Importing a.b.c also runs a and a.b (their __init__)."""
    seen: dict[str, str] = {name: ""}
    todo = [name]
    while todo:
        m = todo.pop()
        for imp in direct_imports(m):
            parts = imp.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if sub not in seen:
                    seen[sub] = m
                    if _ours(sub):
                        todo.append(sub)
    return seen


def chain(seen: dict[str, str], target: str) -> str:
    path = [target]
    while seen.get(path[-1]):
        path.append(seen[path[-1]])
    return " <- ".join(path)


def offenders(name: str, banned: tuple[str, ...]) -> list[str]:
    seen = closure(name)
    return [chain(seen, m) for m in sorted(seen) if m != name and any(m == b or m.startswith(b + ".") for b in banned)]


def modules_under(folder: str) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / folder).rglob("*.py"))


def test_the_checker_sees_real_imports():
    """Guards the guard: known edges are found, through function-level imports too."""
    assert "msc_dist.dist" in closure("msc_dist.train.loop")
    assert "torch.distributed" in closure("msc_dist.dist")
    assert "msc_dist.scorer" in closure("serving.app")  # imported inside Model._load
    assert offenders("msc_dist.train.job", ("ray",))  # the Ray Train driver imports ray


@pytest.mark.parametrize("module", modules_under("serving") + ["msc_dist.scorer"])
def test_serving_and_the_scorer_import_nothing_from_train(module):
    assert offenders(module, ("msc_dist.train",)) == []


@pytest.mark.parametrize("module", ["msc_dist.scorer"] + modules_under("serving"))
def test_serving_and_the_scorer_import_neither_torch_distributed_nor_kornia(module):
    assert offenders(module, ("torch.distributed", "kornia", "msc_dist.dist")) == []


@pytest.mark.parametrize("module", ["msc_dist.loss", "msc_dist.backbones", "msc_dist.index", "msc_dist.scoring",
                                    "msc_dist.features", "msc_dist.checkpoint", "msc_dist.predict",
                                    "msc_dist.runtime", "msc_dist.card", "msc_dist.export", "msc_dist.patches"])
def test_pure_modules_import_neither_torch_distributed_nor_ray(module):
    assert offenders(module, ("torch.distributed", "ray", "msc_dist.dist")) == []


@pytest.mark.parametrize("module", modules_under("msc_dist/data"))
def test_data_imports_nothing_from_train_embed_or_score(module):
    assert offenders(module, ("msc_dist.train", "msc_dist.embed", "msc_dist.score")) == []


@pytest.mark.parametrize("module", ["msc_dist.index", "msc_dist.storage"])
def test_index_and_storage_import_nothing_from_data(module):
    assert offenders(module, ("msc_dist.data",)) == []


@pytest.mark.parametrize("module", [m for m in modules_under("msc_dist/evaluate") if not m.endswith("__main__")])
def test_evaluation_imports_nothing_from_predict(module):
    """Evaluation scores through the Scorer, not through ``msc predict``'s code. (Its __main__
    is the command line, which reaches every verb through msc_dist.cli.)"""
    assert offenders(module, ("msc_dist.predict",)) == []


# --- Private names stay in their module ------------------------------------------------------

def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(name: str, source: str | None = None) -> list[str]:
    """Private names (one leading underscore) of the project's other modules that module
    ``name`` takes: ``from m import _x``, ``import m._x``, and ``alias._x`` where ``alias`` is a
    module of ours (``import m as alias``, ``from pkg import m``)."""
    pkg, tree = _parsed(name, source)
    modules: dict[str, str] = {}  # local name -> the module of ours it is bound to
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if not _ours(a.name):
                    continue
                if any(_private(p) for p in a.name.split(".")):
                    out.append(f"{name}:{node.lineno} imports {a.name}")
                if a.asname:  # import a.b as x: x is a.b
                    modules[a.asname] = a.name
                else:  # import a.b: a is bound
                    modules[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(pkg, node)
            if mod.split(".")[0] not in ("msc_dist", "serving"):
                continue
            for a in node.names:
                if _private(a.name) and mod != name:
                    out.append(f"{name}:{node.lineno} imports {mod}.{a.name}")
                if _ours(f"{mod}.{a.name}"):
                    modules[a.asname or a.name] = f"{mod}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            target = _dotted_module(node.value, modules)
            if target is not None and target != name:
                out.append(f"{name}:{node.lineno} uses {target}.{node.attr}")
    return sorted(set(out))


def _dotted_module(node: ast.expr, modules: dict[str, str]) -> str | None:
    """The module of ours that the expression ``a`` or ``a.b.c`` names, if any."""
    if isinstance(node, ast.Name):
        return modules.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted_module(node.value, modules)
        if base is not None and _ours(f"{base}.{node.attr}"):
            return f"{base}.{node.attr}"
    return None


def test_the_private_name_checker_sees_every_form():
    """Guards the guard: each way of reaching into another module's private names is found,
    and a module's own private names and public names are not."""
    bad = {
        "from msc_dist.storage import _FS_CACHE": "msc_dist.storage._FS_CACHE",
        "from . import _x": "msc_dist.index._x",
        "from msc_dist import storage\nstorage._FS_CACHE.clear()": "msc_dist.storage._FS_CACHE",
        "import msc_dist.storage as st\nst._PERMANENT": "msc_dist.storage._PERMANENT",
        "import msc_dist.storage\nmsc_dist.storage._PERMANENT": "msc_dist.storage._PERMANENT",
        "def f():\n    from msc_dist.data import shards\n    return shards._iter_tar": "msc_dist.data.shards._iter_tar",
    }
    for src, taken in bad.items():
        found = private_uses("msc_dist.index.load", src)
        assert len(found) == 1 and taken in found[0], (src, found)
    good = ("from msc_dist.storage import read_bytes\nfrom __future__ import annotations\n"
            "import numpy as np\nnp._NoValue\nfrom msc_dist import storage\nstorage.join\nself._x\n"
            "from msc_dist.index.load import _read_checked")
    assert private_uses("msc_dist.index.load", good) == []


@pytest.mark.parametrize("module", modules_under("msc_dist") + modules_under("serving"))
def test_no_module_takes_a_private_name_of_another(module):
    assert private_uses(module) == []


# --- No import circles, function-level imports included --------------------------------------

def module_edges(name: str, source: str | None = None) -> set[str]:
    """The project's modules that ``name`` imports, at the top or in a function: ``import a.b``
    -> a.b; ``from a import b`` -> a.b where that is a module, else a (b is a name defined in
    a). The parent packages that Python runs first are no edge of their own."""
    pkg, tree = _parsed(name, source)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if _ours(a.name)}
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(pkg, node)
            for a in node.names:
                if _ours(f"{mod}.{a.name}"):
                    out.add(f"{mod}.{a.name}")
                elif _ours(mod):
                    out.add(mod)
    return out - {name}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    return sorted(out)


def test_the_circle_finder_sees_lazy_imports_and_circles():
    """Guards the guard: a function-level import is an edge, a name taken from a package is an
    edge to its __init__, a submodule taken from a package is an edge to the submodule, and two
    modules that import each other are one circle."""
    assert "msc_dist.bench.runner" in module_edges("msc_dist.cli")  # inside _bench's run()
    src = "from msc_dist.index import load_index\nfrom msc_dist import storage\ndef f():\n    import msc_dist.cli\n"
    assert module_edges("msc_dist.scorer", src) == {"msc_dist.index", "msc_dist.storage", "msc_dist.cli"}
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set(), "d": {"a", "b"}}) == []


def test_no_import_circles():
    modules = modules_under("msc_dist") + modules_under("serving")
    assert import_circles({m: module_edges(m) for m in modules}) == []
