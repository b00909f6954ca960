"""msc: one command with the verbs users expect.

    msc train     fine-tune on Ray Train (no --data: the demo set on a local Ray)
    msc embed     embed the normal set: Parquet + the sharded FAISS index + threshold
    msc score     score every image under a prefix (or shards) offline, on Ray Data
    msc evaluate  the one-class protocol: train, embed, score and compare methods
    msc test      metrics, tables and plots of an existing checkpoint + index (no training)
    msc predict   score files or folders in this process (no Ray)
    msc export    the feature model as ONNX or TorchScript, checked against PyTorch
    msc serve     the HTTP scoring app on Ray Serve (one index, or every detector of a registry)
    msc detectors the detector registry: list, show, remove, default
    msc bench     benchmarks (train, embed, load, search, serve, quality)
    msc data      make-shards, demo, describe

Every verb's flags come from its job's typed config (``msc VERB --help`` lists them with their
defaults): defaults, then ``--config FILE.yaml``, then flags. ``python -m msc_dist.<job>`` runs
the same code. Ray's own log lines stay off the console unless ``--verbose``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

from msc_dist.config import HelpFormatter, add_config_args, config_from_args


@dataclass
class Verb:
    summary: str
    load: Callable[[], tuple[type, dict]]  # -> (config class, help texts); imported when used
    run: Callable[..., int]  # (cfg, explicit) -> exit status
    sub: dict[str, "Verb"] | None = None


def _print_json(d: dict) -> None:
    print(json.dumps(d, default=str), flush=True)


# ---------------------------------------------------------------------------------------------
# The verbs


def _train_cfg():
    from msc_dist.train.config import HELP, TrainConfig

    return TrainConfig, HELP


def _train(cfg, explicit) -> int:
    from msc_dist.train.job import main

    out = main(cfg, explicit)
    _print_json({"checkpoint": out.checkpoint, "run_dir": out.run_dir, "metrics": out.metrics})
    return 1 if out.error else 0


def _embed_cfg():
    from msc_dist.embed.config import HELP, EmbedConfig

    return EmbedConfig, HELP


def _embed(cfg, explicit) -> int:
    from msc_dist.console import init_ray
    from msc_dist.embed.job import main

    if cfg.checkpoint and (cfg.out or cfg.detector):
        init_ray(cfg.ray_address)
    out = main(cfg)
    m = asdict(out.manifest)
    _print_json({**({"detector": cfg.detector} if cfg.detector else {}), "out": out.out, "rows": out.rows,
                 "corrupt": out.corrupt, "index_count": m["count"], "threshold": m["threshold"], "model_id": m["model_id"],
                 "images_per_s": round(out.images_per_s, 2), "runtime": out.runtime,
                 **({"mlflow_version": out.registered} if cfg.tracking_uri else {})})
    if out.tracking_error:
        print(f"error: published, but not registered in MLflow: {out.tracking_error}", file=sys.stderr)
        return 1
    return 0


def _score_cfg():
    from msc_dist.score.config import HELP, ScoreConfig

    return ScoreConfig, HELP


def _score(cfg, explicit) -> int:
    from msc_dist.console import init_ray
    from msc_dist.score.job import TooManyErrors, main

    if cfg.index and cfg.input and cfg.out:
        init_ray(cfg.ray_address)
    try:
        out = main(cfg)
    except TooManyErrors as e:  # exit 3: the run itself is fine, the data is not; nothing published
        print(f"error: {e}", file=sys.stderr)
        return 3
    _print_json({"out": out.out, "rows": out.rows, "errors": out.errors, "files": out.files})
    return 0


def _evaluate_cfg():
    from msc_dist.evaluate.config import HELP, EvalConfig

    return EvalConfig, HELP


def _evaluate(cfg, explicit) -> int:
    from msc_dist.console import init_ray
    from msc_dist.evaluate.job import main

    if cfg.data and (cfg.normal_class or cfg.all_classes):
        init_ray(cfg.ray_address)
    main(cfg)
    print(open(os.path.join(os.path.abspath(os.path.expanduser(cfg.out)), "results.md")).read())
    return 0


def _test_cfg():
    from msc_dist.evaluate.config import TEST_HELP, TestConfig

    return TestConfig, TEST_HELP


def _test(cfg, explicit) -> int:
    from msc_dist.evaluate.tester import main

    main(cfg)
    out = os.path.abspath(os.path.expanduser(cfg.out))
    print(open(os.path.join(out, "results.md")).read())
    print(f"results: {out}/results.json, plots: {out}/plots/")
    return 0


def _predict_cfg():
    from msc_dist.predict import HELP, PredictConfig

    return PredictConfig, HELP


def _predict(cfg, explicit) -> int:
    from msc_dist.predict import main

    return main(cfg)


def _export_cfg():
    from msc_dist.export import HELP, ExportConfig

    return ExportConfig, HELP


def _export(cfg, explicit) -> int:
    from msc_dist.export import main

    out = main(cfg)
    print(f"exported {out.model_file} (+ center.pt, config.json, export.json"
          + (", index_manifest.json" if out.spec["index"] else "") + ")")
    return 0


def _serve_cfg():
    from serving.settings import SERVE_HELP, ServeConfig

    return ServeConfig, SERVE_HELP


def _serve(cfg, explicit) -> int:
    """``serve run serving/config.yaml`` with these settings, from Python: the app's own builder,
    after every start-up condition it can check here (one line each, exit 2, before Serve starts)."""
    from serving.settings import check_startup

    cfg.validate()
    found = check_startup(cfg, (cfg.host, int(cfg.port)))  # before Ray and Serve are even imported

    from ray import serve

    from msc_dist.console import init_ray
    from serving import app as serving_app

    init_ray(cfg.ray_address)
    # A supervisor's stop (SIGTERM: systemd, Kubernetes, kill) drains like Ctrl-C, from here on;
    # without this, the handler that ray.init installs logs the signal and aborts the process.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": cfg.host, "port": int(cfg.port)})
        try:
            serve.run(serving_app.build_app(cfg.app_args()), name="msc", route_prefix="/", blocking=False)
        except RuntimeError as e:  # a deployment failed to start: Serve's status says why
            print(f"error: the app did not start: {_deploy_failure(e)}", file=sys.stderr)
            serve.shutdown()
            return 1
        if cfg.registry:
            print(f"serving the {len(found['detectors'])} detector(s) of registry {cfg.registry} (default: "
                  f"{found['default'] or 'none'}; at most {cfg.max_detectors_per_replica} a replica) on "
                  f"http://{cfg.host}:{cfg.port} (POST /v1/detectors/NAME/score, GET /v1/detectors; {found['auth']}; "
                  "Ctrl-C stops)", flush=True)
        else:
            print(f"serving index version {found['version']} of {cfg.index} ({found['vectors']} vectors, model "
                  f"{found['model_id'][:12]}, {found['preprocess']}) on http://{cfg.host}:{cfg.port} (POST /v1/score; "
                  f"{found['auth']}; Ctrl-C stops)", flush=True)
        wait_forever()
    except KeyboardInterrupt:
        print("stopping: draining requests in flight", flush=True)
        serve.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def wait_forever() -> None:
    while True:
        time.sleep(3600)


def _deploy_failure(e: Exception) -> str:
    """One line: the reason Serve gives for the first deployment that failed, else the error's last line."""
    try:
        from ray import serve

        app = serve.status().applications.get("msc")
        msgs = [d.message for d in (app.deployments.values() if app else []) if d.message]
        text = (msgs or [app.message if app else ""])[0] or str(e)
    except Exception:
        text = str(e)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:500]


