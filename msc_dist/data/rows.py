"""Row-oriented reading for Ray Data jobs (embedding, offline scoring): a task reads a planned
range of a shard and returns decoded rows; undecodable samples become rows with an error."""

from __future__ import annotations

import json
import logging

import numpy as np

from msc_dist.data.decode import BadImage, decode_image
from msc_dist.data.loader import LabelFilter, _iter_range
from msc_dist.data.plan import Range

log = logging.getLogger(__name__)


def range_items(counts: list[tuple[str, int]], rows_per_task: int, keep: list[int] | None, **extra) -> list[dict]:
    """Split (shard, kept count) into task items of at most ``rows_per_task`` samples. ``keep``
    (labels kept, None = all) travels as JSON: Arrow turns an all-null column into floats."""
    items = []
    for url, n in counts:
        for start in range(0, n, rows_per_task):
            items.append({"url": url, "start": start, "stop": min(n, start + rows_per_task),
                          "keep": json.dumps(keep), **extra})
    return items


def decoded_rows(ids, sources, labels, images: list[np.ndarray | None], errors, size: int) -> dict:
    blank = np.zeros((size, size, 3), np.uint8)
    return {
        "id": np.array(ids, dtype=object),
        "source": np.array(sources, dtype=object),
        "label": np.array(labels, dtype=np.int64),
        "image": np.stack([blank if im is None else im for im in images]) if images else np.zeros((0, size, size, 3), np.uint8),
        # "" = no error (Arrow round-trips of None in object columns are not reliable)
        "error": np.array(["" if e is None else e for e in errors], dtype=object),
    }


def read_shard_ranges(batch: dict) -> dict:
    """Ray Data map_batches fn: a batch of range items -> decoded rows (label -1 = none)."""
    ids, sources, labels, images, errors = [], [], [], [], []
    size = int(batch["image_size"][0])
    for i in range(len(batch["url"])):
        kept = json.loads(str(batch["keep"][i]))
        keep = LabelFilter(None if kept is None else frozenset(int(x) for x in kept))
        r = Range(str(batch["url"][i]), int(batch["start"][i]), int(batch["stop"][i]))
        for s in _iter_range(r, keep):
            try:
                img, err = decode_image(s.data, size, int(batch["max_pixels"][i])), None
            except BadImage as e:
                log.warning("skipping corrupt sample key=%s shard=%s: %s", s.key, s.source, e)
                img, err = None, str(e)
            ids.append(s.key)
            sources.append(s.source)
            labels.append(-1 if s.label is None else s.label)
            images.append(img)
            errors.append(err)
    return decoded_rows(ids, sources, labels, images, errors, size)


class EmbedActor:
    """Ray Data actor: loads the checkpoint once; (image rows) -> (embedding rows)."""

    def __init__(self, checkpoint: str, use_gpu: bool = False):
        import torch

        from msc_dist.checkpoint import load_model

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model, _, self.config, self.model_id = load_model(checkpoint, self.device)

    def __call__(self, batch: dict) -> dict:
        import torch

        from msc_dist.features import autocast, unit_input

        n, ok = len(batch["id"]), np.array([not e for e in batch["error"]], dtype=bool)
        emb = np.full((n, self.model.dim), np.nan, dtype=np.float32)
        if ok.any():
            # (b, S, S, 3) rows -> (b, 3, S, S) channels_last view, no copy
            x = unit_input(torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).permute(0, 3, 1, 2), self.device)
            with torch.no_grad(), autocast(self.device):
                emb[ok] = self.model(x).float().cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "image"}
        out["embedding"] = emb
        return out
