"""Issue 25, item 3 (optional int8): would OpenVINO's post-training int8 quantisation (NNCF) keep
the frozen kNN's ROC-AUC within 0.002 of float32 on MNIST and the magnetic tiles, and how much
faster is it? A probe, not a product path: the frozen EfficientNet-Lite0 card is exported as the
CPU runtimes export it (``runtime.load``, OpenVINO, float32), then quantised with
``nncf.quantize`` on a sample of each class's normal *training* images (``--calibration`` of
them, seeded; MIXED preset, the pooling and L2 normalisation kept in float32), and both graphs embed the same images of ``bench quality``'s own split
(``bench.quality.prepare``: MNIST 256 training / 1,000 test images per digit, the tiles' seeded
70/30 split), scored by the same kNN, hold-out and metrics (``_metrics_from``). Speed: both graphs
on one batch, alternated for ``--rounds`` rounds, the median images/s of each. One JSON line per
class and per speed row. Needs ``pip install nncf``. From the repository root:

    python infra/results/runtimes/int8_probe.py --data ../shared/datasets/mnist/mnist.npz \\
        --image-size 64 --max-train 256 --max-test 1000 > infra/results/runtimes/int8_mnist_64px.jsonl
    python infra/results/runtimes/int8_probe.py --data ../shared/datasets/magnetic-tile --classes MT_Free \\
        --image-size 224 --resize-mode squash > infra/results/runtimes/int8_tiles_224px.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np


FLOAT_TAIL = ("ReduceMean", "ReduceL2", "Divide")  # OpenVINO op types kept in float32


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--classes", nargs="*", default=None, help="default: every digit (npz) or class folder")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--resize-mode", default="center_crop")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--calibration", type=int, default=300, help="normal training images NNCF calibrates on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import logging

    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)  # stdout is the JSON lines; NNCF logs and draws its bars there
    import torch

    from msc_dist import checkpoint as ckpt
    from msc_dist.backbones import build_model
    from msc_dist.bench.quality import _metrics_from, _samples, prepare
    from msc_dist.card import load_card
    from msc_dist.data.loader import LabelFilter
    from msc_dist.evaluate.job import list_classes
    from msc_dist.graph import OPENVINO_CPU, openvino_core
    from msc_dist.train.config import TrainConfig

    torch.set_num_threads(a.threads)
    core = openvino_core()
    props = {**OPENVINO_CPU, "INFERENCE_NUM_THREADS": a.threads, "PERFORMANCE_HINT": "LATENCY"}
    cfg = TrainConfig(image_size=a.image_size, resize_mode=a.resize_mode, seed=a.seed)
    classes = a.classes or list_classes(a.data)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model("efficientnet_lite0", pretrained=True)
        ck = os.path.join(tmp, "checkpoint")
        ckpt.save(ck, model.state_dict(), torch.nn.functional.normalize(torch.ones(model.dim), dim=0),
                  {"backbone": "efficientnet_lite0", "image_size": a.image_size, "resize_mode": a.resize_mode},
                  {"epoch": 0})
        card = load_card(ck, "cpu", "openvino", cache=os.path.join(tmp, "runtimes"), threads=a.threads)
        xml = os.path.join(card.graph.folder, "model.xml")
        fp32 = core.compile_model(xml, "CPU", props)

        def embed(compiled, arrays: np.ndarray) -> np.ndarray:
            out = [np.array(compiled(arrays[i:i + a.batch_size])[0]) for i in range(0, len(arrays), a.batch_size)]
            return np.concatenate(out)

        last_int8 = None
        for c in classes:
            with tempfile.TemporaryDirectory(prefix="int8-") as d:
                prep = prepare(a.data, c, d, a.max_train, a.max_test, ["jpg"] if not a.data.endswith(".npz") else None)
                keys, x_train, _ = _samples(prep.train, LabelFilter(frozenset([prep.label])))
                _, x_test, y_test = _samples(prep.test, LabelFilter(None))
            pre = card.preprocess
            tr = np.stack([pre(b) for b in x_train]).transpose(0, 3, 1, 2).copy()
            te = np.stack([pre(b) for b in x_test]).transpose(0, 3, 1, 2).copy()
            rng = np.random.default_rng(a.seed)
            cal = tr[np.sort(rng.choice(len(tr), min(a.calibration, len(tr)), replace=False))]
            t0 = time.perf_counter()
            # MIXED: symmetric weights, asymmetric activations (EfficientNet's ReLU6 outputs are
            # one-sided). The tail (global pooling and the L2 normalisation) stays in float32: quantised,
            # the features came out with norms up to ~1.1 and digit 9 lost 0.09 ROC-AUC.
            with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars
                q = nncf.quantize(core.read_model(xml), nncf.Dataset([cal[i:i + 1] for i in range(len(cal))]),
                                  subset_size=len(cal), preset=nncf.QuantizationPreset.MIXED,
                                  ignored_scope=nncf.IgnoredScope(types=list(FLOAT_TAIL)))
            int8 = core.compile_model(q, "CPU", props)
            q_s = time.perf_counter() - t0
            row = {"probe": "int8", "data": os.path.basename(os.path.normpath(a.data)), "class": c,
                   "image_size": a.image_size, "resize_mode": a.resize_mode, "calibration_images": len(cal),
                   "quantize_seconds": round(q_s, 1), "nncf": nncf.__version__, "openvino": ov.__version__}
            z = {}
            for name, compiled in (("fp32", fp32), ("int8", int8)):
                z_tr, z_te = embed(compiled, tr), embed(compiled, te)
                m = _metrics_from(torch.from_numpy(z_tr), keys, torch.from_numpy(z_te), y_test, {prep.label}, cfg,
                                  0.1, 0.05)
                row[f"{name}_roc_auc"] = m["roc_auc"]
                z[name] = z_te
            row["roc_auc_diff"] = row["int8_roc_auc"] - row["fp32_roc_auc"]
            row["feature_cos_min"] = float((z["fp32"] * z["int8"]).sum(1).min())
            print(json.dumps(row), flush=True)
            last_int8 = int8
        x = np.random.default_rng(0).integers(0, 256, (a.batch_size, 3, a.image_size, a.image_size), dtype=np.uint8)
        rates: dict[str, list[float]] = {"fp32": [], "int8": []}
        for name, compiled in (("fp32", fp32), ("int8", last_int8)):
            compiled(x)  # warm-up
        for _ in range(a.rounds):
            for name, compiled in (("fp32", fp32), ("int8", last_int8)):
                t0 = time.perf_counter()
                compiled(x)
                compiled(x)
                rates[name].append(2 * a.batch_size / (time.perf_counter() - t0))
        for name, v in rates.items():
            print(json.dumps({"probe": "int8-speed", "graph": name, "image_size": a.image_size,
                              "batch_size": a.batch_size, "threads": a.threads,
                              "images_per_s": round(statistics.median(v), 1),
                              "int8_over_fp32": round(statistics.median(rates["int8"]) / statistics.median(rates["fp32"]), 2)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
