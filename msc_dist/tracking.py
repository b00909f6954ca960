"""MLflow tracking (optional: ``pip install 'msc-dist[tracking]'``): training runs and detector versions.

    --tracking-uri sqlite:///mlflow.db   a local database (relative paths are made absolute)
    --tracking-uri file:./mlruns         a local folder store (MLflow keeps it in maintenance mode)
    --tracking-uri http://host:5000      a tracking server (the only one that works across nodes)

A training run is one MLflow run in the experiment ``tracking_experiment``, found again by its
run folder (tag ``msc.run_dir``) when the training run resumes: the resolved config as params,
each epoch's metrics (step = epoch), the tag ``msc.checkpoint`` (the latest registered checkpoint),
``config.json`` and a plot of the per-epoch curves as artifacts. Rank 0 logs it all (``RunTracker``,
made in ``train.job.ray_train_fn``); the driver only checks the URI before Ray starts
(``check_uri``). A published index version becomes a registered model version whose source is
its version folder (``register_version``); a detector ``line/bolt`` is the registered model
``line.bolt`` (MLflow names have no ``/``; detector names have no ``.``).

Nothing here imports Ray or torch."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

from msc_dist.config import ConfigError

log = logging.getLogger("msc_dist.tracking")

SCHEMES = ("file:", "sqlite:", "http://", "https://")
CHECKPOINT_TAG, RUN_DIR_TAG = "msc.checkpoint", "msc.run_dir"
PLOT = "plots/training_curves.png"
# Per-epoch keys that are not metrics (the step is the epoch; lists are per-rank details).
_NOT_METRICS = ("epoch", "start_epoch")
_PARAM_MAX = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """An MLflow call failed (one line: what, where, and MLflow's reason)."""


def resolve_uri(uri: str | None) -> str | None:
    """None or "" (tracking off) -> None; a local store's relative path -> absolute (Ray workers
    run in other folders); a server URL as it is. Anything else is a ConfigError naming the valid forms."""
    if not uri:
        return None
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return "sqlite:///" + os.path.abspath(os.path.expanduser(path))
    if uri.startswith("file:"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):]
        return "file:" + os.path.abspath(os.path.expanduser(path))
    if uri.startswith(("http://", "https://")):
        return uri
    raise ConfigError(f"tracking_uri {uri!r}: valid forms are sqlite:///PATH.db, file:PATH (local stores) "
                      "and http(s)://HOST:PORT (a tracking server)")


def _mlflow():
    try:
        import mlflow  # noqa: F401
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError("tracking_uri needs MLflow: pip install 'msc-dist[tracking]' (mlflow-skinny)") from None
    return MlflowClient


def client(uri: str):
    """An MlflowClient for ``uri`` (resolved), tracking and model registry in the same store."""
    uri = resolve_uri(uri)
    if uri is None:
        raise ConfigError("no tracking_uri given")
    MlflowClient = _mlflow()
    if uri.startswith("sqlite:"):
        missing = [m for m in ("sqlalchemy", "alembic") if not _importable(m)]
        if missing:
            raise ConfigError(f"tracking_uri {uri}: a sqlite store needs {' and '.join(missing)}: "
                              "pip install 'msc-dist[tracking]'")
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    if uri.startswith("file:"):
        # MLflow 3 refuses new folder stores unless asked: a folder is what file: asks for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def check_uri(uri: str | None, experiment: str) -> str | None:
    """The driver's check, before Ray starts: the URI's form, MLflow installed, the store reachable
    and the experiment usable. Returns the resolved URI (None: tracking off); a ConfigError otherwise."""
    uri = resolve_uri(uri)
    if uri is None:
        return None
    if not experiment:
        raise ConfigError("tracking_experiment must not be empty")
    try:
        experiment_id(client(uri), experiment, uri)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"tracking_uri {uri}: cannot use MLflow experiment {experiment!r}: {_why(e)}") from None
    return uri


