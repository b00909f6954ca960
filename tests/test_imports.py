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


@lru_cache(maxsize=None)
def direct_imports(name: str) -> frozenset[str]:
    """Absolute names of what module ``name`` imports (``from a import b`` gives a and a.b)."""
    path = _module_file(name)
    if path is None:
        return frozenset()
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
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
                                    "msc_dist.runtime", "msc_dist.card", "msc_dist.export"])
def test_pure_modules_import_neither_torch_distributed_nor_ray(module):
    assert offenders(module, ("torch.distributed", "ray", "msc_dist.dist")) == []


@pytest.mark.parametrize("module", modules_under("msc_dist/data"))
def test_data_imports_nothing_from_train_embed_or_score(module):
    assert offenders(module, ("msc_dist.train", "msc_dist.embed", "msc_dist.score")) == []
