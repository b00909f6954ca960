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


def load(folder: str, with_optimizer: bool = False) -> LoadedCheckpoint:
    def _t(name):
        return torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)

    missing = [n for n in ("model.pt", "center.pt", "config.json", "meta.json") if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete checkpoint: missing {missing}")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    opt = None
    if with_optimizer and os.path.exists(os.path.join(folder, "optimizer.pt")):
        opt = _t("optimizer.pt")
    return LoadedCheckpoint(_t("model.pt"), _t("center.pt"), config, meta, opt)