def experiment_id(c, name: str, uri: str) -> str:
    """The experiment's id, created when missing. A sqlite store keeps its artifacts beside the
    database (``<db>-artifacts/``), not in the process's working folder."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise ConfigError(f"MLflow experiment {name!r} is deleted in {uri}: restore it or set tracking_experiment")
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = "file:" + os.path.splitext(uri[len("sqlite:///"):])[0] + "-artifacts"
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _why(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def flat_params(config: dict, skip: tuple[str, ...] = ("tracking_uri",)) -> dict[str, str]:
    """A config dict as MLflow params: strings, lists as JSON; the tracking URI is left out (a
    server URL may carry credentials)."""
    out = {}
    for k, v in config.items():
        if k in skip:
            continue
        s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        out[k] = s[:_PARAM_MAX]
    return out


def epoch_metrics(m: dict) -> dict[str, float]:
    """The numbers of one epoch's report (bools as 0/1; lists and strings left out)."""
    out = {}
    for k, v in m.items():
        if k in _NOT_METRICS or isinstance(v, (list, dict, str)) or v is None:
            continue
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return out


class RunTracker:
    """Rank 0's MLflow run of one training run. Every call after ``open`` only warns when MLflow
    fails (a tracking server that blips must not stop training); ``open`` raises TrackingError
    (the caller decides)."""

    def __init__(self, c, run_id: str, uri: str):
        self.client, self.run_id, self.uri = c, run_id, uri
        self._warned = False

    @classmethod
    def open(cls, uri: str, experiment: str, run_dir: str, run_name: str, config: dict) -> "RunTracker":
        """The MLflow run of ``run_dir`` (the one a previous attempt or a resumed run started, else a
        new one), set running, with the config as params. A param whose value changed on a resume
        (MLflow keeps params immutable) is recorded as the tag ``msc.resumed.<key>`` instead."""
        from mlflow.entities import Param, RunTag

        uri = resolve_uri(uri)
        try:
            c = client(uri)
            eid = experiment_id(c, experiment, uri)
            found = c.search_runs([eid], filter_string=f"tags.`{RUN_DIR_TAG}` = '{_quote(run_dir)}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
            if found:
                run = found[0]
                c.update_run(run.info.run_id, status="RUNNING")
                had = run.data.params
            else:
                run = c.create_run(eid, run_name=run_name, tags={RUN_DIR_TAG: run_dir})
                had = {}
            params = flat_params(config)
            new = [Param(k, v) for k, v in params.items() if k not in had]
            changed = [RunTag(f"msc.resumed.{k}", v) for k, v in params.items() if k in had and had[k] != v]
            for i in range(0, max(len(new), len(changed)), 100):  # MLflow's batch limit
                c.log_batch(run.info.run_id, params=new[i:i + 100], tags=changed[i:i + 100])
            with tempfile.TemporaryDirectory(prefix="msc-mlflow-") as d:
                with open(os.path.join(d, "config.json"), "w") as f:
                    json.dump(config | {"tracking_uri": None}, f, indent=2, default=str)
                c.log_artifact(run.info.run_id, os.path.join(d, "config.json"))
        except ConfigError:
            raise
        except Exception as e:
            raise TrackingError(f"MLflow at {uri}: cannot open the run of {run_dir}: {_why(e)}") from None
        log.info("MLflow run %s (experiment %r, %s)", run.info.run_id, experiment, uri)
        return cls(c, run.info.run_id, uri)

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:
            log.warning("MLflow at %s: %s failed (training goes on): %s", self.uri, what, _why(e))

    def log_epoch(self, metrics: dict, checkpoint: str | None = None) -> None:
        """One epoch's numbers at step = epoch; ``checkpoint``: where its checkpoint was registered."""
        from mlflow.entities import Metric, RunTag

        step, now = int(metrics.get("epoch", 0)), int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in epoch_metrics(metrics).items()]
        tags = [RunTag(CHECKPOINT_TAG, checkpoint)] if checkpoint else []
        for i in range(0, max(len(batch), 1), 1000):
            self._guard(f"logging epoch {step}", self.client.log_batch, self.run_id, metrics=batch[i:i + 1000],
                        tags=tags if i == 0 else [])

    def history(self, keys) -> dict[str, list[tuple[int, float]]]:
        """Each metric's (epoch, value) pairs as the store has them (a resumed run's earlier epochs too)."""
        out = {}
        for key in keys:
            try:
                hist = self.client.get_metric_history(self.run_id, key)
            except Exception:
                continue
            by_step = {}
            for m in sorted(hist, key=lambda m: m.timestamp):
                by_step[m.step] = m.value  # a re-run epoch (after a restart): its last value
            if by_step:
                out[key] = sorted(by_step.items())
        return out

    def log_plots(self) -> None:
        from msc_dist.evaluate.plots import training_curves_plot

        def plot():
            with tempfile.TemporaryDirectory(prefix="msc-mlflow-") as d:
                path = os.path.join(d, os.path.basename(PLOT))
                hist = self.history(PLOTTED)
                panels = {t: {k: hist.get(k, []) for k in keys} for t, keys in PLOT_GROUPS.items()}
                training_curves_plot(path, panels, f"training curves ({self.run_id[:8]})")
                self.client.log_artifact(self.run_id, path, os.path.dirname(PLOT))

        self._guard("logging the plots", plot)

    def finish(self, failed: BaseException | None = None) -> None:
        """The plots, then the run's end: FINISHED, or FAILED with the error as a tag."""
        self.log_plots()
        if failed is not None:
            self._guard("tagging the error", self.client.set_tag, self.run_id, "msc.error", _why(failed))
        self._guard("ending the run", self.client.set_terminated, self.run_id, "FAILED" if failed else "FINISHED")


