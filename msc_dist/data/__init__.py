"""WebDataset shards: listing, manifests, planning the split across ranks and loader workers,
and streaming decode. See ``python -m msc_dist.data --help`` for the shard tools."""
