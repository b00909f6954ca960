"""Benchmarks: ``python -m msc_dist.bench {train,...}``; each prints one JSON object."""
