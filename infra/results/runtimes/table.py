"""Print the README's "CPU inference runtimes" tables (Markdown) from the JSON lines that
runtimes.sh writes. Run from the repository root:

    python infra/results/runtimes/table.py [--dir DIR]
    python infra/results/runtimes/table.py --int8    # int8_probe.py's table

DIR (default: this folder) holds embed_224px.jsonl, embed_64px.jsonl and serve_224px.jsonl; the
embedding job's rates come from the embed rows (`bench embed --job`) or, where those have none,
from jobs.jsonl (msc embed run apart per runtime on the same kind of images)."""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def rows(folder: str, name: str) -> list[dict]:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def embed_table(folder: str) -> str:
    out = ["| image size | runtime | `bench embed` images/s (x torch) | model alone images/s (x torch) | path / model "
           "| embedding job images/s (x torch) | graph built in |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for size in (224, 64):
        got = rows(folder, f"embed_{size}px.jsonl")
        apart = {r["runtime"]: r for r in rows(folder, "jobs.jsonl") if r["image_size"] == size}
        got = [r if "job_images_per_s" in r or r["runtime"] not in apart else
               {**r, **{k: apart[r["runtime"]][k] for k in ("job_images_per_s", "job_over_torch")}} for r in got]
        torch_model = next((r["model_images_per_s"] for r in got if r["runtime"] == "torch"), None)
        for r in got:
            model_x = f" ({r['model_images_per_s'] / torch_model:.1f})" if torch_model else ""
            job = (f"{r['job_images_per_s']:.1f} ({r.get('job_over_torch', float('nan')):.1f})"
                   if "job_images_per_s" in r else "-")
            built = "-" if r["runtime"] == "torch" else f"{r['load_s']:.0f} s"
            out.append(f"| {size} px | {r['runtime']} | {r['images_per_s']:.1f} ({r.get('over_torch', float('nan')):.1f}) "
                       f"| {r['model_images_per_s']:.1f}{model_x} | {r['path_over_model']:.2f} | {job} | {built} |")
    return "\n".join(out)


def serve_table(folder: str) -> str:
    out = ["| runtime | 8 images per request, 1 / 8 clients: images/s | p50 / p99 ms at 8 clients "
           "| offline embedding images/s | serving / offline |",
           "| --- | --- | --- | --- | --- |"]
    for r in rows(folder, "serve_224px.jsonl"):
        multi = {m["concurrency"]: m for m in r["multi"]}
        rates = " / ".join(f"{multi[c]['images_per_s']:.1f}" for c in sorted(multi))
        top = multi[max(multi)]
        out.append(f"| {r['runtime']} | {rates} | {top['p50_ms']:.0f} / {top['p99_ms']:.0f} "
                   f"| {r['offline_embed_images_per_s']:.1f} | {r['multi_over_offline']:.2f} |")
    return "\n".join(out)


INT8_RUNS = (("MNIST, 10 digits", 64, "int8_mnist_64px.jsonl"), ("magnetic tiles", 64, "int8_tiles_64px.jsonl"),
             ("magnetic tiles (squash)", 224, "int8_tiles_224px.jsonl"))


def int8_table(folder: str) -> str:
    """int8_probe.py's rows: the frozen kNN's ROC-AUC with the float32 and the int8 OpenVINO graph
    (mean over classes, the worst class's difference) and the forward's images/s of each."""
    out = ["| data | px | float32 ROC-AUC | int8 ROC-AUC | difference (worst class) | smallest cosine, int8 to float32 "
           "| float32 / int8 images/s, 1 thread (x) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, size, name in INT8_RUNS:
        got = rows(folder, name)
        cls = [r for r in got if r.get("probe") == "int8"]
        speed = {r["graph"]: r for r in got if r.get("probe") == "int8-speed"}
        if not cls:
            continue
        mean = {k: sum(r[k] for r in cls) / len(cls) for k in ("fp32_roc_auc", "int8_roc_auc", "roc_auc_diff")}
        worst = min(cls, key=lambda r: r["roc_auc_diff"])
        tag = f" ({worst['class']}: {worst['roc_auc_diff']:+.4f})" if len(cls) > 1 else ""
        rate = (f"{speed['fp32']['images_per_s']:.0f} / {speed['int8']['images_per_s']:.0f} "
                f"({speed['int8']['int8_over_fp32']:.1f})" if {"fp32", "int8"} <= set(speed) else "")
        out.append(f"| {label} | {size} | {mean['fp32_roc_auc']:.4f} | {mean['int8_roc_auc']:.4f} | "
                   f"{mean['roc_auc_diff']:+.4f}{tag} | {min(r['feature_cos_min'] for r in cls):.3f} | {rate} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=HERE)
    p.add_argument("--int8", action="store_true", help="the int8 probe's table (int8_probe.py) instead")
    a = p.parse_args()
    if a.int8:
        print(int8_table(a.dir))
        return
    print(embed_table(a.dir))
    print()
    print(serve_table(a.dir))


if __name__ == "__main__":
    main()
