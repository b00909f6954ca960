"""Checkpoint folder layout, shared by training, embedding and serving:

    model.pt      FeatureModel state_dict (torch.load(weights_only=True))
    center.pt     (D,) float32 center
    config.json   the resolved TrainConfig
    meta.json     epoch, step, metrics
    optimizer.pt  optimiser state (training resume only)
    sha256.json   sha256 of every file above; written last, checked by ``load``

A run folder's checkpoint is the one Ray Train registered last (its checkpoint-manager snapshot),
never a folder found on disk: a folder Ray has not registered may be partial or still uploading.
An epoch stopped by the collapse alarm (``on_collapse: stop``) is never registered; its checkpoint
is kept apart in the run folder, under ``collapsed/epoch_NNNN`` (``collapsed_url``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

SUMS = "sha256.json"
# Written by Ray Train into the run folder after each checkpoint is persisted and registered.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, unregistered, or does not match its checksums."""


@dataclass
class LoadedCheckpoint:
    model_state: dict[str, torch.Tensor]
    center: torch.Tensor
    config: dict[str, Any]
    meta: dict[str, Any]
    optimizer_state: dict | None
    model_id: str = ""  # sha256 of model.pt


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(folder: str, model_state, center: torch.Tensor, config: dict, meta: dict, optimizer_state=None) -> None:
    os.makedirs(folder, exist_ok=True)
    torch.save(model_state, os.path.join(folder, "model.pt"))
    torch.save(center.detach().float().cpu(), os.path.join(folder, "center.pt"))
    if optimizer_state is not None:
        torch.save(optimizer_state, os.path.join(folder, "optimizer.pt"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=float)
    # The sums last: they cover every file above.
    sums = {}
    for name in sorted(os.listdir(folder)):
        if name != SUMS:
            with open(os.path.join(folder, name), "rb") as f:
                sums[name] = sha256(f.read())
    with open(os.path.join(folder, SUMS), "w") as f:
        json.dump(sums, f, indent=2, sort_keys=True)


def store(folder: str, url: str) -> str:
    """Copy a local checkpoint folder to ``url`` (a folder or s3://), file by file with the sums
    last, so that ``load`` never accepts a copy with a file still missing. Returns ``url``."""
    from msc_dist import storage

    for name in sorted(n for n in os.listdir(folder) if n != SUMS) + [SUMS]:
        with open(os.path.join(folder, name), "rb") as f:
            storage.write_bytes_atomic(storage.join(url, name), f.read())
    return url


def collapsed_url(run_dir: str, epoch: int) -> str:
    """Where a run keeps the checkpoint of an epoch that the collapse alarm stopped (unregistered)."""
    from msc_dist import storage

    return storage.join(run_dir, "collapsed", f"epoch_{epoch:04d}")


def load(folder_url: str, with_optimizer: bool = False) -> LoadedCheckpoint:
    """Load a checkpoint folder from a local path or s3:// (through fsspec, no temp files).
    Every file is checked against sha256.json; ``model_id`` is the sha256 of model.pt."""
    import io

    from msc_dist import storage

    def _raw(name: str) -> bytes:
        url = storage.join(folder_url, name)
        if not storage.exists(url):
            raise CheckpointError(f"{folder_url} is not a complete checkpoint: missing {name}")
        return storage.read_bytes(url)

    try:
        sums = json.loads(_raw(SUMS))
    except CheckpointError:
        raise CheckpointError(f"{folder_url} has no {SUMS}: its files cannot be verified (a partial folder, or one "
                              "not written by msc_dist's training job); point at a checkpoint a run registered") from None

    def _bytes(name: str) -> bytes:
        data = _raw(name)
        if name not in sums or sha256(data) != sums[name]:
            raise CheckpointError(f"{storage.join(folder_url, name)} does not match its sha256 in {SUMS} "
                                  "(changed, truncated or still uploading)")
        return data

    def _tensor(data: bytes):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    model_bytes = _bytes("model.pt")
    opt = _tensor(_bytes("optimizer.pt")) if with_optimizer and "optimizer.pt" in sums else None
    return LoadedCheckpoint(_tensor(model_bytes), _tensor(_bytes("center.pt")), json.loads(_bytes("config.json")),
                            json.loads(_bytes("meta.json")), opt, sha256(model_bytes))


def registered_checkpoint(snapshot: dict) -> str | None:
    """The folder name of the latest checkpoint in a Ray Train checkpoint-manager snapshot."""
    latest = snapshot.get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name")


def resolve(url: str) -> str:
    """A checkpoint folder as given, or the latest checkpoint Ray Train registered in a run folder."""
    from msc_dist import storage

    if storage.exists(storage.join(url, SUMS)) or storage.exists(storage.join(url, "meta.json")):
        return url
    snap_url = storage.join(url, RAY_SNAPSHOT)
    if not storage.exists(snap_url):
        raise CheckpointError(f"{url} is neither a checkpoint folder (no {SUMS}) nor a run folder with a registered "
                              f"checkpoint (no {RAY_SNAPSHOT}: not a Ray Train run, or none reported yet)")
    name = registered_checkpoint(json.loads(storage.read_bytes(snap_url)))
    if not name:
        raise CheckpointError(f"{snap_url} records no checkpoint yet")
    return storage.join(url, name)
