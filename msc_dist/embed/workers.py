"""What the embedding job's workers run: the embedding actor (checkpoint loaded once) and the
part writer (a task that writes one Parquet part of the version folder and returns one small
stats row). The driver sees only those stats rows."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from msc_dist import storage

log = logging.getLogger(__name__)


def held_out(ids, fraction: float, seed: int) -> np.ndarray:
    """Seeded, order-independent calibration hold-out by hashed sample id."""
    h = [int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:8], 16) / 2**32 for i in ids]
    return np.array(h, dtype=np.float64) < fraction


def content_name(ids) -> str:
    """A part's file name from the ids it holds: a retried task rewrites the same file, so a
    retry can never add a second copy of its rows."""
    h = hashlib.sha256()
    for i in sorted(str(x) for x in ids):
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def usable(batch: dict) -> np.ndarray:
    """Rows that hold a decoded image (not an error, not a stats-only row)."""
    return np.array([not e for e in batch["error"]], dtype=bool) & ~np.asarray(batch["stats_only"], dtype=bool)


class EmbedActor:
    """Ray Data actor: loads the model card once; image rows -> embedding rows (image dropped).
    ``preprocess``: what the driver's read tasks decoded with, which must be this card's;
    ``runtime``/``threads``: what runs its forward (``msc_dist.runtime``), on the actor's CPUs."""

    def __init__(self, checkpoint: str, preprocess, use_gpu: bool = False, max_pixels: int = 64_000_000,
                 runtime: str = "torch", threads: int | None = None, cache: str | None = None,
                 patch_spec: dict | None = None):
        import torch

        from msc_dist.patches import PatchSpec

        from msc_dist.card import load_card

        self.max_pixels = max_pixels
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.card = load_card(checkpoint, device, runtime, cache=cache, threads=threads)
        if self.card.preprocess != preprocess:
            raise ValueError(f"the read tasks decode with {preprocess}, the checkpoint's card is {self.card.preprocess}")
        self.patch_spec = PatchSpec.from_dict(patch_spec) if patch_spec else None  # None: no patch bank

    def _embed(self, x, arrays: bool):
        """-> (z, flattened patches (B, h*w*C) or None, the patch grid (h, w, C) or None)."""
        card = self.card
        if self.patch_spec is None:
            return (card.embed_arrays(x) if arrays else card.embed(x)), None, None
        z, p = (card.embed_arrays_with_patches if arrays else card.embed_with_patches)(x, self.patch_spec)
        return z, p.reshape(len(p), -1), p.shape[1:]

    def __call__(self, batch: dict) -> dict:
        card = self.card
        ok = usable(batch)
        emb = np.full((len(batch["id"]), card.dim), np.nan, dtype=np.float32)
        pat, grid = None, None

        def put(rows, x, arrays):
            nonlocal pat, grid
            z, p, g = self._embed(x, arrays)
            emb[rows] = z
            if p is not None:
                if pat is None:
                    pat, grid = np.full((len(emb), p.shape[1]), np.nan, np.float32), g
                pat[rows] = p
        if "encoded" in batch:  # bytes from the read tasks: decode the batch on this actor's device
            from msc_dist.data.device_decode import decode_batch

            rows = np.flatnonzero(ok)
            pre = card.preprocess
            x, got, errors = decode_batch([batch["encoded"][i] for i in rows], pre.image_size, card.device,
                                          self.max_pixels, resize_mode=pre.resize_mode)
            batch["error"] = batch["error"].copy()
            for j, e in errors.items():
                batch["error"][rows[j]] = e
            if got:
                put(rows[got], x, False)
        elif ok.any():
            put(ok, batch["image"][ok], True)
        out = {k: v for k, v in batch.items() if k not in ("image", "encoded")}
        out["embedding"] = emb
        if self.patch_spec is not None:
            if pat is None:  # no decodable image in this batch: the grid from one blank image
                h = card.preprocess.image_size
                _, p, grid = self._embed(np.zeros((1, h, h, 3), np.uint8), True)
                pat = np.full((len(emb), p.shape[1]), np.nan, np.float32)
            out["patches"] = pat
            out["patch_grid"] = np.array([list(grid)] * len(emb), dtype=np.int64)
        return out


