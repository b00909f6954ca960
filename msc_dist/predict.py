"""``msc predict --index IDX PATH...``: score image files or folders in this process, no Ray.

The same ``Scorer`` as offline scoring and serving (same decoding, model, index and threshold),
so a file gets the score it would get from the endpoint. A file that cannot be read or decoded
is a row with an error, never a crash. Prints a table, or JSON with ``--json``.

With an index version that has a patch bank, each row also holds the anomaly map's maximum
(``patch_score``), the share of its pixels over the version's ``map_threshold`` (``area``) and the
boxes of those regions (``boxes``, ``msc_dist.maps.regions``); ``--json`` adds the map in the
encoding that serving returns for ``?maps=1`` (``msc_dist.maps.encode_map``: the same bytes), and
``--maps DIR`` writes an overlay (the preprocessed image + its heatmap) per image into DIR."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import ClassVar

from msc_dist.config import BATCH_RANGE, MAX_BYTES_RANGE, MAX_PIXELS_RANGE, ConfigError, Range
from msc_dist.runtime import HELP as RUNTIME_HELP


@dataclass
class PredictConfig:
    paths: list[str] = field(default_factory=list, metadata={"positional": True})
    index: str | None = None
    checkpoint: str | None = None
    json: bool = False
    batch_size: int = 32
    device: str = "auto"
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 64_000_000
    runtime: str = "torch"
    maps: str | None = None

    RANGES: ClassVar[dict[str, Range]] = {"batch_size": BATCH_RANGE, "max_bytes": MAX_BYTES_RANGE,
                                          "max_pixels": MAX_PIXELS_RANGE}


HELP = {
    "paths": "image files or folders (every file under a folder, recursively; hidden files skipped)",
    "index": "index folder (the embedding job's --out) or s3://...",
    "checkpoint": "checkpoint or run folder (default: the one recorded in the index manifest)",
    "json": "print a JSON list instead of a table",
    "batch_size": "images per forward pass",
    "device": "auto (cuda when available) | cpu | cuda | cuda:N",
    "max_bytes": "files larger than this are not read (error row)",
    "max_pixels": "images above this many pixels are not decoded (error row)",
    "runtime": RUNTIME_HELP,
    "maps": "folder for an overlay PNG per image (the preprocessed image + its anomaly heatmap, regions over the "
            "map threshold boxed); needs an index version with a patch bank",
}


def list_files(paths: list[str]) -> list[str]:
    """Files as given, and every non-hidden entry under each folder (``storage.walk_files``:
    FIFOs, devices and symlink loops included, so that each gets its error row); a missing path
    is kept, so that it gets its error row."""
    from msc_dist import storage

    out = []
    for p in paths:
        p = os.path.expanduser(p)
        if os.path.isdir(p):
            out += storage.walk_files(p)
        else:
            out.append(p)
    return out


_BYTESIO = re.compile(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # PIL names the buffer, not the file


def _read(path: str, max_bytes: int) -> tuple[bytes | None, str | None]:
    """The file's bytes, or why not: regular files only, opened without blocking (a FIFO, a
    device or a symlink loop is an error row, never a hang)."""
    from msc_dist import storage

    try:
        with storage.open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                return None, f"file is {size} bytes, above the limit of {max_bytes}"
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # grew since the check
            return None, f"file is larger than the limit of {max_bytes} bytes"
        return data, None
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"


def predict(cfg: PredictConfig, scorer=None, progress: bool = False) -> list[dict]:
    """One dict per file, in order: path, score, is_anomaly, threshold, neighbors, error; with a
    patch bank also patch_score, area, boxes, map (the wire encoding) and, with ``cfg.maps``,
    map_file (the overlay written, relative to that folder)."""
    if not cfg.paths:
        raise ConfigError("give at least one image file or folder")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {cfg.batch_size}")
    if scorer is None:
        from msc_dist.scorer import open_scorer

        if not cfg.index:
            raise ConfigError("--index is required (the embedding job's --out, e.g. ~/msc_runs/msc/serving)")
        scorer = open_scorer(cfg.index, cfg.checkpoint, cfg.device, max_pixels=cfg.max_pixels, runtime=cfg.runtime)
    map_thr = scorer.map_threshold  # None: the version has no patch bank (or no calibrated map threshold)
    if cfg.maps and map_thr is None:
        raise ConfigError(f"--maps: index version {scorer.version} has no patch bank with a calibrated map threshold, so "
                          "no anomaly maps: rebuild it with python -m msc_dist.embed --patch-bank (and a calibration "
                          "hold-out)")
    files = list_files(cfg.paths)
    rows: list[dict] = []
    bar = None
    if progress:
        from msc_dist.progress import bar as make_bar

        bar = make_bar(total=len(files), desc="predict", unit="img")
    for lo in range(0, len(files), cfg.batch_size):
        chunk = files[lo:lo + cfg.batch_size]
        read = [_read(p, cfg.max_bytes) for p in chunk]
        ok = [i for i, (data, _) in enumerate(read) if data is not None]
        items = [read[i][0] for i in ok]
        scored = (scorer.score_bytes(items, maps=True) if map_thr is not None else scorer.score_bytes(items)) if ok else []
        results = dict(zip(ok, scored))
        for i, p in enumerate(chunk):
            if i in results:
                res = results[i]
                r = res.to_dict()
                err = r.get("error")
                row = {"path": p, **r, "error": _BYTESIO.sub("", err) if err else None}
                if map_thr is not None:
                    image = scorer.decode(read[i][0]) if cfg.maps and res.map is not None else None
                    row.update(_map_fields(res.map, map_thr, image, cfg.maps, p))
            else:
                row = {"path": p, "score": None, "is_anomaly": None, "threshold": scorer.threshold,
                       "neighbors": [], "error": read[i][1]}
                if map_thr is not None:
                    row.update(_map_fields(None, map_thr, None, cfg.maps, p))
            rows.append(row)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return rows


def _map_fields(m, map_thr: float, image, maps_dir: str | None, path: str) -> dict:
    """A row's map columns; with ``maps_dir`` its overlay written there (by the file's path)."""
    from msc_dist import maps, storage

    if m is None:
        return {"patch_score": None, "area": None, "boxes": [], "map": None, **({"map_file": None} if maps_dir else {})}
    out = maps.summary(m, map_thr, encode=True)
    if maps_dir:
        name = maps.map_file_name(path)
        storage.write_bytes_atomic(storage.join(os.path.expanduser(maps_dir), name), maps.overlay_png(image, m, map_thr))
        out["map_file"] = name
    return out


def table(rows: list[dict]) -> str:
    """Aligned columns: path, score, verdict, nearest normal id, (with maps: the share of the
    map over its threshold and the regions), error."""
    with_maps = any("area" in r for r in rows)
    head = ("path", "score", "anomaly", "nearest", *(("area", "regions") if with_maps else ()), "error")
    body = []
    for r in rows:
        verdict = "-" if r["is_anomaly"] is None else ("YES" if r["is_anomaly"] else "no")
        where = (("-" if r.get("area") is None else f"{r['area']:.2%}", str(len(r.get("boxes") or []))) if with_maps
                 else ())
        body.append((r["path"], "-" if r["score"] is None else f"{r['score']:.4f}", verdict,
                     r["neighbors"][0]["id"] if r["neighbors"] else "-", *where, r["error"] or ""))
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i]) for i in range(len(head))]
    fmt = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()  # noqa: E731
    thr = rows[0]["threshold"] if rows else None
    n_anom = sum(1 for r in rows if r["is_anomaly"])
    n_err = sum(1 for r in rows if r["error"])
    foot = (f"{len(rows)} files: {n_anom} anomalous, {len(rows) - n_anom - n_err} normal, {n_err} error{'' if n_err == 1 else 's'}"
            + (f" (threshold {thr:.4f})" if thr is not None else " (the index has no threshold)"))
    return "\n".join([fmt(head), *(fmt(b) for b in body), foot])


def main(cfg: PredictConfig, out=None) -> int:
    """Print the rows; 0 when it ran (files with errors included), 2 on a config error."""
    out = out or sys.stdout
    rows = predict(cfg, progress=not cfg.json and sys.stderr.isatty())
    if cfg.json:
        print(json.dumps(rows, indent=1), file=out)
    else:
        print(table(rows), file=out)
    return 0
