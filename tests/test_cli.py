"""The ``msc`` command: verbs, flags from the typed configs, defaults in every --help, the
flag > file > default order, and the benchmarks' flags borrowed from the jobs' configs."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from contextlib import redirect_stdout

import pytest

from conftest import free_port
from msc_dist.cli import VERBS, build_parser, main, verb_parser

EXPECTED_VERBS = ["train", "embed", "score", "evaluate", "test", "predict", "export", "serve", "detectors", "bench", "data"]


def _help(argv: list[str], parser=None) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit) as e:
        (parser or build_parser()).parse_args(argv)
    assert e.value.code == 0
    return re.sub(r"\s+", " ", buf.getvalue())


def _leaves():
    for name, v in VERBS.items():
        if v.sub is None:
            yield [name], v
        else:
            for sub, sv in v.sub.items():
                yield [name, sub], sv


def test_msc_help_lists_the_verbs():
    text = _help(["--help"])
    for v in EXPECTED_VERBS:
        assert re.search(rf" {v} \w", text), v
    assert list(VERBS) == EXPECTED_VERBS
    assert set(VERBS["bench"].sub) == {"train", "embed", "load", "search", "serve", "quality", "embed-scale"}
    assert set(VERBS["data"].sub) == {"make-shards", "demo", "describe"}
    assert set(VERBS["detectors"].sub) == {"list", "show", "remove", "default"}


@pytest.mark.parametrize("path", [p for p, _ in _leaves()], ids="-".join)
def test_every_verb_help_lists_every_flag_with_its_default(path):
    verb = dict((tuple(p), v) for p, v in _leaves())[tuple(path)]
    cls, _ = verb.load()
    text = _help([*path, "--help"])
    defaults = cls()
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag") or ("--" + f.name.replace("_", "-") if not f.metadata.get("positional")
                                          else f.name.upper())
        assert flag in text, (path, f.name)
        # the flag's own help ends with its default
        assert re.search(re.escape(flag) + r"\b.*?\(default: " + re.escape(repr(getattr(defaults, f.name))) + r"\)",
                         text), (path, f.name)
    assert "--config FILE.yaml" in text and "--verbose" in text


def test_python_m_job_is_the_same_parser():
    for job in ("train", "embed", "score", "evaluate"):
        ours = _help(["--help"], verb_parser([job], f"python -m msc_dist.{job}"))
        msc = _help([job, "--help"])
        assert ours.replace(f"python -m msc_dist.{job}", "msc " + job) == msc


def test_flag_beats_file_beats_default(tmp_path):
    from msc_dist.config import config_from_args
    from msc_dist.predict import PredictConfig

    y = tmp_path / "p.yaml"
    y.write_text("batch-size: 7\ndevice: cpu\nmax_bytes: 100\n")
    p = build_parser()
    ns = p.parse_args(["predict", "--config", str(y), "--batch-size", "3", "a.png", "b"])
    cfg, explicit = config_from_args(PredictConfig, ns, p)
    assert (cfg.batch_size, cfg.device, cfg.max_bytes, cfg.paths) == (3, "cpu", 100, ["a.png", "b"])
    assert cfg.max_pixels == PredictConfig().max_pixels and explicit == {"batch_size", "device", "max_bytes", "paths"}


def test_bad_values_name_the_valid_choices(tmp_path, capsys):
    y = tmp_path / "bad.yaml"
    y.write_text("batchsize: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["predict", "--config", str(y), "x.png"])
    assert e.value.code == 2 and "valid keys" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "--format", "tflite"]) == 2
    assert "valid: ['onnx', 'openvino', 'torchscript']" in capsys.readouterr().err
    assert main(["predict", "--index", str(tmp_path), str(tmp_path)]) == 2  # no manifest there
    assert "manifest.json" in capsys.readouterr().err


def test_bench_flags_come_from_the_job_configs():
    """bench train / quality take TrainConfig's fields with TrainConfig's defaults (they were
    repeated by hand, --epochs 10 vs 20); evaluation borrows its 13 training fields."""
    from msc_dist.bench.config import BenchQualityConfig, BenchSearchConfig, BenchTrainConfig
    from msc_dist.config import field_types, project
    from msc_dist.embed.config import EmbedConfig
    from msc_dist.evaluate.config import TRAIN_KEYS, EvalConfig
    from msc_dist.train.config import TrainConfig

    t, tt = TrainConfig(), field_types(TrainConfig)
    for cls in (BenchTrainConfig, BenchQualityConfig):
        for f in dataclasses.fields(cls):
            if f.name in tt:
                assert getattr(cls(), f.name) == getattr(t, f.name) and field_types(cls)[f.name] == tt[f.name], f.name
    assert BenchQualityConfig().epochs == TrainConfig().epochs == 20
    assert {"temperature", "angular_weight", "hflip", "crop_min_scale", "lr"} <= {f.name for f in dataclasses.fields(BenchTrainConfig)}
    assert (BenchSearchConfig().k, BenchSearchConfig().factory) == (EmbedConfig().k, EmbedConfig().factory)
    ev = EvalConfig(lr=3e-4, hflip=False, image_size=48)
    tc = project(ev, TrainConfig, data="d")
    assert {k: getattr(tc, k) for k in TRAIN_KEYS} == {k: getattr(ev, k) for k in TRAIN_KEYS}
    assert tc.data == "d" and tc.temperature == t.temperature


def test_data_verbs_run(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path / "d"), "--n-train", "8", "--n-test-normal", "2",
                 "--n-test-defect", "2", "--size", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["samples"] == 8
    assert main(["data", "describe", str(tmp_path / "d" / "test")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["samples"] == 4 and d["classes"][0] == "normal"


def _tiny_served_index(tmp_path):
    from conftest import noise_images, tiny_checkpoint, tiny_index

    ck = tiny_checkpoint(tmp_path / "ck", image_size=32, resize_mode="center_crop")
    tiny_index(tmp_path / "idx", ck, {f"n{i}": b for i, b in enumerate(noise_images(6))})
    return ck, str(tmp_path / "idx")


def test_serve_deploys_the_serving_app_with_its_builder(monkeypatch, capsys, tmp_path, request):
    """msc serve = serve run serving/config.yaml from Python: the app's own build_app, no shell,
    after its start-up checks; --config takes every AppConfig key (allow_anonymous included)."""
    import signal

    from ray import serve

    before = signal.getsignal(signal.SIGTERM)  # msc serve takes SIGTERM over; this process gets its own back
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, before))

    import msc_dist.cli
    import msc_dist.console
    import serving.app

    ck, idx = _tiny_served_index(tmp_path)
    calls = {}
    monkeypatch.setattr(msc_dist.console, "init_ray", lambda address=None: calls.setdefault("ray", address))
    monkeypatch.setattr(serve, "start", lambda **kw: calls.setdefault("start", kw))
    monkeypatch.setattr(serve, "run", lambda app, **kw: calls.setdefault("run", (app, kw)))
    monkeypatch.setattr(msc_dist.cli, "wait_forever", lambda: calls.setdefault("waited", True))
    built = {}
    real = serving.app.build_app
    monkeypatch.setattr(serving.app, "build_app", lambda args: built.setdefault("args", args) and real(args))
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("allow_anonymous: true\nindex_poll_s: 2\napi_key_env: MSC_TEST_NO_SUCH_KEY\n")
    port = str(free_port())
    assert main(["serve", "--config", str(yaml_file), "--checkpoint", ck, "--index", idx, "--port", port,
                 "--device", "cpu"]) == 0
    assert calls["start"] == {"http_options": {"host": "127.0.0.1", "port": int(port)}}
    args = built["args"]
    assert args["checkpoint"] == ck and args["index"] == idx and args["device"] == "cpu"
    assert args["allow_anonymous"] is True and args["index_poll_s"] == 2.0 and "port" not in args
    app, kw = calls["run"]
    assert kw == {"name": "msc", "route_prefix": "/", "blocking": False} and type(app).__name__ == "Application"
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{port}" in out and "ANONYMOUS" in out and calls["waited"]
    # A key the config does not have is named, with the valid ones; nothing is started.
    yaml_file.write_text("allow_anonymus: true\n")
    calls.clear()
    with pytest.raises(SystemExit) as e:
        main(["serve", "--config", str(yaml_file), "--index", idx])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "allow_anonymus" in err and "allow_anonymous" in err and "start" not in calls


def test_serve_without_a_key_exits_at_once_with_the_reason_on_one_line(tmp_path):
    """No key and no allow_anonymous: a real `msc serve` process exits 2 within 10 s, before Ray
    or Serve start, and says why in one line (as does an index that is not there)."""
    import os
    import subprocess
    import sys
    import time

    ck, idx = _tiny_served_index(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MSC_API_KEY"}
    for argv, words in ((["--index", idx], "no API key"),
                        (["--index", str(tmp_path / "missing"), "--allow-anonymous"], "current.json")):
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "msc_dist", "serve", *argv, "--port", str(free_port())],
                           capture_output=True, text=True, timeout=60, env=env)
        took = time.time() - t0
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1 and words in lines[0], (p.returncode, p.stderr[-2000:])
        assert took < 10 or words != "no API key", took  # the key is checked before anything heavy loads
        assert "serving" not in p.stdout


def test_msc_serve_drains_and_exits_0_on_sigterm(tmp_path):
    """A supervisor's stop (SIGTERM: systemd, Kubernetes, kill) ends msc serve as Ctrl-C does:
    Serve is shut down and the process exits 0, not the abort (SIGABRT) of the handler that
    ray.init installs; the port is free afterwards."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    ck, idx = _tiny_served_index(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's
    p = subprocess.Popen([sys.executable, "-m", "msc_dist", "serve", "--checkpoint", ck, "--index", idx, "--device", "cpu",
                          "--allow-anonymous", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        deadline, up = time.time() + 240, False
        while time.time() < deadline and p.poll() is None and not up:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=5).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.5)
        assert up, (p.poll(), p.stderr.read()[-3000:] if p.poll() is not None else "not up in 240 s")
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, (p.returncode, err[-3000:])
    assert "stopping: draining requests in flight" in out
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=5)