def _table_cfg(module: str, table: str, name: str):
    """Verb ``name``'s config class and help from ``module.table`` (rows of (class, help, ...)),
    imported only when the verb is used."""
    def load():
        cls, help_text, _ = getattr(importlib.import_module(module), table)[name]
        return cls, help_text

    return load


def _bench(name: str):
    def run(cfg, explicit) -> int:
        from msc_dist.bench.runner import run as run_bench

        out = run_bench(name, cfg)
        for row in out if isinstance(out, list) else [out]:  # one JSON line per measured row
            _print_json(row)
        return 0

    return run


def _data(name: str):
    def run(cfg, explicit) -> int:
        from msc_dist.data.__main__ import run as run_data

        print(json.dumps(run_data(name, cfg), indent=1))
        return 0

    return run


def _detectors_cfg(name: str):
    def load():
        from msc_dist.registry import COMMANDS, HELP

        return COMMANDS[name][0], HELP

    return load


def _detectors(name: str):
    def run(cfg, explicit) -> int:
        from msc_dist.registry import run_command

        _print_json(run_command(name, cfg))
        return 0

    return run


DETECTOR_SUMMARIES = {"list": "every live detector and the default one",
                      "show": "one detector: live version, index, threshold, model, kept versions",
                      "remove": "take a detector off (its files stay unless --purge)",
                      "default": "the detector that POST /v1/score serves"}

BENCH_SUMMARIES = {
    "train": "images/s of the whole training step", "embed": "images/s of embedding, end to end from shards",
    "load": "images/s of the loader alone", "search": "queries/s of exact k-NN search against N vectors",
    "serve": "HTTP throughput and latency of the Serve app", "quality": "one-class metrics in one process (MNIST npz)",
    "embed-scale": "the embedding job on N tiny images: driver peak RSS, bytes read ratio",
}
DATA_SUMMARIES = {"make-shards": "image folder (subfolders = classes) or MNIST npz -> shards",
                  "demo": "generate the demo set (procedural textures with defects)", "describe": "shard counts and labels"}

