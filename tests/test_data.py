import io
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_dataset
from msc_dist.data.decode import BadImage, decode_image
from msc_dist.data.loader import LabelFilter, ShardStream, kept_counts, make_loader
from msc_dist.data.make_shards import make_shards
from msc_dist.data.shards import MANIFEST, DataError, ShardWriter, describe, expand, iter_samples


def _jpeg(seed, size=32):
    a = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder, sizes, corrupt=(), label_fn=lambda i: 0, manifest=True):
    """Shards of the given sizes with keys k000000...; keys in ``corrupt`` get truncated JPEGs."""
    w = ShardWriter(str(folder), per_shard=10**9, classes=None)
    i = 0
    for n in sizes:
        for _ in range(n):
            key = f"k{i:06d}"
            data = _jpeg(i)
            if key in corrupt:
                data = data[: len(data) // 3]
            w.write(key, data, "jpg", label_fn(i))
            i += 1
        w._flush()
    w.close()
    if not manifest:
        os.remove(os.path.join(folder, MANIFEST))
    return [f"k{j:06d}" for j in range(i)]


def test_manifest_and_scan_agree(tmp_path):
    write_shards(tmp_path / "a", [7, 20, 33], label_fn=lambda i: i % 3)
    write_shards(tmp_path / "b", [7, 20, 33], label_fn=lambda i: i % 3, manifest=False)
    a, b = describe(str(tmp_path / "a")), describe(str(tmp_path / "b"))
    assert [s.count for s in a.shards] == [s.count for s in b.shards] == [7, 20, 33]
    assert a.label_counts() == b.label_counts() == {0: 20, 1: 20, 2: 20}
    assert len(expand(str(tmp_path / "b" / "shard-{000000..000002}.tar"))) == 3


def test_no_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards"):
        describe(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        describe(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no data given"):
        describe("")


def test_stream_partitions_exactly_across_ranks_and_loader_workers(tmp_path):
    keys = write_shards(tmp_path, [7, 20, 33])
    counts = kept_counts(describe(str(tmp_path)), LabelFilter(None))
    seen = []
    for rank in range(2):
        stream = ShardStream(counts, LabelFilter(None), 16, 4, world_size=2, rank=rank, resize_mode="squash")
        rank_keys = [k for b in make_loader(stream, num_workers=3) for k in b["keys"]]
        assert len(rank_keys) == 30
        seen += rank_keys
    assert sorted(seen) == keys


@pytest.mark.parametrize("train", [False, True])
def test_thread_loader_gives_the_dataloaders_batches_in_its_order(tmp_path, train):
    """CPU devices decode in threads (ThreadLoader), GPUs in DataLoader worker processes: the
    same batches, pixels and order either way (shards of uneven sizes: the workers end at
    different batches; a corrupt sample: its key travels in the same batch)."""
    write_shards(tmp_path, [7, 20, 33, 3], corrupt={"k000009"}, label_fn=lambda i: i % 2)
    counts = kept_counts(describe(str(tmp_path)), LabelFilter(None))
    stream = ShardStream(counts, LabelFilter(None), 16, 4, train=train, seed=3, shuffle_buffer=8, resize_mode="squash")

    def batches(loader, n=40):
        out = []
        for b in loader:  # a training stream never ends: the first n batches
            out.append(b)
            if len(out) == n:
                break
        return out

    procs, threads = batches(make_loader(stream, 3)), batches(make_loader(stream, 3, threads=True))
    assert len(procs) == len(threads) >= (40 if train else 15)
    for p, t in zip(procs, threads):
        assert p["keys"] == t["keys"] and p["corrupt"] == t["corrupt"] and p["sources"] == t["sources"]
        assert torch.equal(p["labels"], t["labels"]) and torch.equal(p["images"], t["images"])
    assert any(b["corrupt"] == ["k000009"] for b in threads)


def test_thread_loader_raises_worker_errors_and_stops_its_threads_early(tmp_path, monkeypatch):
    import threading

    from msc_dist.data import loader as loader_mod

    write_shards(tmp_path, [40, 40])
    counts = kept_counts(describe(str(tmp_path)), LabelFilter(None))
    stream = ShardStream(counts, LabelFilter(None), 16, 4, train=True, resize_mode="squash")
    it = iter(make_loader(stream, 2, threads=True))
    assert len(next(it)["keys"]) == 4
    assert any(t.name.startswith("msc-loader-") for t in threading.enumerate())
    it.close()  # the consumer stops (the training loop's last step): every thread ends
    assert not any(t.name.startswith("msc-loader-") for t in threading.enumerate())

    def broken(*a, **k):
        raise OSError("shard unreadable")

    monkeypatch.setattr(loader_mod, "iter_samples", broken)
    with pytest.raises(OSError, match="shard unreadable"):
        list(make_loader(ShardStream(counts, LabelFilter(None), 16, 4, resize_mode="squash"), 2, threads=True))
    assert not any(t.name.startswith("msc-loader-") for t in threading.enumerate())


def test_cpu_devices_decode_in_threads_and_gpus_in_processes(tmp_path, monkeypatch):
    import msc_dist.train.loop as loop
    from msc_dist.data.loader import ThreadLoader
    from msc_dist.train.config import TrainConfig

    write_shards(tmp_path, [8])
    counts = kept_counts(describe(str(tmp_path)), LabelFilter(None))
    made = []

    def recording(*a, **k):
        made.append(make_loader(*a, **k))
        return made[-1]

    monkeypatch.setattr(loop, "make_loader", recording)
    cfg = TrainConfig(image_size=16, batch_size=4, loader_workers=2, resize_mode="squash")
    got = [k for b in loop.loader_for(cfg, counts, LabelFilter(None), torch.device("cpu"), train=False) for k in b["keys"]]
    assert isinstance(made[0], ThreadLoader) and sorted(got) == [f"k{i:06d}" for i in range(8)]
    if torch.cuda.is_available():
        loop.loader_for(cfg, counts, LabelFilter(None), torch.device("cuda"), train=False)
        assert not isinstance(made[1], ThreadLoader)


def test_corrupt_images_are_skipped_counted_and_logged(tmp_path, caplog):
    keys = write_shards(tmp_path, [10], corrupt={"k000003"})
    # Plus a non-image member and a decompression bomb.
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    w = ShardWriter(str(tmp_path / "more"), 100)
    w.write("notimage", b"hello, not an image", "jpg", 0)
    w.write("bomb", bomb.getvalue(), "png", 0)
    w.write("fine", _jpeg(99), "jpg", 0)
    w.close()
    counts = kept_counts(describe(str(tmp_path)), LabelFilter(None)) + kept_counts(describe(str(tmp_path / "more")), LabelFilter(None))
    stream = ShardStream(counts, LabelFilter(None), 16, 4, max_pixels=10_000_000, resize_mode="squash")
    with caplog.at_level(logging.WARNING):
        batches = list(make_loader(stream, 0))
    got = [k for b in batches for k in b["keys"]]
    bad = [k for b in batches for k in b["corrupt"]]
    assert sorted(bad) == ["bomb", "k000003", "notimage"]
    assert sorted(got) == sorted([k for k in keys if k != "k000003"] + ["fine"])
    assert "key=k000003" in caplog.text and "key=bomb" in caplog.text


def test_decode_limits_and_errors():
    assert decode_image(_jpeg(1, 64), 32, resize_mode="squash").shape == (32, 32, 3)
    with pytest.raises(BadImage, match="empty"):
        decode_image(b"", 32, resize_mode="squash")
    with pytest.raises(BadImage, match="not a decodable image"):
        decode_image(_jpeg(1)[:50], 32, resize_mode="squash")
    big = io.BytesIO()
    Image.new("L", (3000, 3000)).save(big, format="PNG")
    with pytest.raises(BadImage, match="above the limit"):
        decode_image(big.getvalue(), 32, max_pixels=1_000_000, resize_mode="squash")


def test_decode_matches_the_plain_pil_pipeline_for_every_mode():
    """The fast paths (no copying convert for RGB, grayscale resized before it becomes RGB) give
    exactly the pixels of convert("RGB") then resize, for each mode real data sets use."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    cases = {"RGB": base, "L": base.convert("L"), "P": base.convert("P"), "RGBA": base.convert("RGBA"),
             "I;16": Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16))}
    for mode, im in cases.items():
        for fmt in ("PNG", "JPEG") if mode in ("RGB", "L") else ("PNG",):
            buf = io.BytesIO()
            im.save(buf, format=fmt)
            for size in (32, 50, 96):
                ref = Image.open(io.BytesIO(buf.getvalue()))
                ref.draft("RGB", (2 * size, 2 * size))
                ref = ref.convert("RGB").resize((size, size), Image.BILINEAR)
                got = decode_image(buf.getvalue(), size, resize_mode="squash")
                assert got.dtype == np.uint8 and got.shape == (size, size, 3)
                assert np.array_equal(got, np.asarray(ref)), (mode, fmt, size)


def test_loader_batches_are_channels_last_views_of_the_decoded_pixels(tmp_path):
    write_shards(tmp_path, [6])
    keep = LabelFilter(None)
    batch = next(iter(make_loader(ShardStream(kept_counts(describe(str(tmp_path)), keep), keep, 24, 6, resize_mode="squash"), 0)))
    x = batch["images"]
    assert x.shape == (6, 3, 24, 24) and x.dtype == torch.uint8
    assert x.is_contiguous(memory_format=torch.channels_last)  # no transposing copy on the CPU
    want = np.stack([decode_image(s.data, 24, resize_mode="squash") for s in iter_samples(describe(str(tmp_path)).shards[0].url)])
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), want)


def test_label_filter_keeps_normals_only(tmp_path):
    write_shards(tmp_path, [12], label_fn=lambda i: i % 4)
    keep = LabelFilter(frozenset({0}))
    counts = kept_counts(describe(str(tmp_path)), keep)
    assert counts[0][1] == 3
    b = list(make_loader(ShardStream(counts, keep, 16, 8, resize_mode="squash"), 0))
    assert [int(x) for bb in b for x in bb["labels"]] == [0, 0, 0]


def test_training_stream_wraps_around_and_yields_full_batches(tmp_path):
    write_shards(tmp_path, [5])
    counts = kept_counts(describe(str(tmp_path)), LabelFilter(None))
    it = iter(make_loader(ShardStream(counts, LabelFilter(None), 16, 4, train=True, resize_mode="squash"), 0))
    sizes = [next(it)["images"].shape[0] for _ in range(6)]  # 24 samples out of 5: wraps around
    assert sizes == [4] * 6


def test_make_shards_from_npz_one_class_protocol(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.npz", x_train=rng.integers(0, 255, (30, 28, 28), dtype=np.uint8), y_train=np.arange(30) % 3,
             x_test=rng.integers(0, 255, (12, 28, 28), dtype=np.uint8), y_test=np.arange(12) % 3)
    res = make_shards(str(tmp_path / "m.npz"), str(tmp_path / "out"), normal_class="1", per_shard=4)
    assert res["train"].label_counts() == {1: 10}
    assert res["test"].label_counts() == {0: 4, 1: 4, 2: 4}
    assert describe(str(tmp_path / "out" / "test")).classes == ["0", "1", "2"]


def test_make_shards_from_real_magnetic_tiles_skips_masks_and_splits(tmp_path):
    src = shared_dataset("magnetic-tile")
    sub = tmp_path / "src"
    for cls, n in (("MT_Free", 10), ("MT_Crack", 4)):
        (sub / cls / "Imgs").mkdir(parents=True)
        jpgs = sorted((src / cls / "Imgs").glob("*.jpg"))[:n]
        for j in jpgs:
            shutil.copy(j, sub / cls / "Imgs" / j.name)
            shutil.copy(j.with_suffix(".png"), sub / cls / "Imgs" / j.with_suffix(".png").name)
    res = make_shards(str(sub), str(tmp_path / "out"), exts=["jpg"], normal_class="MT_Free", train_fraction=0.7, seed=3)
    assert res["train"].label_counts() == {1: 7}  # classes sorted: MT_Crack=0, MT_Free=1
    assert res["test"].label_counts() == {0: 4, 1: 3}
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    again = make_shards(str(sub), str(tmp_path / "out2"), exts=["jpg"], normal_class="MT_Free", train_fraction=0.7, seed=3)
    assert json.loads((tmp_path / "out2" / "split.json").read_text()) == split  # same seed, same split
    assert again["train"].count == 7
    # real greyscale JPEGs of varying size decode to fixed-size RGB
    s = next(iter_samples(res["train"].shards[0].url))
    assert Image.open(io.BytesIO(s.data)).mode == "L"
    assert decode_image(s.data, 64, resize_mode="squash").shape == (64, 64, 3)


def _grouped_folder(root, n_groups=12, per_group=3, n_bad=4):
    """good/: n_groups parts photographed per_group times each (p<G>_v<V>.jpg); bad/: n_bad images."""
    groups = {}
    for g in range(n_groups):
        for v in range(per_group):
            rel = f"good/p{g:02d}_v{v}.jpg"
            (root / "good").mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(_jpeg(g * 10 + v))
            groups[rel] = f"part-{g}"
    (root / "bad").mkdir(parents=True)
    for i in range(n_bad):
        (root / "bad" / f"b{i}.jpg").write_bytes(_jpeg(1000 + i))
    return groups


def test_make_shards_splits_by_group_so_no_part_is_on_both_sides(tmp_path):
    from msc_dist.bench.quality import prepare
    from msc_dist.data.__main__ import run
    from msc_dist.data.config import MakeShardsConfig

    groups = _grouped_folder(tmp_path / "src")
    gfile = tmp_path / "groups.json"
    gfile.write_text(json.dumps(groups))
    part = lambda rel: groups[rel]

    # by image (no groups), most parts have photos on both sides: the bank holds their siblings
    make_shards(str(tmp_path / "src"), str(tmp_path / "img"), normal_class="good", seed=0)
    split = json.loads((tmp_path / "img" / "split.json").read_text())
    good_test = [r for r in split["test"] if r.startswith("good/")]
    assert {part(r) for r in split["train"]} & {part(r) for r in good_test}

    res = run("make-shards", MakeShardsConfig(src=str(tmp_path / "src"), out=str(tmp_path / "grp"), normal_class="good",
                                              seed=0, groups=str(gfile)))
    split = json.loads((tmp_path / "grp" / "split.json").read_text())
    good_test = [r for r in split["test"] if r.startswith("good/")]
    assert not {part(r) for r in split["train"]} & {part(r) for r in good_test}
    assert len(split["train"]) == res["train"]["samples"] == 27  # round(0.7 * 36) = 25, within one group of 3
    assert res["test"]["samples"] == 9 + 4  # the rest of the normal class and every other image
    assert split["split_by"] == {"groups": "groups.json", "train_groups": 9, "test_groups": 3}
    make_shards(str(tmp_path / "src"), str(tmp_path / "again"), normal_class="good", seed=0, groups=str(gfile))
    assert json.loads((tmp_path / "again" / "split.json").read_text()) == split  # seeded
    make_shards(str(tmp_path / "src"), str(tmp_path / "s1"), normal_class="good", seed=1, groups=str(gfile))
    assert json.loads((tmp_path / "s1" / "split.json").read_text())["train"] != split["train"]
    # bench quality and msc evaluate draw the same split from the same file
    prep = prepare(str(tmp_path / "src"), "good", str(tmp_path / "q"), groups=str(gfile))
    assert prep.train.count == 27 and prep.test.count == 13
    from msc_dist.config import ConfigError
    from msc_dist.evaluate.config import EvalConfig
    from msc_dist.evaluate.job import prepare_split

    prepare_split(EvalConfig(data=str(tmp_path / "src"), groups=str(gfile)), "good", str(tmp_path / "ev"))
    assert json.loads((tmp_path / "ev" / "split.json").read_text())["train"] == split["train"]
    with pytest.raises(ConfigError, match="own train/test split"):  # never silently ignored
        prepare_split(EvalConfig(data=str(tmp_path / "grp"), groups=str(gfile)), "good", str(tmp_path / "ev2"))

    # fail closed: a normal image without a group, no normal class, a file that is not a JSON object
    del groups["good/p03_v1.jpg"]
    gfile.write_text(json.dumps(groups))
    with pytest.raises(DataError, match="1 of the 36 normal images have no group.*p03_v1"):
        make_shards(str(tmp_path / "src"), str(tmp_path / "bad1"), normal_class="good", groups=str(gfile))
    with pytest.raises(DataError, match="--normal-class"):
        make_shards(str(tmp_path / "src"), str(tmp_path / "bad2"), groups=str(gfile))
    gfile.write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        make_shards(str(tmp_path / "src"), str(tmp_path / "bad3"), normal_class="good", groups=str(gfile))


def test_demo_set_is_labelled_and_deterministic(tmp_path):
    from msc_dist.data.demo import make_demo

    tr, te = make_demo(str(tmp_path / "a"), n_train=8, n_test_normal=4, n_test_defect=6, size=32, per_shard=5)
    assert tr.label_counts() == {0: 8}
    assert te.label_counts() == {0: 4, 1: 2, 2: 2, 3: 2}
    make_demo(str(tmp_path / "b"), n_train=8, n_test_normal=4, n_test_defect=6, size=32, per_shard=5)
    assert (tmp_path / "a/train/shard-000000.tar").read_bytes() == (tmp_path / "b/train/shard-000000.tar").read_bytes()


def _tiny_shard(folder, n=12, extra=None):
    with ShardWriter(str(folder), per_shard=1000) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(buf, format="PNG")
            w.write(f"k{i:03d}", buf.getvalue(), "png", i % 2)
    url = os.path.join(str(folder), "shard-000000.tar")
    if extra:
        import tarfile

        with tarfile.open(url, "a") as t:
            for name, data in extra.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return url


def test_a_dropped_connection_reopens_the_shard_and_loses_nothing(tmp_path, monkeypatch):
    """A transient error mid-shard (the connection drops twice) costs a reopen after a back-off,
    not the worker: every sample still comes once, in order. A missing shard raises at once."""
    from msc_dist import storage
    from msc_dist.data.shards import ByteCounter

    url = _tiny_shard(tmp_path)
    real_open, opens = storage.open_file, []

    class Flaky:
        def __init__(self, f, fail_after):
            self.f, self.left = f, fail_after

        def read(self, n=-1):
            self.left -= 1
            if self.left < 0:
                raise ConnectionResetError("connection reset by peer")
            return self.f.read(min(n, 1024) if n and n > 0 else 1024)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def flaky_open(u, mode="rb"):
        opens.append(u)
        f = real_open(u, mode)
        return Flaky(f, 6) if len(opens) <= 2 else f

    monkeypatch.setattr(storage, "open_file", flaky_open)
    monkeypatch.setattr(storage, "backoff_s", lambda attempt: 0.0)
    counter = ByteCounter()
    keys = [s.key for s in iter_samples(url, counter=counter)]
    assert keys == [f"k{i:03d}" for i in range(12)] and len(opens) == 3
    assert counter.n >= os.path.getsize(url)  # the re-reads are counted: read amplification is visible
    opens.clear()
    with pytest.raises(FileNotFoundError):
        list(iter_samples(str(tmp_path / "missing.tar")))
    assert len(opens) == 1  # not retried


def test_tar_members_above_the_limit_are_not_read(tmp_path):
    url = _tiny_shard(tmp_path, n=3, extra={"big.png": b"\x89PNG" + b"0" * 5000})
    got = {s.key: s for s in iter_samples(url, max_member_bytes=4096)}
    assert got["big"].data is None and "above the limit of 4096" in got["big"].error
    assert all(got[f"k{i:03d}"].data for i in range(3))
    with pytest.raises(DataError, match="refusing file name"):
        (tmp_path / "shards.json").write_text(json.dumps({"format": "msc-shards/1", "classes": None, "shards": [
            {"name": "../../etc/x.tar", "count": 1, "labels": {"null": 1}}]}))
        describe(str(tmp_path))


def test_bytes_to_device_path_matches_the_pil_path(tmp_path):
    """Loader workers hand encoded bytes; the batch is decoded and resized on the device (the CPU
    here: the same torchvision call runs nvjpeg on a GPU). Same keys, labels and batches as the
    pixel path, pixels within the stated tolerance, PNG through PIL, corrupt images dropped."""
    from msc_dist.data.device_decode import decode_batch, materialize, mean_abs_diff

    write_shards(tmp_path / "s", [9, 7], corrupt={"k000004"})
    info = describe(str(tmp_path / "s"))
    counts = kept_counts(info, LabelFilter(None))
    plain = list(ShardStream(counts, LabelFilter(None), 24, 4, resize_mode="squash"))
    enc = list(ShardStream(counts, LabelFilter(None), 24, 4, encoded=True, resize_mode="squash"))
    assert all("encoded" in b and "images" not in b for b in enc)
    dev = [materialize(b, 24, "cpu", resize_mode="squash") for b in enc]
    assert [b["keys"] for b in dev] == [b["keys"] for b in plain]
    assert sum(len(b["corrupt"]) for b in dev) == 1 and "k000004" in sum((b["corrupt"] for b in dev), [])
    for a, b in zip(dev, plain):
        assert torch.equal(a["labels"], b["labels"]) and a["images"].is_contiguous(memory_format=torch.channels_last)
        for x, y in zip(a["images"].permute(0, 2, 3, 1).numpy(), b["images"].permute(0, 2, 3, 1).numpy()):
            assert mean_abs_diff(x, y) < 2.5
    # Real photographs (the magnetic tiles) at the sizes we train at.
    tiles = sorted((shared_dataset("magnetic-tile") / "MT_Free" / "Imgs").glob("*.jpg"))[:12]
    datas = [p.read_bytes() for p in tiles]
    png = io.BytesIO()
    Image.open(io.BytesIO(datas[0])).save(png, format="PNG")
    datas += [png.getvalue(), b"\xff\xd8\xff\xe0" + b"\0" * 50]  # a PNG, and a truncated JPEG
    for size, mode in ((64, "squash"), (224, "squash"), (64, "center_crop"), (224, "center_crop")):
        x, ok, errors = decode_batch(datas, size, "cpu", resize_mode=mode)
        assert ok == list(range(13)) and list(errors) == [13]
        for i, img in zip(ok, x.permute(0, 2, 3, 1).numpy()):
            assert mean_abs_diff(img, decode_image(datas[i], size, resize_mode=mode)) < 2.5, (size, mode, i)


def test_center_crop_is_the_papers_test_transform_and_squash_keeps_the_whole_image():
    """resize_mode center_crop gives exactly torchvision's Resize(int(S * 256 / 224)) +
    CenterCrop(S) on non-square images of either orientation (PNG: no JPEG draft scaling);
    squash gives Resize((S, S)), keeping a mark at the image's edge."""
    import torchvision.transforms as T

    rng = np.random.default_rng(1)
    for w, h in ((150, 90), (90, 150), (64, 64), (33, 47)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[:, :4] = 255  # a defect on the left edge
        img = Image.fromarray(arr)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        for size in (32, 64):
            ref = np.asarray(T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size)])(img))
            assert np.array_equal(decode_image(buf.getvalue(), size, resize_mode="center_crop"), ref), (w, h, size)
            assert np.array_equal(decode_image(buf.getvalue(), size, resize_mode="squash"),
                                  np.asarray(img.resize((size, size), Image.BILINEAR))), (w, h, size)
    assert decode_image(buf.getvalue(), 32, resize_mode="squash")[:, 0].min() > 200  # the edge is kept
    with pytest.raises(ValueError, match="center_crop"):
        decode_image(buf.getvalue(), 32, resize_mode="crop")


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    from msc_dist.data.device_decode import decode_batch, probe

    big = io.BytesIO()
    Image.new("RGB", (3000, 2000)).save(big, format="JPEG")
    with pytest.raises(BadImage, match="above the limit"):
        probe(big.getvalue(), max_pixels=5_000_000)
    x, ok, errors = decode_batch([big.getvalue()], 32, "cpu", max_pixels=5_000_000, resize_mode="squash")
    assert x.shape[0] == 0 and "above the limit" in errors[0]
    with pytest.raises(BadImage, match="not accepted"):  # the decoder's allow-list, from the header
        probe(b"GIF89a nonsense")
