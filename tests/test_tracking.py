"""MLflow tracking of training runs (msc_dist.tracking) on a real local Ray Train run and a real
local MLflow store; a published index version registered as a model version."""

from __future__ import annotations

import os

import numpy as np
import pytest

from msc_dist.config import ConfigError
from msc_dist.train.config import TrainConfig
from msc_dist.train.job import main
from test_data import write_shards
from test_train_ray import SMALL

mlflow = pytest.importorskip("mlflow")


@pytest.mark.slow
def test_a_training_run_is_tracked_and_its_published_index_registered(local_ray, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from msc_dist import checkpoint as ckpt
    from msc_dist.index import read_manifest
    from msc_dist.index.build import write_index
    from msc_dist.tracking import register_version, version_source

    data = tmp_path / "data"
    write_shards(data, [16, 16])
    monkeypatch.chdir(tmp_path)  # the relative store must end up here, not in a Ray worker's folder
    cfg = TrainConfig(data=str(data), epochs=2, storage_path=str(tmp_path / "runs"), name="tracked",
                      tracking_uri="sqlite:///ml/mlflow.db", tracking_experiment="msc-test", **SMALL)
    out = main(cfg)
    assert out.error is None
    uri = "sqlite:///" + str(tmp_path / "ml" / "mlflow.db")
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.get_experiment_by_name("msc-test")
    (run,) = c.search_runs([exp.experiment_id])
    assert run.info.run_id == out.metrics["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == "tracked"
    # The resolved config as params (not the tracking URI), the run folder and checkpoint as tags.
    p = run.data.params
    assert p["epochs"] == "2" and p["batch_size"] == "4" and p["backbone"] == "efficientnet_lite0"
    assert p["normal_classes"] == '["0"]' and "tracking_uri" not in p
    assert run.data.tags["msc.run_dir"] == out.run_dir
    assert os.path.samefile(run.data.tags["msc.checkpoint"], out.checkpoint)
    # Per-epoch metrics, step = epoch (epoch 0: the frozen features).
    loss = c.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2] and all(np.isfinite(m.value) for m in loss)
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "feature_cos")) == [0, 1, 2]
    # Artifacts: the config and the curves, a real PNG, beside the database (not in a worker's folder).
    arts = {a.path for a in c.list_artifacts(run.info.run_id)} | {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
    assert {"config.json", "plots/training_curves.png"} <= arts
    png = c.download_artifacts(run.info.run_id, "plots/training_curves.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isdir(tmp_path / "ml" / "mlflow-artifacts")

    # A published index version of this checkpoint: a registered version that resolves to its folder.
    loaded = ckpt.load(ckpt.resolve(out.run_dir))
    rng = np.random.default_rng(0)
    z = rng.standard_normal((8, 4)).astype(np.float32)
    index_out = str(tmp_path / "registry" / "line1" / "bolt")
    write_index(index_out, z / np.linalg.norm(z, axis=1, keepdims=True), [f"s{i}" for i in range(8)],
                loaded.model_id, calibration=z[:4], target_fpr=0.25, extra={"checkpoint": ckpt.resolve(out.run_dir)})
    man, folder = read_manifest(index_out)
    v1 = register_version(uri, "line1/bolt", folder, man)
    assert v1 == "1" and version_source(uri, "line1/bolt") == folder
    assert read_manifest(version_source(uri, "line1/bolt", v1))[0] == man
    mv = c.get_model_version("line1.bolt", v1)
    assert mv.run_id == run.info.run_id  # linked to the run that trained its checkpoint
    assert mv.tags["msc.index_version"] == man.version and float(mv.tags["msc.threshold"]) == man.threshold


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run(local_ray, tmp_path):
    """A rerun with more epochs resumes the training run and logs into the same MLflow run (a
    file: store here); the curves hold every epoch."""
    from mlflow import MlflowClient

    data = tmp_path / "data"
    write_shards(data, [16, 16])
    store = tmp_path / "mlruns"
    cfg = TrainConfig(data=str(data), epochs=1, storage_path=str(tmp_path / "runs"), name="resumed",
                      tracking_uri=f"file:{store}", **SMALL)
    first = main(cfg)
    second = main(TrainConfig(**{**cfg.__dict__, "epochs": 2}))
    assert first.error is None and second.error is None
    assert first.metrics["mlflow_run_id"] == second.metrics["mlflow_run_id"]
    c = MlflowClient(tracking_uri=f"file:{store}")
    (run,) = c.search_runs([c.get_experiment_by_name("msc").experiment_id])
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "loss")) == [1, 2]
    assert run.data.params["epochs"] == "1" and run.data.tags["msc.resumed.epochs"] == "2"


def test_a_bad_tracking_uri_is_one_config_error_before_ray_starts(tmp_path):
    from msc_dist.train.job import validate

    data = tmp_path / "data"
    write_shards(data, [8])
    with pytest.raises(ConfigError, match=r"valid forms are sqlite:///PATH.db, file:PATH .* http\(s\)://HOST:PORT"):
        validate(TrainConfig(data=str(data), tracking_uri="mlflow.db", **SMALL))
