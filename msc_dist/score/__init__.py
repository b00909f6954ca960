"""Offline scoring of image buckets/folders/shards: ``python -m msc_dist.score``."""
