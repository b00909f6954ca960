"""The paper's one-class protocol: ``python -m msc_dist.evaluate``."""