# The curves of training_curves_plot: one panel per group, the groups' metrics that were logged.
PLOT_GROUPS = {"loss": ("loss",), "ROC-AUC": ("roc_auc",), "cosine": ("feature_cos", "normal_cos"), "lr": ("lr",)}
PLOTTED = tuple(k for keys in PLOT_GROUPS.values() for k in keys)


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


def model_name(detector: str) -> str:
    """The registered model of a detector: ``/`` becomes ``.`` (MLflow names cannot hold ``/``;
    detector names hold no ``.``, so no two detectors share one)."""
    if not detector or "." in detector:
        raise ConfigError(f"detector name {detector!r}: must be non-empty and hold no '.'")
    return detector.replace("/", ".")


def training_run_of(c, checkpoint: str | None) -> str | None:
    """The MLflow run that trained ``checkpoint``: the one that tagged it (``msc.checkpoint``), else
    the run of the run folder that holds it (Ray Train keeps checkpoints in the run folder)."""
    if not checkpoint:
        return None
    ids = [e.experiment_id for e in c.search_experiments()]
    if not ids:
        return None
    checkpoint = checkpoint.rstrip("/")
    for tag, value in ((CHECKPOINT_TAG, checkpoint), (RUN_DIR_TAG, checkpoint.rsplit("/", 1)[0])):
        found = c.search_runs(ids, filter_string=f"tags.`{tag}` = '{_quote(value)}'", max_results=1)
        if found:
            return found[0].info.run_id
    return None


def register_version(tracking_uri: str, detector: str, version_folder: str, manifest) -> str:
    """A registered model version of ``detector`` whose source is the published index version
    folder ``version_folder`` (``manifest``: that version's IndexManifest), linked to the training
    run of its checkpoint when this store has it. Returns the MLflow version number (a string).
    A tracking server accepts only sources it can tell from a local path (s3://...): publish the
    registry on S3 to register with one. Raises TrackingError with MLflow's reason."""
    uri = resolve_uri(tracking_uri)
    name = model_name(detector)
    extra = getattr(manifest, "extra", {}) or {}
    tags = {"msc.detector": detector, "msc.index_version": manifest.version, "msc.model_id": manifest.model_id,
            "msc.count": str(manifest.count), "msc.threshold": str(manifest.threshold),
            "msc.target_fpr": str(manifest.target_fpr), "msc.checkpoint": str(extra.get("checkpoint", ""))}
    try:
        c = client(uri)
        try:
            c.create_registered_model(name, tags={"msc.detector": detector})
        except Exception as e:
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        run_id = None
        try:
            run_id = training_run_of(c, extra.get("checkpoint"))
        except Exception as e:
            log.warning("MLflow at %s: no training run linked to %s: %s", uri, detector, _why(e))
        mv = c.create_model_version(name, source=version_folder, run_id=run_id, tags=tags,
                                    description=f"index version {manifest.version} of detector {detector}")
    except ConfigError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow at {uri}: cannot register {version_folder} as a version of {name!r}: {_why(e)}") from None
    return str(mv.version)


def version_source(tracking_uri: str, detector: str, version: str | None = None) -> str:
    """The index version folder a registered version of ``detector`` points at (the newest without
    ``version``)."""
    c, name = client(tracking_uri), model_name(detector)
    if version is None:
        found = c.search_model_versions(f"name = '{_quote(name)}'")
        if not found:
            raise TrackingError(f"no registered version of {name!r}")
        return max(found, key=lambda v: int(v.version)).source
    return c.get_model_version(name, str(version)).source
