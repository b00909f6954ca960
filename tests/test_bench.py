"""The benchmark module runs and reports numbers (figures themselves go in notes, not asserts)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("args,key", [
    (["train", "--image-size", "32", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--loader-workers", "0"], "images_per_s"),
    (["embed", "--image-size", "32", "--images", "64", "--batch-size", "32", "--loader-workers", "0"], "images_per_s"),
    (["search", "--n", "3000", "--d", "64", "--queries", "300", "--num-shards", "3"], "queries_per_s"),
])
def test_bench_prints_json(args, key):
    r = subprocess.run([sys.executable, "-m", "msc_dist.bench", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["bench"] == args[0] and res[key] > 0
