"""Class names <-> integer labels, one rule for every job: a name listed in shards.json's
``classes`` is its index there; otherwise the name must be an integer label."""

from __future__ import annotations

from msc_dist.data.shards import DataError


def resolve_label(name: str, classes: list[str] | None) -> int:
    if classes and name in classes:
        return classes.index(name)
    try:
        return int(name)
    except ValueError:
        raise DataError(f"class {name!r} is neither an integer label nor a class name; valid classes: {classes}") from None


def resolve_labels(names: list[str], classes: list[str] | None) -> list[int]:
    """Normal classes as sorted, unique ints."""
    return sorted({resolve_label(str(n), classes) for n in names})
