"""The runtime of the model card's batch forward: PyTorch, or the checkpoint's own export run in
ONNX Runtime or OpenVINO on the CPU.

    torch        the FeatureModel in PyTorch (any device; the default of ``load_card``)
    onnxruntime  the ONNX graph ``msc export`` writes (uint8 input, normalisation inside), CPU provider
    openvino     the same graph as OpenVINO IR, CPU, float32
    auto         torch on a GPU; on a CPU the fastest installed CPU runtime (``CPU_RUNTIMES``),
                 else torch with one log line

A CPU runtime's graph is built once per (model id, image size, runtime) into a local cache folder
(and, for anomaly maps, once more per PatchSpec: a graph with a second output ``patches``, the
patch features of ``ModelCard.embed_with_patches``, built the first time a card is asked for them)
(``MSC_RUNTIME_CACHE``, default ~/.cache/msc_dist/runtimes; never the checkpoint folder): exported
and checked against the card's PyTorch forward on a few images (``export.write_checked``, the
same check and tolerance as ``msc export``) in a temporary folder that is then renamed into
place, so that actors building it at once never read a half-written graph. ``graph.json`` beside
it records each file's sha256; a reused graph is read once, hashed and loaded from those same
bytes, and one whose hashes do not match is moved aside and rebuilt, never used. Threads follow
the caller's CPUs: ``threads``, else the CPUs this process may run on, at most OMP_NUM_THREADS
(which Ray sets to an actor's ``num_cpus``), at least one.

No torch.distributed or ray here."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np

from msc_dist.config import ConfigError

log = logging.getLogger("msc_dist.runtime")

RUNTIMES = ("torch", "onnxruntime", "openvino", "auto")
# ``auto`` on a CPU: the first of these that is installed. Measured, not guessed (README, "CPU
# inference runtimes"; bench embed, the runtimes alternated): on the 2-core development machine
# OpenVINO's forward was 2.2x ONNX Runtime's at 224 px and equal at 64 px (the quieter
# runs: 1.1-1.6x), both 2.3-6.6x PyTorch eager's.
CPU_RUNTIMES = ("openvino", "onnxruntime")
PACKAGE = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # runtime -> the module it imports
FORMAT = {"onnxruntime": "onnx", "openvino": "openvino"}  # runtime -> its msc export format
CACHE_ENV = "MSC_RUNTIME_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "msc_dist", "runtimes")
RECORD = "graph.json"
GRAPH_VERSION = 1  # bumped when the exported graph changes: older cached graphs are then rebuilt
HELP = ("torch | onnxruntime | openvino | auto (torch on a GPU; on a CPU the fastest installed CPU runtime, "
        "openvino then onnxruntime; CPU graphs are cached in $" + CACHE_ENV + ", default " + DEFAULT_CACHE + ")")

Forward = Callable[[np.ndarray], np.ndarray]  # (B, 3, S, S) uint8 -> (B, D) float32 unit vectors
# with a PatchSpec: (B, 3, S, S) uint8 -> ((B, D) float32 unit vectors, (B, h, w, C) float32 patches)


def installed(runtime: str) -> bool:
    return importlib.util.find_spec(PACKAGE[runtime]) is not None


def resolve(runtime: str, device) -> str:
    """The runtime that ``runtime`` names for a model on ``device`` (auto resolved); a runtime that
    cannot run there, or is not installed, is a ConfigError that says what to do."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; valid: {' | '.join(RUNTIMES)}")
    gpu = str(device).startswith("cuda")
    if runtime == "auto":
        if gpu:
            return "torch"
        for r in CPU_RUNTIMES:
            if installed(r):
                return r
        log.warning("runtime auto: neither openvino nor onnxruntime is installed, so PyTorch runs the model on the "
                    "CPU (pip install 'msc-dist[cpu]' for the faster CPU runtimes)")
        return "torch"
    if runtime == "torch":
        return runtime
    if gpu:
        raise ConfigError(f"runtime {runtime} runs on the CPU, but the model is on {device}: use --runtime torch "
                          "(or auto) with a GPU")
    if not installed(runtime):
        raise ConfigError(f"runtime {runtime}: the {PACKAGE[runtime]} package is not installed; install it with "
                          f"pip install 'msc-dist[cpu]' (or pip install {PACKAGE[runtime]}), or use --runtime torch")
    return runtime


