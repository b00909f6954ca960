"""Convert an image folder (subfolders = classes) or the MNIST npz into WebDataset shards.

Masks: in a folder, ``NAME.png`` beside an image ``NAME.jpg`` (or .jpeg/.webp, among the
extensions taken) of the same name is that image's pixel mask (white = defect), as in the magnetic tiles (MT_*/Imgs). It is packed
as the sample's ``KEY.mask.png`` and is never taken as an image of its own; ``masks=False``
leaves masks out. The tiles' normal images (MT_Free) have all-black masks beside them, so their
samples carry all-black masks."""

from __future__ import annotations

import io
import os
import random
import re

import numpy as np
from PIL import Image

from msc_dist import storage
from msc_dist.data.labels import resolve_label
from msc_dist.data.shards import IMAGE_EXTS, DataError, DatasetInfo, ShardWriter

MASK_SOURCE_EXT = "png"  # NAME.png beside NAME.jpg|jpeg|webp: the image's mask
from msc_dist.progress import bar


def sample_key(rel: str) -> str:
    """The WebDataset key of the image at ``rel`` (its path in the source folder): keys end at
    the first dot and must not contain '/'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(rel)[0])


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _resolve_class(name: str | None, classes: list[str]) -> int | None:
    return None if name is None else resolve_label(name, classes)


def load_groups(url: str) -> dict[str, str]:
    """A groups file: a JSON object {image path relative to the source folder: group id}."""
    import json

    try:
        groups = json.loads(storage.read_bytes(url))
    except (OSError, ValueError) as e:
        raise DataError(f"groups file {url!r}: {e}") from e
    if not isinstance(groups, dict) or not all(isinstance(v, (str, int)) for v in groups.values()):
        raise DataError(f"groups file {url!r} must be a JSON object {{image path relative to the source folder: "
                        "group id (a string or an integer)}")
    return {os.path.normpath(k): str(v) for k, v in groups.items()}


def _split(items: list, normal: int | None, fraction: float, seed: int,
           groups: dict[str, str] | None = None) -> tuple[list, list]:
    """Seeded split: ``fraction`` of the normal items to train, the rest plus every other class to
    test. With ``groups`` (image path -> group id) whole groups are drawn, in a seeded order, until
    the training side holds ``fraction`` of the normal items (to within one group), so no group
    (the photos of one part, its exposures or views) is on both sides."""
    norm = [it for it in items if it[-1] == normal]
    rng = random.Random(seed)
    n_train = int(round(fraction * len(norm)))
    if groups is None:
        rng.shuffle(norm)
        train = sorted(norm[:n_train])
    else:
        missing = [it[0] for it in norm if os.path.normpath(it[0]) not in groups]
        if missing:
            raise DataError(f"{len(missing)} of the {len(norm)} normal images have no group in the groups file "
                            f"(e.g. {missing[0]!r}): give every normal image a group")
        members: dict[str, list] = {}
        for it in norm:
            members.setdefault(groups[os.path.normpath(it[0])], []).append(it)
        order = sorted(members)
        rng.shuffle(order)
        train = []
        for g in order:
            if len(train) >= n_train:
                break
            train += members[g]
        if len(train) == len(norm):
            raise DataError(f"the split by group leaves no normal image to test: {len(members)} group(s), "
                            f"train_fraction {fraction}")
        train.sort()
    test = sorted(set(items) - set(train))
    return train, test


def _folder_items(folder: str, src: str, exts: list[str], label: int, masks: bool) -> list[tuple]:
    """(relative image path, ext, relative mask path or None, label) of every image under ``folder``."""
    items = []
    for root, _, files in os.walk(folder):
        stems: dict[str, dict[str, str]] = {}
        for f in files:
            stem, dot, ext = f.rpartition(".")
            if dot:
                stems.setdefault(stem, {})[ext.lower()] = f
        for stem, by_ext in stems.items():
            others = [e for e in by_ext if e in exts and e != MASK_SOURCE_EXT]
            mask = by_ext.get(MASK_SOURCE_EXT) if others else None  # a .png beside an image taken: its mask
            for ext, f in by_ext.items():
                if ext not in exts or (mask is not None and f == mask):
                    continue
                m = os.path.relpath(os.path.join(root, mask), src) if masks and mask is not None else None
                items.append((os.path.relpath(os.path.join(root, f), src), ext, m, label))
    return items


def from_folder(src: str, out: str, exts: list[str], per_shard: int, normal_class: str | None,
                train_fraction: float, seed: int, masks: bool = True, groups: str | None = None) -> dict[str, DatasetInfo]:
    if not os.path.isdir(src):
        raise DataError(f"{src!r} is not a folder")
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise DataError(f"{src!r} has no class subfolders")
    items = []
    for ci, c in enumerate(classes):
        items.extend(_folder_items(os.path.join(src, c), src, exts, ci, masks))
    items.sort()
    if not items:
        raise DataError(f"no images with extensions {exts} under {src!r}")
    normal = _resolve_class(normal_class, classes)
    if groups is not None and normal is None:
        raise DataError("groups split the normal class: give --normal-class too")
    group_of = load_groups(groups) if groups is not None else None
    splits = {"": items} if normal is None else dict(zip(("train", "test"),
                                                         _split(items, normal, train_fraction, seed, group_of)))
    out_info = {}
    for name, its in splits.items():
        with ShardWriter(storage.join(out, name) if name else out, per_shard, classes) as w:
            for rel, ext, mask, label in bar(its, desc=f"make-shards {name or 'all'}", unit="img", leave=False):
                with open(os.path.join(src, rel), "rb") as f:
                    image = f.read()
                m = None
                if mask is not None:
                    with open(os.path.join(src, mask), "rb") as f:
                        m = f.read()
                w.write(sample_key(rel), image, "jpg" if ext == "jpeg" else ext, label, m)
        out_info[name or "all"] = w.close()
    if normal is not None:
        _write_split_record(out, normal_class, train_fraction, seed, splits, groups, group_of, normal)
    return out_info


def _write_split_record(out, normal_class, fraction, seed, splits, groups=None, group_of=None, normal=None) -> None:
    import json

    rec = {"normal_class": normal_class, "train_fraction": fraction, "seed": seed,
           "train": [r for r, *_ in splits["train"]], "test": [r for r, *_ in splits["test"]]}
    if group_of is not None:  # the normal class's groups on each side (every normal image has one)
        rec["split_by"] = {"groups": os.path.basename(groups), **{
            f"{name}_groups": len({group_of[os.path.normpath(it[0])] for it in splits[name] if it[-1] == normal})
            for name in ("train", "test")}}
    storage.write_bytes_atomic(storage.join(out, "split.json"), json.dumps(rec, indent=0).encode())


def from_npz(src: str, out: str, per_shard: int, normal_class: str | None) -> dict[str, DatasetInfo]:
    """MNIST-format npz: x_train/y_train/x_test/y_test (+ idx_*). Writes OUT/train and OUT/test.
    With a normal class, train holds only that class (the one-class protocol); test holds all."""
    d = np.load(src)
    classes = [str(i) for i in range(int(max(d["y_train"].max(), d["y_test"].max())) + 1)]
    normal = _resolve_class(normal_class, classes)
    res = {}
    for split in ("train", "test"):
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        idx = d[f"idx_{split}"] if f"idx_{split}" in d else np.arange(len(x))
        with ShardWriter(storage.join(out, split), per_shard, classes) as w:
            for i in bar(range(len(x)), desc=f"make-shards {split}", unit="img", leave=False):
                if split == "train" and normal is not None and int(y[i]) != normal:
                    continue
                w.write(f"{split}{int(idx[i]):06d}", _png(x[i]), "png", int(y[i]))
        res[split] = w.close()
    return res


def make_shards(src: str, out: str, exts: list[str] | None = None, per_shard: int = 1000,
                normal_class: str | None = None, train_fraction: float = 0.7, seed: int = 0,
                masks: bool = True, groups: str | None = None) -> dict[str, DatasetInfo]:
    if src.endswith(".npz"):
        if groups is not None:
            raise DataError("groups apply to image folders (an npz keeps its own train/test split)")
        return from_npz(src, out, per_shard, normal_class)
    return from_folder(src, out, [e.lower() for e in (exts or IMAGE_EXTS)], per_shard, normal_class, train_fraction,
                       seed, masks, groups)