def _table(batch: dict, rows: np.ndarray, model_id: str, calibration: bool, patches: np.ndarray | None = None):
    import pyarrow as pa

    z = np.ascontiguousarray(batch["embedding"][rows], dtype=np.float32)
    lab = np.asarray(batch["label"][rows], dtype=np.int64)
    n, d = z.shape
    extra = {}
    if patches is not None:  # (n, m, C): the bank rows of index rows, every patch of calibration rows
        flat = np.ascontiguousarray(patches, np.float32).reshape(n, -1)
        extra["patches"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), flat.shape[1])
    return pa.table({
        "id": pa.array([str(x) for x in batch["id"][rows]], pa.string()),
        "source": pa.array([str(x) for x in batch["source"][rows]], pa.string()),
        "label": pa.array(lab, pa.int64(), mask=lab < 0),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1), pa.float32()), d),
        "model_id": pa.array([model_id] * n, pa.string()),
        "calibration": pa.array([calibration] * n, pa.bool_()),
        **extra,
    })


def _patch_rows(batch: dict, rows: np.ndarray, kind: str, patch_spec: dict | None, grid: list[int]):
    """The patches a part stores: each index image's bank rows (``patches.bank_rows``), each
    calibration image's every patch; None without a patch bank."""
    if not patch_spec:
        return None
    from msc_dist.patches import PatchSpec, bank_rows

    h, w, c = grid
    p = np.asarray(batch["patches"][rows], np.float32).reshape(len(rows), h, w, c)
    if kind == "cal":
        return p.reshape(len(rows), h * w, c)
    return bank_rows(p, PatchSpec.from_dict(patch_spec), [str(i) for i in batch["id"][rows]])


def write_part(batch: dict, out: str, folder: str, model_id: str, cal_fraction: float, seed: int,
               role: str = "index", patch_spec: dict | None = None) -> dict:
    """Ray Data fn (a task): embedding rows -> Parquet under OUT/<folder>/: ``part-*`` for the
    index rows and ``cal-*`` for the calibration hold-out (by hashed id; ``role="calibration"``
    makes every row a calibration row). Returns one stats row: files, row counts, corrupt
    samples, bytes read by the read tasks."""
    ok = usable(batch)
    corrupt = [str(k) for k, bad in zip(batch["id"], ~ok & ~np.asarray(batch["stats_only"], bool)) if bad]
    ids = batch["id"][ok]
    is_cal = np.ones(len(ids), bool) if role == "calibration" else held_out(ids, cal_fraction, seed)
    idx_rows, cal_rows = np.flatnonzero(ok)[~is_cal], np.flatnonzero(ok)[is_cal]
    files = {"part": "", "cal": ""}
    grid = [int(v) for v in batch["patch_grid"][0]] if patch_spec and len(batch["id"]) else []
    for kind, rows in (("part", idx_rows), ("cal", cal_rows)):
        if len(rows):
            name = f"{folder}/{kind}-{content_name(batch['id'][rows])}.parquet"
            storage.write_table(storage.join(out, name), _table(batch, rows, model_id, kind == "cal",
                                                                _patch_rows(batch, rows, kind, patch_spec, grid)))
            files[kind] = name
    return {"patch_grid": [json.dumps(grid)], 
        "part": [files["part"]], "part_rows": [len(idx_rows)],
        "cal": [files["cal"]], "cal_rows": [len(cal_rows)],
        "corrupt": [len(corrupt)], "corrupt_keys": [json.dumps(corrupt[:20])],
        "bytes_read": [int(np.sum(batch["bytes_read"]))], "bytes_stored": [int(np.sum(batch["bytes_stored"]))],
    }