def cpu_threads(threads: int | None = None) -> int:
    """``threads`` if given; else the CPUs this process may run on, at most OMP_NUM_THREADS (Ray
    sets it to an actor's or task's CPUs); at least one."""
    if threads:
        return max(1, int(threads))
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    return max(1, n)


def actor_threads(cpus: float) -> int:
    """The threads of an actor that reserves ``cpus`` CPUs (at least one)."""
    return max(1, int(cpus))


def driver_cache() -> str | None:
    """The cache folder a job's driver hands its actors: $MSC_RUNTIME_CACHE as the driver sees it
    (Ray's workers may have started before it was set); None: each node's own default."""
    return os.environ.get(CACHE_ENV) or None


def cache_root(cache: str | None = None) -> str:
    return os.path.abspath(os.path.expanduser(cache or os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


def _patch_key(patch: dict | None) -> str:
    return "" if patch is None else "-patches-" + _sha256(json.dumps(patch, sort_keys=True).encode())[:12]


def graph_folder(model_id: str, image_size: int, runtime: str, cache: str | None = None,
                 patch: dict | None = None) -> str:
    """The cache folder of one (model id, image size, runtime[, PatchSpec dict])."""
    return os.path.join(cache_root(cache),
                        f"{model_id}-{int(image_size)}px-{runtime}{_patch_key(patch)}-v{GRAPH_VERSION}")


class CorruptGraph(RuntimeError):
    """A cached graph whose files do not match the sha256 sums recorded beside them."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(folder: str, model_id: str, image_size: int, runtime: str,
                  patch: dict | None = None) -> dict[str, bytes]:
    """The files of a cached graph, each checked against its recorded sha256 (the bytes returned
    are the bytes hashed: nothing is read twice), and its record against what it is asked for
    (``patch``: the PatchSpec dict of its ``patches`` output, None: no such output). CorruptGraph
    when anything does not match."""
    try:
        with open(os.path.join(folder, RECORD), "rb") as f:
            rec = json.loads(f.read())
        files = dict(rec["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptGraph(f"{RECORD} unreadable: {e}") from None
    want = {"model_id": model_id, "image_size": int(image_size), "runtime": runtime, "patch": patch}
    got = {k: rec.get(k) for k in want}
    if got != want or set(files) != set(_files_of(runtime)):
        raise CorruptGraph(f"{RECORD} records {got} and files {sorted(files)}, not {want}")
    out = {}
    for name, digest in files.items():
        try:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
        except OSError as e:
            raise CorruptGraph(f"{name}: {e.strerror or e}") from None
        if _sha256(data) != digest:
            raise CorruptGraph(f"{name}: sha256 {_sha256(data)[:12]}… is not the recorded {digest[:12]}…")
        out[name] = data
    return out


def _files_of(runtime: str) -> tuple[str, ...]:
    from msc_dist.graph import MODEL_FILES

    return MODEL_FILES[FORMAT[runtime]]


def _remove(folder: str) -> None:
    """Move a folder aside (one rename: no reader sees it half deleted), then delete it."""
    aside = os.path.join(os.path.dirname(folder), f".bad-{os.path.basename(folder)}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:  # another process moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def build(card, runtime: str, folder: str, patch_spec=None) -> None:
    """Export and check the card's graph for ``runtime`` (with ``patch_spec``: and its patch
    features) in a temporary folder beside ``folder``, record its sha256 sums, then rename it into
    place (if another process got there first, its graph is kept and ours dropped)."""
    from msc_dist.graph import write_checked

    root = os.path.dirname(folder)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{os.path.basename(folder)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        t0 = time.perf_counter()
        _, diff, _ = write_checked(card, FORMAT[runtime], tmp, log=lambda m: log.info("%s: %s", runtime, m),
                                   patch_spec=patch_spec)
        files = {}
        for name in _files_of(runtime):
            with open(os.path.join(tmp, name), "rb") as f:
                files[name] = _sha256(f.read())
        for name in os.listdir(tmp):  # only the model's files: nothing unverified in the cache
            if name not in files:
                os.remove(os.path.join(tmp, name))
        rec = {"model_id": card.model_id, "image_size": card.preprocess.image_size, "runtime": runtime,
               "patch": None if patch_spec is None else patch_spec.to_dict(), "graph_version": GRAPH_VERSION, "files": files, "max_abs_diff": diff, "checkpoint": card.checkpoint,
               "created": time.time()}
        with open(os.path.join(tmp, RECORD), "w") as f:
            json.dump(rec, f, indent=1)
        try:
            os.rename(tmp, folder)
        except OSError:  # the folder exists: another actor built it at the same time
            if not os.path.isdir(folder):
                raise
        log.info("runtime %s: built and checked the graph of model %s at %d px%s in %.1fs (max abs difference to "
                 "PyTorch %.1e): %s", runtime, card.model_id[:12], card.preprocess.image_size,
                 "" if patch_spec is None else " with its patch features",
                 time.perf_counter() - t0, diff, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def graph_files(card, runtime: str, cache: str | None = None, patch_spec=None) -> tuple[dict[str, bytes], bool]:
    """The verified files of the card's graph for ``runtime`` (and ``patch_spec``), built if absent
    or corrupt; (files, whether this call built them)."""
    patch = None if patch_spec is None else patch_spec.to_dict()
    folder = graph_folder(card.model_id, card.preprocess.image_size, runtime, cache, patch)
    args = (folder, card.model_id, card.preprocess.image_size, runtime, patch)
    if os.path.isdir(folder):
        try:
            return read_verified(*args), False
        except CorruptGraph as e:
            log.warning("runtime %s: the cached graph %s is corrupt (%s): rebuilding it", runtime, folder, e)
            _remove(folder)
    build(card, runtime, folder, patch_spec)
    return read_verified(*args), True


def _onnxruntime(files: dict[str, bytes], threads: int, patches: bool) -> Forward:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3  # errors only
    sess = ort.InferenceSession(files["model.onnx"], so, providers=["CPUExecutionProvider"])

    if patches:
        def forward(x: np.ndarray):
            z, p = sess.run(["features", "patches"], {"images": x})  # thread-safe
            return z, p
    else:
        def forward(x: np.ndarray) -> np.ndarray:
            return sess.run(["features"], {"images": x})[0]  # thread-safe

    return forward


def _openvino(files: dict[str, bytes], threads: int, patches: bool) -> Forward:
    from msc_dist.graph import OPENVINO_CPU, openvino_core

    core = openvino_core()
    model = core.read_model(files["model.xml"], files["model.bin"])
    compiled = core.compile_model(model, "CPU", {**OPENVINO_CPU, "INFERENCE_NUM_THREADS": threads,
                                                 "PERFORMANCE_HINT": "LATENCY"})
    local = threading.local()  # an infer request per calling thread (serving embeds in threads)

    def forward(x: np.ndarray) -> np.ndarray:
        req = getattr(local, "req", None)
        if req is None:
            req = local.req = compiled.create_infer_request()
        req.infer({0: x})
        z = np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True)
        if not patches:
            return z
        return z, np.array(req.get_output_tensor(1).data, dtype=np.float32, copy=True)

    return forward


@dataclass
class Loaded:
    forward: Forward
    runtime: str
    threads: int
    built: bool  # this load built the graph (False: reused from the cache)
    folder: str


def load(card, runtime: str, cache: str | None = None, threads: int | None = None, patch_spec=None) -> Loaded:
    """The batch forward of the card's model in a CPU runtime (``resolve``d first); with
    ``patch_spec`` the forward gives (features, patches) from one run of one graph."""
    if runtime not in FORMAT:
        raise ConfigError(f"runtime {runtime!r} has no cached graph; valid: {sorted(FORMAT)}")
    files, built = graph_files(card, runtime, cache, patch_spec)
    n = cpu_threads(threads)
    fwd = (_onnxruntime if runtime == "onnxruntime" else _openvino)(files, n, patch_spec is not None)
    patch = None if patch_spec is None else patch_spec.to_dict()
    return Loaded(fwd, runtime, n, built, graph_folder(card.model_id, card.preprocess.image_size, runtime, cache, patch))
