"""The benchmark module runs and reports numbers (figures themselves go in notes, not asserts)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("args,key,expect", [
    (["train", "--image-size", "32", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--loader-workers", "0"],
     "images_per_s", {}),
    (["train", "--backbone", "resnet18", "--random-init", "--synthetic", "--image-size", "32", "--batch-size", "4",
      "--steps", "1", "--warmup", "1", "--loader-workers", "0"], "images_per_s", {"synthetic": True, "pretrained": False, "view_source_size": 64}),  # views cut from 2 x 32
    (["embed", "--image-size", "32", "--images", "64", "--batch-size", "32", "--loader-workers", "0"], "images_per_s", {}),
    (["embed", "--image-size", "32", "--images", "64", "--batch-size", "32", "--loader-workers", "0", "--random-init",
      "--job"], "job_images_per_s", {"job_over_torch": 1.0, "job_rounds": [pytest.approx(0, abs=1e9)]}),  # msc embed's own rate beside
    (["load", "--image-size", "32", "--images", "64", "--batch-size", "16", "--loader-workers", "1"], "images_per_s",
     {"images": 64}),  # every image, once
    (["search", "--n", "3000", "--d", "64", "--queries", "300", "--num-shards", "3"], "queries_per_s", {}),
    (["search", "--backend", "torch", "--n", "3000", "--d", "64", "--queries", "300"], "queries_per_s",
     {"backend": "torch"}),
])
def test_bench_prints_json(args, key, expect):
    r = subprocess.run([sys.executable, "-m", "msc_dist.bench", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["bench"] == args[0] and res[key] > 0
    assert {k: res[k] for k in expect} == expect


@pytest.mark.slow
def test_bench_quality_one_class_protocol_on_real_digits(tmp_path):
    """A tiny real MNIST subset through the one-process protocol: every method, every metric, the
    frozen-feature epoch 0 identical for both fine-tuned methods, results saved per class."""
    import numpy as np

    from conftest import shared_dataset

    src = np.load(shared_dataset("mnist") / "mnist.npz")
    rng = np.random.default_rng(0)
    tr, te = rng.choice(60000, 600, replace=False), rng.choice(10000, 200, replace=False)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=src["x_train"][tr], y_train=src["y_train"][tr], idx_train=tr,
             x_test=src["x_test"][te], y_test=src["y_test"][te], idx_test=te)
    out = tmp_path / "q.json"
    cmd = [sys.executable, "-m", "msc_dist.bench", "quality", "--data", str(npz), "--classes", "0", "1",
           "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--lr", "1e-4",
           "--loader-workers", "0", "--no-hflip", "--crop-min-scale", "0.5", "--json-out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == json.loads(out.read_text())
    assert set(res["classes"]) == {"0", "1"}
    assert res["config"]["hflip"] is False and res["config"]["crop_min_scale"] == 0.5
    for c, per in res["classes"].items():
        n_normal = int((src["y_train"][tr] == int(c)).sum())
        for m in ("knn", "msc", "msc-noangular"):
            assert per[m]["test_samples"] == 200
            assert 0 < per[m]["index_size"] < n_normal  # the rest calibrates the threshold
            for k in ("roc_auc", "average_precision", "f1_at_threshold", "fpr_at_threshold", "fpr_at_95_tpr"):
                assert 0.0 <= per[m][k] <= 1.0, (c, m, k)
        assert per["knn"]["roc_auc"] > 0.8  # frozen ImageNet features already tell these digits apart
        e_msc, e_noang = per["msc"]["epoch_auc"], per["msc-noangular"]["epoch_auc"]
        assert [e for e, _ in e_msc] == [0, 1] and e_msc[0] == e_noang[0]
        assert e_msc[1] != e_noang[1]  # the angular term changed training
    for m in ("knn", "msc"):
        assert res["mean"][m]["roc_auc"] == pytest.approx(np.mean([res["classes"][c][m]["roc_auc"] for c in "01"]))

    # --eval-every 0 skips the ROC-AUC per epoch (a test-set pass each) and changes nothing else:
    # the same seed trains the same model to the same final metrics.
    r0 = subprocess.run(cmd[:cmd.index("--classes")] + ["--classes", "0", "--methods", "msc", "--eval-every", "0"]
                        + cmd[cmd.index("--image-size"):cmd.index("--json-out")], capture_output=True, text=True, timeout=600)
    assert r0.returncode == 0, r0.stderr[-3000:]
    fast = json.loads(r0.stdout.strip().splitlines()[-1])["classes"]["0"]["msc"]
    assert [a for _, a in fast["epoch_auc"]] == [None, None]
    for k in ("roc_auc", "average_precision", "f1_at_threshold", "fpr_at_95_tpr"):
        assert fast[k] == pytest.approx(res["classes"]["0"]["msc"][k], abs=1e-6), k


@pytest.mark.slow
def test_bench_embed_scale_reports_driver_memory_and_bytes_read(tmp_path):
    """The real embedding job and parallel index build on tiny images: one JSON line with the
    figures that decide whether the job survives 100 M rows; every shard byte read once."""
    cmd = [sys.executable, "-m", "msc_dist.bench", "embed-scale", "--rows", "3000", "--per-shard", "1000",
           "--num-shards", "2", "--rows-per-task", "100", "--workdir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rows"] == 3000 and res["index_shards"] == 2 and res["corrupt"] == 0
    assert res["bytes_read_ratio"] == pytest.approx(1.0, abs=0.01) and res["driver_peak_rss_mb"] > 0
    assert 2500 < res["index_count"] < 2900  # the seeded 10 % calibration hold-out is not indexed


@pytest.mark.slow
def test_bench_quality_reference_loop_runs_the_same_protocol(tmp_path):
    """--loop reference: the paper's loop written plainly, same hold-out, bank and metrics as ours."""
    import numpy as np

    from conftest import shared_dataset

    src = np.load(shared_dataset("mnist") / "mnist.npz")
    rng = np.random.default_rng(1)
    tr, te = rng.choice(60000, 500, replace=False), rng.choice(10000, 150, replace=False)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=src["x_train"][tr], y_train=src["y_train"][tr], idx_train=tr,
             x_test=src["x_test"][te], y_test=src["y_test"][te], idx_test=te)
    cmd = [sys.executable, "-m", "msc_dist.bench", "quality", "--data", str(npz), "--classes", "1", "--loop", "reference",
           "--methods", "knn", "msc", "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--lr", "1e-4",
           "--loader-workers", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    per = res["classes"]["1"]
    assert res["loop"] == "reference" and set(per) == {"knn", "msc"}
    n_normal = int((src["y_train"][tr] == 1).sum())
    for m in ("knn", "msc"):
        assert 0.5 < per[m]["roc_auc"] <= 1 and per[m]["test_samples"] == 150
        assert 0 < per[m]["index_size"] < n_normal  # the same hashed-key hold-out as ours
    assert [e for e, _ in per["msc"]["epoch_auc"]] == [0, 1]


def test_bench_quality_methods_named_after_a_preset_train_with_its_values():
    """msc-fast and msc-natural: the preset's values over the given settings (its keys win), the
    rest of the settings kept; msc: the settings as given."""
    from msc_dist.bench.quality import METHODS, method_config
    from msc_dist.train.config import TrainConfig

    base = TrainConfig(image_size=32, batch_size=8, epochs=1, lr=1e-4, loader_workers=0, seed=5)
    for name in ("fast", "natural"):
        assert f"msc-{name}" in METHODS
        cfg = method_config(base, f"msc-{name}")
        preset = TrainConfig.PRESETS[name]
        assert cfg.preset == name and {k: getattr(cfg, k) for k in preset} == preset
        assert (cfg.image_size, cfg.batch_size, cfg.seed) == (32, 8, 5)
    assert method_config(base, "msc") == base and method_config(base, "knn").epochs == 0


def test_bench_quality_on_an_image_folder_over_seeds_with_both_loops_and_a_plot(tmp_path):
    """An image folder (a class per subfolder, as the magnetic tiles): a seeded 70/30 split of the
    normal class, the other classes anomalies; each method once per seed with mean and spread;
    msc-fast trains with the fast preset (its epochs, schedule); the reference loop reads the same
    shards; the ROC-AUC-per-epoch plot is written."""
    import numpy as np
    from PIL import Image

    from msc_dist.bench.quality import bench_quality
    from msc_dist.train.config import TrainConfig

    rng = np.random.default_rng(0)
    for cls, n in (("good", 16), ("bad", 8)):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(60, 120, (40, 56), dtype=np.uint8)
            if cls == "bad":
                a[10:22, 20:34] = 255
            Image.fromarray(a).save(tmp_path / "src" / cls / f"{i}.png")
            Image.fromarray(a).save(tmp_path / "src" / cls / f"{i}.jpg")  # decoys: --exts picks png only
    base = TrainConfig(image_size=32, batch_size=8, epochs=1, lr=1e-4, loader_workers=0)
    res = bench_quality(str(tmp_path / "src"), ["good"], base, ["knn", "msc-fast"], "cpu", log=lambda m: None,
                        seeds=[0, 1], exts=["png"], plot_dir=str(tmp_path / "plots"))
    per = res["classes"]["good"]
    assert res["seeds"] == [0, 1] and len(per["msc-fast"]["seeds"]) == 2
    fast = TrainConfig.PRESETS["fast"]
    for run in per["msc-fast"]["seeds"]:
        ran = [e for e, _ in run["epoch_auc"]]
        # the preset's epochs, unless its collapse alarm stopped the run (noise this small collapses)
        assert ran == list(range(len(ran))) and 1 < len(ran) <= fast["epochs"] + 1
        assert len(ran) == fast["epochs"] + 1 or (run["epochs"][-1]["collapsed"] and fast["on_collapse"] == "stop")
        assert run["test_samples"] == 8 + 16 - 11 and run["epochs"][1]["lr"] == pytest.approx(fast["lr"])
    assert per["msc-fast"]["seeds"][0]["epochs"][1]["loss"] != per["msc-fast"]["seeds"][1]["epochs"][1]["loss"]  # seeds differ
    aucs = [r["roc_auc"] for r in per["msc-fast"]["seeds"]]
    assert per["msc-fast"]["roc_auc"] == pytest.approx(np.mean(aucs)) and per["msc-fast"]["roc_auc_std"] == pytest.approx(np.std(aucs))
    assert per["knn"]["roc_auc"] > 0.9  # a white square on grey noise
    assert (tmp_path / "plots" / "epoch_auc_ours_good.png").stat().st_size > 5000
    ref = bench_quality(str(tmp_path / "src"), ["good"], base, ["msc"], "cpu", log=lambda m: None, loop="reference",
                        seeds=[0, 1], exts=["png"])
    r = ref["classes"]["good"]["msc"]
    assert ref["loop"] == "reference" and len(r["seeds"]) == 2 and r["test_samples"] == 13
    assert [e for e, _ in r["epoch_auc"]] == [0, 1]


@pytest.mark.slow
def test_gpu_check_smoke_writes_each_row_and_the_profile_to_out_as_measured(tmp_path):
    """infra/gpu-check.sh under SMOKE=1 on the CPU: the Lite0 row's JSON line and the profile of
    its step land in $OUT as soon as they are measured, so a run killed during the next row (as a
    device command past its limit is) keeps them."""
    import os
    import signal
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "STAGES": "bench", "ROWS": "train_lite0 embed_lite0", "PROFILE_STEPS": "1",
           "OUT": str(out), "WORK": str(tmp_path / "work"), "DATA": str(tmp_path / "data"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen(["bash", "infra/gpu-check.sh"], cwd=root, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    rows, deadline = out / "h200.jsonl", time.time() + 240
    try:
        while not (rows.exists() and rows.read_text().endswith("\n")) and p.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # cut short: during embed_lite0 (or after the end)
        log = p.communicate()[0]
    assert rows.exists(), log[-3000:]
    (line,) = [json.loads(x) for x in rows.read_text().splitlines()]
    assert line["work"] == "train_lite0" and line["backbone"] == "efficientnet_lite0" and line["images_per_s"] > 0
    assert line["target"] == 9000 and line["share_of_target"] == round(line["images_per_s"] / 9000, 3)
    prof = json.loads((out / "profile.json").read_text())
    assert prof["bench"] == "profile" and prof["steps"] == 1 and prof["what"]["backbone"] == "efficientnet_lite0"
    assert 0 <= prof["loader_wait_share"] < 1 and prof["device_kind"] == "cpu"
    names = [r["name"] for r in prof["top"]]
    assert any("conv" in n for n in names[:5]) and all(r["self_ms"] > 0 for r in prof["top"])
    text = (out / "profile.txt").read_text()
    assert "loader_wait_share:" in text and "top ops by self CPU time" in text and "Self CPU" in text
    assert "row train_lite0" in (out / "stages.log").read_text()


def test_bench_embed_scale_with_the_patch_bank(tmp_path):
    """--patch-bank: the same job also builds the patch bank in the index shards; its size per
    image is the budget (tiny_cnn's 4 x 4 patches of an 8 px image, 6 kept of 16)."""
    cmd = [sys.executable, "-m", "msc_dist.bench", "embed-scale", "--rows", "3000", "--per-shard", "1000",
           "--num-shards", "2", "--rows-per-task", "100", "--patch-bank", "--patch-budget", "6",
           "--workdir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rows"] == 3000 and res["corrupt"] == 0 and res["patch_bank"] is True
    assert res["bank_shards"] == res["index_shards"] == 2
    assert res["bank_patches"] == 6 * res["index_count"] and res["bank_patches_per_image"] == 6
    assert res["bank_bytes_per_image"] == 6 * res["bank_dimension"] * 4 and res["driver_peak_rss_mb"] > 0


def test_bench_serve_detectors_reports_loads_and_evictions_of_its_timed_run(tmp_path):
    """bench serve --detectors: one multiplexed app over a registry of N copies; the warm-up loads
    what the replicas can hold, so the timed run's own loads and evictions come from the detectors
    beyond that (3 detectors, 1 replica of at most 2)."""
    from conftest import noise_images, tiny_checkpoint, tiny_index

    ck = tiny_checkpoint(tmp_path / "ck", image_size=32, resize_mode="squash", seed=1)
    tiny_index(tmp_path / "idx", ck, {f"n{i}": b for i, b in enumerate(noise_images(16, seed=3))})
    r = subprocess.run([sys.executable, "-m", "msc_dist.bench", "serve", "--checkpoint", ck, "--index", str(tmp_path / "idx"),
                        "--detectors", "3", "--max-detectors-per-replica", "2", "--replicas", "1", "--concurrency", "2",
                        "--seconds", "3", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["detectors"] == 3 and res["warmed_detectors"] == 2 and res["errors"] == 0 and res["images_per_s"] > 0
    assert res["run_loads"] > 0 and res["run_evictions"] > 0  # round-robin over 3 with room for 2
    assert res["loads"] >= res["run_loads"] + 2 and res["evictions"] >= res["run_evictions"]


def test_bench_serve_reports_the_ratio_to_offline_embedding_and_what_each_side_may_use(tmp_path):
    """Plain bench serve (no detectors, no index shards): single and multi-image requests all
    answered, the serving / offline ratio is the best multi-image rate over the offline rate, and
    the line says what each side may use: the Model replica its 1 reserved CPU, the offline
    embedding every CPU of the process (README: "What limits serving here")."""
    from conftest import noise_images, tiny_checkpoint, tiny_index

    ck = tiny_checkpoint(tmp_path / "ck", image_size=32, resize_mode="squash", seed=2)
    tiny_index(tmp_path / "idx", ck, {f"n{i}": b for i, b in enumerate(noise_images(16, seed=4))})
    r = subprocess.run([sys.executable, "-m", "msc_dist.bench", "serve", "--checkpoint", ck, "--index", str(tmp_path / "idx"),
                        "--replicas", "1", "--concurrency", "1", "2", "--files-per-request", "4", "--seconds", "2",
                        "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["bench"] == "serve" and res["files_per_request"] == 4 and res["index_shards"] == 0
    assert [m["concurrency"] for m in res["single"]] == [m["concurrency"] for m in res["multi"]] == [1, 2]
    assert all(m["errors"] == 0 and m["images_per_s"] > 0 for m in res["single"] + res["multi"])
    best = max(m["images_per_s"] for m in res["multi"])
    assert res["images_per_s"] == best and res["offline_embed_images_per_s"] > 0
    assert abs(res["multi_over_offline"] - best / res["offline_embed_images_per_s"]) < 1e-9
    assert res["model_cpus_per_replica"] == 1 and res["offline_cpus"] == len(os.sched_getaffinity(0))
