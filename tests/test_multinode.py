"""A real two-node Ray cluster on this machine (two `ray start`s, each its own raylet and
resources), driven with the commands users run: `ray job submit` for training (one worker per
node, checkpoints on S3) and embedding, `serve deploy serving/config.yaml`, then a scored HTTP
request. The S3 endpoint reaches the jobs only through `ray job submit --runtime-env-json`; the
nodes hold the credentials (as an instance role would), never the job's runtime env.
Everything started here is stopped at the end, also on failure, without touching other Ray
instances on the machine (no `ray stop`)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, timeout, env, check=True):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args[:4]))} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def _submit(args, timeout, env):
    """`ray job submit`, retried while the head's job agent is still starting."""
    deadline = time.time() + 120
    while True:
        r = _run(args, timeout, env, check=False)
        if r.returncode == 0 or "No available agent" not in r.stderr + r.stdout or time.time() > deadline:
            break
        time.sleep(3)
    if r.returncode != 0:
        raise AssertionError(f"job failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def _kill_cluster(temp_dir: str) -> list[int]:
    """SIGKILL every process whose command line names this cluster's temp dir."""
    killed = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().decode(errors="ignore")
        except OSError:
            continue
        if temp_dir in cmd:
            try:
                os.kill(int(d), signal.SIGKILL)
                killed.append(int(d))
            except ProcessLookupError:
                pass
    return killed


@pytest.fixture()
def two_node_cluster():
    temp_dir = tempfile.mkdtemp(prefix="mscmn-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash = _port(), _port()
    # The nodes get the S3 credentials (the cluster's credential chain), not the endpoint: the jobs
    # name that in their own runtime env.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MSC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL",
                                                            "AWS_ENDPOINT_URL_S3")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    # Ray >= 2.5x turns token auth on when ~/.ray/auth_token exists (any earlier ray.init makes
    # one). Give this cluster its own token, explicitly, for every node and client.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    try:
        # Every agent gets free ports of its own: both nodes share this host, and so may another
        # Ray (the test session's), whose agents hold the default ports.
        def agent_ports():
            return [f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}",
                    f"--metrics-export-port={_port()}", f"--runtime-env-agent-port={_port()}"]

        _run([BIN / "ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
              "--num-cpus=2", "--resources={\"node_a\": 1}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
              *agent_ports()], 120, env)
        _run([BIN / "ray", "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--resources={\"node_b\": 1}",
              "--disable-usage-stats", *agent_ports()], 120, env)
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env, "temp_dir": temp_dir}
    finally:
        _kill_cluster(temp_dir)
        time.sleep(1)
        assert not _kill_cluster(temp_dir), "processes of the test cluster survived"
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_two_nodes_train_embed_serve(s3_server, two_node_cluster, tmp_path):
    import json

    import boto3

    c, env = two_node_cluster, two_node_cluster["env"]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="msc-mn")
    deadline = time.time() + 60
    while time.time() < deadline:  # the autoscaler's view catches up with the second raylet
        status = _run([BIN / "ray", "status", f"--address={c['gcs']}"], 60, env).stdout
        if "node_a" in status and "node_b" in status:
            break
        time.sleep(2)
    assert "node_a" in status and "node_b" in status, status

    py = sys.executable
    _run([py, "-m", "msc_dist.data", "demo", "--out", str(tmp_path / "demo"), "--n-train", "64", "--n-test-normal", "8",
          "--n-test-defect", "8", "--size", "48"], 120, env)
    # As a new user would: the endpoint in the job's runtime env (the driver must not send it again).
    submit = [BIN / "ray", "job", "submit", f"--address={c['dashboard']}", "--working-dir", ".",
              "--runtime-env-json", json.dumps({"env_vars": {"MSC_S3_ENDPOINT_URL": s3_server}}), "--"]
    runs, out = "s3://msc-mn/runs", tmp_path / "index"
    r = _submit(submit + ["python", "-m", "msc_dist.train", "--data", str(tmp_path / "demo" / "train"),
                       "--eval-data", str(tmp_path / "demo" / "test"), "--normal-classes", "normal",
                       "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--num-workers", "2",
                       "--loader-workers", "0", "--placement-strategy", "STRICT_SPREAD",
                       "--storage-path", runs, "--name", "mn"], 420, env)
    logs = r.stdout + r.stderr
    assert "succeeded" in logs.lower(), logs[-3000:]
    from msc_dist import storage

    fs = storage.filesystem(runs)  # this process has the endpoint (the s3_server fixture)
    metas = [json.loads(fs.cat(m)) for m in fs.glob("msc-mn/runs/mn/checkpoint_*/meta.json")]
    nodes = next(m["rank_nodes"] for m in metas if m["epoch"] == 0)
    assert len(nodes) == 2 and nodes[0] != nodes[1], f"the two workers did not land on different nodes: {nodes}"

    # The embedding workers read the checkpoint from S3: the job's runtime env reached them.
    _submit(submit + ["python", "-m", "msc_dist.embed", "--checkpoint", f"{runs}/mn", "--out", str(out),
                   "--batch-size", "16"], 300, env)
    assert (out / "current.json").exists()

    cfg = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    http_port = _port()
    cfg["http_options"].update(host="127.0.0.1", port=http_port)
    cfg["proxy_location"] = "HeadOnly"  # both "nodes" share one host: one proxy per port
    app = cfg["applications"][0]
    app["args"].update(api_key_env="MSC_MULTINODE_NO_KEY", allow_anonymous=True)  # loopback only
    app["runtime_env"] = {"env_vars": {"MSC_S3_ENDPOINT_URL": s3_server}}  # the index's checkpoint is on S3
    for d in app["deployments"]:
        d["ray_actor_options"]["num_cpus"] = 0.5
        if d["name"] == "Model":
            d["user_config"].update(index=str(out))  # the checkpoint: the one the index manifest names
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    _run([BIN / "serve", "deploy", str(tmp_path / "serve.yaml"), f"--address={c['dashboard']}"], 120, env)

    img = next((tmp_path / "demo" / "test").glob("*.tar"))
    from msc_dist.data.shards import iter_samples

    data = next(iter_samples(str(img))).data
    deadline, last = time.time() + 180, None
    while time.time() < deadline:
        try:
            last = httpx.post(f"http://127.0.0.1:{http_port}/v1/score", content=data,
                              headers={"content-type": "image/jpeg"}, timeout=30)
            if last.status_code == 200:
                break
        except httpx.HTTPError as e:
            last = e
        time.sleep(2)
    if not (isinstance(last, httpx.Response) and last.status_code == 200):
        st = _run([BIN / "serve", "status", f"--address={c['dashboard']}"], 60, env, check=False)
        raise AssertionError(f"no score from the deployed app: {last!r} {getattr(last, 'text', '')}\n{st.stdout}\n{st.stderr}")
    (res,) = last.json()
    assert res["score"] >= 0 and len(res["neighbors"]) == 2
