"""Where serving's CPU goes (README, "CPU inference runtimes"): runs ``bench serve`` (one Model
replica of 1 CPU, one Gateway of 1 CPU, 8 clients) and samples every process's CPU time from
/proc every 2 s, grouped by role: the Model replica (decoded arrays -> forward -> kNN), the
Gateway (HTTP body -> decode -> the call to the Model), Serve's HTTP proxy, Ray's own processes
(raylet, GCS, controller, agents) and the bench itself (its HTTP clients). Linux only. One JSON
line per phase under load: the single-image phase, then the multi-image one (8 images per
request), each the median over its 2 s windows of each role's cores. From the repository root:

    for r in openvino onnxruntime; do python infra/results/runtimes/serve_cpu.py --runtime $r; done > infra/results/runtimes/serve_cpu_224px.jsonl

Without --checkpoint and --index it builds what runtimes.sh serves, in a temporary folder: 512
demo images of 224 px, the frozen backbone (0 epochs) and its index.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROLES = (("model", "ServeReplica:bench:Model"), ("gateway", "ServeReplica:bench:Gateway"),
         ("proxy", "ProxyActor"), ("proxy", "SERVE_PROXY_ACTOR"), ("bench", "msc_dist.bench serve"))
TICK = os.sysconf("SC_CLK_TCK")


def role(cmd: str) -> str:
    for name, key in ROLES:
        if key in cmd:
            return name
    return "ray" if ("ray" in cmd and ("ray::" in cmd or "/ray/" in cmd)) else "other"


def snapshot() -> dict[str, tuple[float, str]]:
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().replace("\0", " ")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        out[pid] = ((int(fields[11]) + int(fields[12])) / TICK, cmd)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", default="openvino")
    ap.add_argument("--checkpoint", help="default: a frozen 224 px run built here (with its index)")
    ap.add_argument("--index")
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds per phase")
    a = ap.parse_args()
    if (a.checkpoint is None) != (a.index is None):
        ap.error("--checkpoint and --index go together")
    tmp = tempfile.TemporaryDirectory() if a.checkpoint is None else None
    if tmp is not None:
        w = tmp.name
        for step in (["data", "demo", "--out", f"{w}/demo", "--size", "224", "--n-train", "512", "--n-test-normal", "0",
                      "--n-test-defect", "0"],
                     ["train", "--data", f"{w}/demo/train", "--epochs", "0", "--image-size", "224", "--storage-path",
                      f"{w}/runs", "--name", "frozen"],
                     ["embed", "--checkpoint", f"{w}/runs/frozen", "--out", f"{w}/index"]):
            subprocess.run([sys.executable, "-m", "msc_dist", *step], check=True, stdout=subprocess.DEVNULL)
        a.checkpoint, a.index = f"{w}/runs/frozen", f"{w}/index"
    cmd = [sys.executable, "-m", "msc_dist.bench", "serve", "--checkpoint", a.checkpoint, "--index", a.index,
           "--runtime", a.runtime, "--device", "cpu", "--concurrency", "8", "--seconds", str(a.seconds)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    windows, prev, t0 = [], snapshot(), time.monotonic()
    while proc.poll() is None:
        time.sleep(2.0)
        cur, t1 = snapshot(), time.monotonic()
        cores: dict[str, float] = {}
        for pid, (t, c) in cur.items():
            if pid != str(os.getpid()):
                r = role(c)
                cores[r] = cores.get(r, 0.0) + (t - prev.get(pid, (t, c))[0]) / (t1 - t0)
        windows.append(cores)
        prev, t0 = cur, t1
    result = json.loads(next(line for line in proc.stdout.read().splitlines() if line.startswith("{")))
    # Under load: the Model and the Gateway work (also while the replicas start). The multi-image
    # phase is the last ``seconds`` of it (the offline embedding follows, without replicas), the
    # single-image phase the ``seconds`` before.
    loaded = [i for i, w in enumerate(windows) if w.get("model", 0.0) > 0.3 and w.get("gateway", 0.0) > 0.05]
    n = round(a.seconds / 2.0)
    end = loaded[-1] + 1 if loaded else 0
    phases = {"single": [i for i in loaded if end - 2 * n <= i < end - n], "multi": [i for i in loaded if i >= end - n]}
    for phase, idx in phases.items():
        ws = [windows[i] for i in idx[1:-1]] or [windows[i] for i in idx]  # the edges are partial
        if not ws:
            continue
        shares = {r: round(statistics.median(w.get(r, 0.0) for w in ws), 3)
                  for r in ("model", "gateway", "proxy", "ray", "bench", "other")}
        rate = next(r for r in result[phase] if r["concurrency"] == 8)["images_per_s"]
        print(json.dumps({"bench": "serve_cpu", "runtime": a.runtime, "phase": phase, "concurrency": 8,
                          "images_per_request": 1 if phase == "single" else result["files_per_request"],
                          "images_per_s": round(rate, 1), "cores": shares, "total_cores": round(sum(shares.values()), 3),
                          "windows": len(ws), "offline_embed_images_per_s": round(result["offline_embed_images_per_s"], 1),
                          "cpus": os.cpu_count()}), flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
