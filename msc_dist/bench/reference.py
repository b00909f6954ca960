"""The paper's training procedure written plainly, to measure our loop against (``bench quality
--loop reference``). Deliberately independent of our data path and step:

* per-image torchvision transforms on PIL images in DataLoader workers (the paper's MoCo-v2 views:
  RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2,
  Gaussian blur sigma 0.1-2 p=0.5, horizontal flip);
* the center, the kNN bank and every evaluated image resized on the shorter side to
  ``S * 256 / 224`` and center-cropped to S (the paper's test transform);
* two forward passes (one per view), a full reshuffle every epoch, SGD as configured;
* the same backbone, frozen half, BatchNorm in eval mode, loss and kNN score as ours.

It takes the encoded images of the benchmark's shards (MNIST digits, the magnetic tiles) and decodes
each with PIL, as the paper's ImageFolder does. The learning-rate schedule and warm-up follow the
config (the paper's: constant), so that both presets can be compared loop against loop."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from msc_dist.backbones import build_model
from msc_dist.features import place
from msc_dist.loss import msc_loss
from msc_dist.train.schedule import lr_factor


def transforms(size: int, crop_min_scale: float, hflip: bool):
    import torchvision.transforms as T

    train = T.Compose([
        T.RandomResizedCrop(size, scale=(crop_min_scale, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=max(3, int(0.1 * size)) | 1, sigma=(0.1, 2.0))], p=0.5),
        *([T.RandomHorizontalFlip()] if hflip else []),
        T.ToTensor(),
    ])
    test = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor()])
    return train, test


class _Images(Dataset):
    """Encoded images (bytes) decoded with PIL per item, as the paper's ImageFolder does."""

    def __init__(self, x: list[bytes], transform, views: int = 1):
        self.x, self.transform, self.views = x, transform, views

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        img = Image.open(io.BytesIO(self.x[i])).convert("RGB")
        if self.views == 1:
            return self.transform(img)
        return tuple(self.transform(img) for _ in range(self.views))


@torch.no_grad()
def _embed(model, x: list[bytes], transform, device, batch_size: int, workers: int) -> torch.Tensor:
    model.eval()
    out = []
    for b in DataLoader(_Images(x, transform), batch_size=batch_size, num_workers=workers):
        out.append(model(b.to(device).contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out)


def train_reference(x_train: list[bytes], cfg, device: torch.device, x_eval=None, on_epoch=None):
    """Fine-tune as the paper's code does; returns (model, test transform). ``on_epoch(epoch,
    model, loss)`` runs after epoch 0 (frozen) and every training epoch."""
    torch.manual_seed(cfg.seed)
    train_tf, test_tf = transforms(cfg.image_size, cfg.crop_min_scale, cfg.hflip)
    model = place(build_model(cfg.backbone, cfg.weights), device)
    center = F.normalize(_embed(model, x_train, test_tf, device, cfg.batch_size, cfg.loader_workers).mean(0), dim=0)
    center = center.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    if on_epoch:
        on_epoch(0, model, None)
    loader = DataLoader(_Images(x_train, train_tf, views=2), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.loader_workers, generator=torch.Generator().manual_seed(cfg.seed))
    total, warmup, step = cfg.epochs * len(loader), round(cfg.warmup_epochs * len(loader)), 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses = []
        for v1, v2 in loader:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, total, warmup, cfg.lr_schedule)
            step += 1
            z1 = model(v1.to(device).contiguous(memory_format=torch.channels_last))
            z2 = model(v2.to(device).contiguous(memory_format=torch.channels_last))
            loss = msc_loss(z1, z2, center, cfg.temperature, cfg.angular_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        if on_epoch:
            on_epoch(epoch, model, float(np.mean(losses)) if losses else None)
    return model, test_tf


def embed_with(model, x: list[bytes], transform, cfg, device) -> torch.Tensor:
    return _embed(model, x, transform, device, cfg.batch_size, cfg.loader_workers)
