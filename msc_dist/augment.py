"""Batched augmentation on the training device (kornia). Training only: the input scaling and
normalisation that serving needs live in ``features.to_unit`` and ``backbones.Normalize``.

Loader output is (B, 3, S', S') uint8 (training images are decoded at ``view_source_scale`` x S, so
that the crops are sharp); the views come out S x S. Everything here runs on whole batches,
per-sample random, so the GPU does the work the paper's code did image by image on the CPU."""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn


def _odd(n: float) -> int:
    k = max(3, int(n))
    return k if k % 2 else k + 1


class TwoViewAugment(nn.Module):
    """The paper's MoCo-v2 pipeline, applied independently to each sample of each view:
    RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2,
    Gaussian blur sigma in [0.1, 2] p=0.5, horizontal flip.

    ``crop_min_scale`` and ``hflip`` exist because the contrastive loss teaches invariance to
    whatever the views differ by: for data whose identity lives in orientation or in the whole
    object (digits, text, oriented parts), flips and small crops teach the wrong invariance."""

    def __init__(self, image_size: int, crop_min_scale: float = 0.2, hflip: bool = True):
        super().__init__()
        if not 0.0 < crop_min_scale <= 1.0:
            raise ValueError(f"crop_min_scale must be in (0, 1], got {crop_min_scale}")
        self.pipe = K.AugmentationSequential(
            K.RandomResizedCrop((image_size, image_size), scale=(crop_min_scale, 1.0)),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            # Kernel ~10% of the image side, as SimCLR/MoCo-v2 use at 224 px.
            K.RandomGaussianBlur(_odd(0.1 * image_size), (0.1, 2.0), p=0.5),
            *([K.RandomHorizontalFlip()] if hflip else []),
        )

    @torch.no_grad()
    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """(B, 3, S', S') uint8 -> (2B, 3, S, S) float in [0, 1] (S = image_size, any S'): rows [0, B)
        view 1, [B, 2B) view 2."""
        x = x_uint8.float().div_(255.0)
        return self.pipe(torch.cat([x, x], dim=0)).clamp_(0.0, 1.0)
