"""Checkpoint folder layout, shared by training, embedding and serving:

    model.pt      FeatureModel state_dict (torch.load(weights_only=True))
    center.pt     (D,) float32 center
    config.json   the resolved TrainConfig
    meta.json     epoch, step, metrics
    optimizer.pt  optimiser state (training resume only)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LoadedCheckpoint:
    model_state: dict[str, torch.Tensor]
    center: torch.Tensor
    config: dict[str, Any]
    meta: dict[str, Any]
    optimizer_state: dict | None
    model_id: str = ""  # sha256 of model.pt


def save(folder: str, model_state, center: torch.Tensor, config: dict, meta: dict, optimizer_state=None) -> None:
    os.makedirs(folder, exist_ok=True)
    torch.save(model_state, os.path.join(folder, "model.pt"))
    torch.save(center.detach().float().cpu(), os.path.join(folder, "center.pt"))
    if optimizer_state is not None:
        torch.save(optimizer_state, os.path.join(folder, "optimizer.pt"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    # meta.json last: a folder with meta.json is complete.
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=float)


def load(folder_url: str, with_optimizer: bool = False) -> LoadedCheckpoint:
    """Load a checkpoint folder from a local path or s3:// (through fsspec, no temp files).
    ``model_id`` is the sha256 of model.pt."""
    import hashlib
    import io

    from msc_dist import storage

    def _bytes(name: str) -> bytes:
        url = storage.join(folder_url, name)
        if not storage.exists(url):
            raise FileNotFoundError(f"{folder_url} is not a complete checkpoint: missing {name}")
        return storage.read_bytes(url)

    def _tensor(data: bytes):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    model_bytes = _bytes("model.pt")
    opt = None
    if with_optimizer and storage.exists(storage.join(folder_url, "optimizer.pt")):
        opt = _tensor(_bytes("optimizer.pt"))
    return LoadedCheckpoint(_tensor(model_bytes), _tensor(_bytes("center.pt")), json.loads(_bytes("config.json")),
                            json.loads(_bytes("meta.json")), opt, hashlib.sha256(model_bytes).hexdigest())


def load_model(folder_url: str, device: str | torch.device = "cpu"):
    """(FeatureModel in eval mode on device, center, config dict, model_id) from a checkpoint."""
    from msc_dist.backbones import build_model
    from msc_dist.features import place

    ck = load(folder_url)
    model = build_model(ck.config["backbone"], pretrained=False)  # every tensor comes from model.pt
    model.load_state_dict(ck.model_state)
    return place(model, device).eval(), ck.center.to(device), ck.config, ck.model_id


def resolve(url: str) -> str:
    """A checkpoint folder as given, or the newest complete checkpoint (highest epoch) of a run folder."""
    from msc_dist import storage

    if storage.exists(storage.join(url, "meta.json")):
        return url
    fs = storage.filesystem(url)
    remote = storage.is_remote(url)
    base = storage.strip_protocol(url) if remote else url
    best, best_epoch = None, -1
    for meta in fs.glob(base.rstrip("/") + "/checkpoint_*/meta.json"):
        with fs.open(meta, "rb") as f:
            epoch = int(json.load(f)["epoch"])
        if epoch > best_epoch:
            folder = meta.rsplit("/", 1)[0]
            best, best_epoch = (url.split("://", 1)[0] + "://" + folder) if remote else folder, epoch
    if best is None:
        raise FileNotFoundError(f"{url} is neither a checkpoint (no meta.json) nor a run folder with checkpoint_*/ inside")
    return best
