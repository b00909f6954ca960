"""The detector registry (msc_dist/registry.py): names, publishing into it, list / show / remove /
default through the msc CLI, and two publishes of one detector at once."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from msc_dist import registry
from msc_dist.config import ConfigError
from msc_dist.index import load_index, write_index

def _unit(n: int, d: int, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _publish(reg: Path, name: str, seed: int = 0, n: int = 40):
    return write_index(registry.root(str(reg), name), _unit(n, 8, seed), [f"s{i}" for i in range(n)], f"m{seed}")


@pytest.fixture
def _msc(capsys):
    """``msc ARGS`` in this process (the console script's own main): (exit status, stdout, stderr)."""
    from msc_dist.cli import main

    def run(*args: str) -> SimpleNamespace:
        code = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


@pytest.mark.parametrize("name", ["bottle", "plant-a/bottle", "a0_b", "x/y-1"])
def test_valid_names(name):
    assert registry.check_name(name) == name


@pytest.mark.parametrize("name", ["", "Bottle", "a/b/c", "../x", "a/..", "a.b", "-a", "a//b", "/a", "a/", "_x", "a b"])
def test_invalid_names_are_refused_with_the_rule(name):
    with pytest.raises(ConfigError, match=r"\[a-z0-9\]\[a-z0-9_-\]\*"):
        registry.check_name(name)


def test_list_show_default_remove_purge_through_the_cli(tmp_path, _msc):
    reg = tmp_path / "reg"
    a = _publish(reg, "bottle", 1)
    b = _publish(reg, "plant-a/cable", 2)
    _publish(reg, "plant-a/cable", 3)  # a second version of one detector
    out = json.loads(_msc("detectors", "list", "--registry", str(reg)).stdout)
    assert out["default"] is None and [d["name"] for d in out["detectors"]] == ["bottle", "plant-a/cable"]
    r = _msc("detectors", "show", "plant-a/cable", "--registry", str(reg))
    shown = json.loads(r.stdout)
    assert shown["version"] != b.version and b.version in shown["versions"] and shown["model_id"] == "m3"
    r = _msc("detectors", "default", "nope", "--registry", str(reg))
    assert r.returncode == 2 and "no detector 'nope'" in r.stderr and "bottle, plant-a/cable" in r.stderr
    assert json.loads(_msc("detectors", "default", "bottle", "--registry", str(reg)).stdout) == {"default": "bottle"}
    assert registry.get_default(str(reg)) == "bottle"
    # remove: 404-able at once (no pointer), the files stay until --purge
    r = _msc("detectors", "remove", "bottle", "--registry", str(reg))
    assert r.returncode == 0, r.stderr
    assert registry.names(str(reg)) == ["plant-a/cable"] and registry.names(str(reg), removed=True) == ["bottle"]
    assert (reg / "bottle" / "versions" / a.version / "manifest.json").exists()
    assert registry.get_default(str(reg)) is None  # the default was removed
    with pytest.raises(registry.UnknownDetector):
        registry.describe(str(reg), "bottle")
    r = _msc("detectors", "remove", "bottle", "--registry", str(reg))
    assert r.returncode == 2 and "--purge" in r.stderr
    _publish(reg, "bottle", 4)  # published again: live, not removed
    assert registry.names(str(reg)) == ["bottle", "plant-a/cable"] and registry.names(str(reg), removed=True) == []
    assert _msc("detectors", "remove", "bottle", "--registry", str(reg)).returncode == 0
    assert _msc("detectors", "remove", "bottle", "--purge", "--registry", str(reg)).returncode == 0
    assert not (reg / "bottle").exists()
    r = _msc("detectors", "show", "Bad.Name", "--registry", str(reg))
    assert r.returncode == 2 and "not valid" in r.stderr and "Traceback" not in r.stderr


def test_a_name_never_nests_in_another_detector(tmp_path):
    reg = str(tmp_path / "reg")
    _publish(tmp_path / "reg", "plant-a/cable")
    with pytest.raises(ConfigError, match="group of detectors"):
        registry.check_publishable(reg, "plant-a")
    _publish(tmp_path / "reg", "bottle")
    with pytest.raises(ConfigError, match="is a detector itself"):
        registry.check_publishable(reg, "bottle/x")


def test_two_publishes_of_one_detector_at_once_leave_one_live_and_whole(tmp_path, monkeypatch):
    """Publish A starts first (an older version name) and is slow to commit; publish B commits
    and cleans up in between. B must not delete A's files while A may still write them, nor may A
    commit a version whose files are gone: the live version afterwards loads, every checksum."""
    from msc_dist import storage
    from msc_dist.index import versions

    reg = tmp_path / "reg"
    _publish(reg, "bottle", 0)  # a live version before both
    b_done, real = threading.Event(), storage.write_bytes_atomic
    a_thread = []

    def slow_manifest(url, data):
        if threading.current_thread() in a_thread and url.endswith(versions.MANIFEST):
            assert b_done.wait(60)  # A's manifest + pointer only after B has published and cleaned up
        return real(url, data)

    monkeypatch.setattr(versions.storage, "write_bytes_atomic", slow_manifest)
    errors = []

    def publish_a():
        try:
            _publish(reg, "bottle", 1)
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            errors.append(e)

    t = threading.Thread(target=publish_a)
    a_thread.append(t)
    t.start()
    import time

    time.sleep(0.5)  # A has written its shards and waits before its manifest
    man_b = _publish(reg, "bottle", 2)
    b_done.set()
    t.join(60)
    assert not errors, errors
    live = load_index(registry.root(str(reg), "bottle"))  # whole: every file there, every checksum right
    assert live.manifest.model_id in ("m1", "m2") and live.count == 40
    assert (reg / "bottle" / "versions" / man_b.version / "manifest.json").exists()  # B's stays too (keep 2)


def test_many_concurrent_publishes_leave_a_whole_live_version(tmp_path):
    reg = tmp_path / "reg"
    threads = [threading.Thread(target=_publish, args=(reg, "bottle", s)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    live = load_index(registry.root(str(reg), "bottle"))
    assert live.manifest.model_id in {f"m{s}" for s in range(6)} and live.count == 40


@pytest.mark.slow
def test_msc_embed_detector_publishes_into_an_s3_registry(local_ray, s3_server, demo_data, tmp_path, _msc):
    """``msc embed --detector NAME --registry s3://...``: the embedding job's version and pointer
    under REGISTRY/NAME/, which list / show / remove read and change on S3 as on a folder."""
    import boto3

    from conftest import tiny_checkpoint
    from msc_dist.embed.config import EmbedConfig
    from msc_dist.embed.job import main as embed_main
    from msc_dist.scorer import open_scorer

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="detectors")
    reg = "s3://detectors/registry"
    ck = tiny_checkpoint(tmp_path / "ck", image_size=32, resize_mode="squash", data=str(demo_data / "train"))
    with pytest.raises(ConfigError, match="not both"):
        embed_main(EmbedConfig(checkpoint=ck, detector="plant-a/bottle", registry=reg, out=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match="not valid"):
        embed_main(EmbedConfig(checkpoint=ck, detector="Plant.A", registry=reg))
    uri = f"sqlite:///{tmp_path}/ml/mlflow.db"
    out = embed_main(EmbedConfig(checkpoint=ck, detector="plant-a/bottle", registry=reg, batch_size=16, rows_per_task=16,
                                 tracking_uri=uri))
    assert out.out == "s3://detectors/registry/plant-a/bottle"
    from msc_dist.index import version_root
    from msc_dist.tracking import version_source

    # With a tracking URI, the published version is a registered model version pointing at it.
    assert out.registered == "1" and out.tracking_error is None
    assert version_source(uri, "plant-a/bottle") == version_root(out.out, out.manifest.version)
    shown = json.loads(_msc("detectors", "show", "plant-a/bottle", "--registry", reg).stdout)
    assert shown["version"] == out.manifest.version and shown["index_size"] == out.manifest.count > 0
    scorer = open_scorer(registry.root(reg, "plant-a/bottle"))  # the manifest names the checkpoint: it loads and scores
    assert scorer.version == out.manifest.version
    assert json.loads(_msc("detectors", "list", "--registry", reg).stdout)["detectors"][0]["name"] == "plant-a/bottle"
    assert _msc("detectors", "remove", "plant-a/bottle", "--registry", reg).returncode == 0
    assert registry.names(reg) == [] and registry.names(reg, removed=True) == ["plant-a/bottle"]


def test_msc_serve_registry_fails_in_one_line_before_serve_starts(tmp_path, _msc):
    r = _msc("serve", "--registry", str(tmp_path / "none"), "--allow-anonymous")
    assert r.returncode == 2 and "does not exist" in r.stderr and "msc embed --detector" in r.stderr
    r = _msc("serve", "--registry", str(tmp_path), "--index-shards", "2", "--allow-anonymous")
    assert r.returncode == 2 and "set index_shards 0" in r.stderr
