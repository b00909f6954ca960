"""MSC fine-tuning on Ray Train: ``python -m msc_dist.train``."""

from msc_dist.train.config import TrainConfig

__all__ = ["TrainConfig"]