VERBS: dict[str, Verb] = {
    "train": Verb("fine-tune on Ray Train (no --data: the demo set on a local Ray)", _train_cfg, _train),
    "embed": Verb("embed the normal set: Parquet, the sharded FAISS index and its threshold", _embed_cfg, _embed),
    "score": Verb("score every image under a prefix (or shards) offline on Ray Data", _score_cfg, _score),
    "evaluate": Verb("one-class protocol: train, embed, score, compare knn / msc / msc-noangular", _evaluate_cfg, _evaluate),
    "test": Verb("metrics, tables and plots of an existing checkpoint + index on labelled shards (no training)",
                 _test_cfg, _test),
    "predict": Verb("score image files or folders in this process (no Ray): a table or --json", _predict_cfg, _predict),
    "export": Verb("the feature model as ONNX or TorchScript (+ center, config, index reference)", _export_cfg, _export),
    "serve": Verb("the HTTP scoring app (serving/app.py) on Ray Serve", _serve_cfg, _serve),
    "detectors": Verb("the detector registry: list, show, remove, default", None, None,
                      {n: Verb(s, _detectors_cfg(n), _detectors(n)) for n, s in DETECTOR_SUMMARIES.items()}),
    "bench": Verb("benchmarks, one JSON line each", None, None,
                  {n: Verb(s, _table_cfg("msc_dist.bench.config", "BENCHES", n), _bench(n))
                   for n, s in BENCH_SUMMARIES.items()}),
    "data": Verb("shards: make-shards, demo, describe", None, None,
                 {n: Verb(s, _table_cfg("msc_dist.data.config", "COMMANDS", n), _data(n))
                  for n, s in DATA_SUMMARIES.items()}),
}


# ---------------------------------------------------------------------------------------------
# The parser


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray's own log lines and debug messages (default: off)")
    return p


def _parser(**kw) -> argparse.ArgumentParser:
    """Every msc parser: the common flags, flag help wrapped at spaces only."""
    return argparse.ArgumentParser(parents=[_common()], formatter_class=HelpFormatter, **kw)


def _add_verb(sub, name: str, verb: "Verb") -> argparse.ArgumentParser:
    return sub.add_parser(name, help=verb.summary, description=verb.summary, parents=[_common()],
                          formatter_class=HelpFormatter)


def _fill(parser: argparse.ArgumentParser, verb: Verb, path: str) -> None:
    if verb.sub is not None:
        sub = parser.add_subparsers(dest=f"_{path}_cmd", required=True, metavar="COMMAND")
        for name, v in verb.sub.items():
            _fill(_add_verb(sub, name, v), v, f"{path}_{name}".replace("-", "_"))
        return
    cls, help_text = verb.load()
    add_config_args(parser, cls, help_text)
    parser.set_defaults(_verb=verb)


def build_parser(prog: str = "msc") -> argparse.ArgumentParser:
    p = _parser(prog=prog, description=__doc__.split("\n\n")[0],
                epilog="msc VERB --help lists the verb's flags with their defaults.")
    sub = p.add_subparsers(dest="_verb_name", required=True, metavar="VERB")
    for name, v in VERBS.items():
        _fill(_add_verb(sub, name, v), v, name)
    return p


def verb_parser(path: list[str], prog: str) -> argparse.ArgumentParser:
    """A parser for one verb alone (``python -m msc_dist.train`` = ``msc train``)."""
    verb = VERBS[path[0]]
    for name in path[1:]:
        verb = verb.sub[name]
    p = _parser(prog=prog, description=verb.summary)
    _fill(p, verb, "_".join(path))
    return p


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    ns = parser.parse_args(argv)
    from msc_dist.console import set_verbose, setup_logging

    if getattr(ns, "verbose", False):
        set_verbose(True)
    setup_logging()
    cfg, explicit = config_from_args(ns._config_cls, ns, parser)
    try:
        return ns._verb.run(cfg, explicit)
    except Exception as e:
        if _user_error(e):
            print(f"error: {e}", file=sys.stderr)
            return 2
        # storage failures: one line saying what to do; the traceback with --verbose
        from msc_dist import storage
        from msc_dist.console import verbose

        msg = storage.explain(e)
        if msg is None:
            raise
        if verbose():
            import traceback

            traceback.print_exc()
        print(f"error: {msg}" + ("" if verbose() else " (--verbose: the traceback)"), file=sys.stderr)
        return 2


# Errors that are the user's to fix (one line, exit 2), by module: a module that was never
# imported raised none of them, so the check imports nothing (msc serve fails in a second).
USER_ERRORS = (("msc_dist.config", "ConfigError"), ("msc_dist.data.shards", "DataError"),
               ("msc_dist.index", "IndexMismatch"), ("msc_dist.checkpoint", "CheckpointError"),
               ("msc_dist.graph", "ExportError"))


def _user_error(e: Exception) -> bool:
    if isinstance(e, FileNotFoundError):
        return True
    return any(isinstance(e, getattr(sys.modules[m], name)) for m, name in USER_ERRORS if m in sys.modules)


def main(argv: list[str] | None = None, prog: str = "msc") -> int:
    """The ``msc`` console script."""
    return _run(build_parser(prog), argv)


def run_module(path: list[str], argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m msc_dist.<job>``: the verb's parser and code under the module's name."""
    return _run(verb_parser(path, prog or f"python -m msc_dist.{path[0]}"), argv)

