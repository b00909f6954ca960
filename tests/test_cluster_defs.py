"""Cluster, KubeRay, serving and container definitions checked against Ray's own schemas and
against the repository (every command they name runs; every file the image copies exists)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_ray_up_config_matches_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert any("InstanceMarketOptions" in t["node_config"] for t in types.values())  # spot group
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())


def _serve_configs():
    yield "serving/config.yaml", yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    svc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    yield "rayservice serveConfigV2", yaml.safe_load(svc["spec"]["serveConfigV2"])


@pytest.mark.parametrize("name,cfg", list(_serve_configs()))
def test_serve_configs_match_serves_schema(name, cfg):
    from ray.serve.schema import ServeDeploySchema

    parsed = ServeDeploySchema.model_validate(cfg)
    (app,) = parsed.applications
    assert app.import_path == "serving.app:build_app"
    deps = {d.name: d for d in app.deployments}
    model = deps["Model"]
    assert model.autoscaling_config["min_replicas"] >= 1 and model.max_queued_requests > 0
    assert {"index", "max_batch_size", "batch_wait_timeout_s"} <= set(model.user_config)
    # The index only: its manifest names the checkpoint that built it (a run folder here would
    # resolve to a newer checkpoint than the index's after a resumed run).
    assert "checkpoint" not in model.user_config
    # The builder accepts every arg the config passes.
    from serving.settings import AppConfig

    assert set(app.args) <= set(AppConfig.__dataclass_fields__)
    AppConfig.from_args(app.args)  # names and ranges
    AppConfig.from_args({**app.args, **model.user_config})
    # Fail closed, said explicitly: auth on, only the three image formats decoded.
    assert app.args["allow_anonymous"] is False and app.args["api_key_env"]
    assert sorted(app.args["formats"]) == ["JPEG", "PNG", "WEBP"]


def test_kuberay_manifests_are_well_formed():
    for f in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / f).read_text())
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob", "RayService")
    svc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    assert svc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def _named_modules() -> set[str]:
    mods = set()
    files = [ROOT / "README.md", ROOT / "infra" / "Dockerfile", *ROOT.glob("cluster/**/*.yaml"), ROOT / "serving" / "config.yaml"]
    for f in files:
        mods |= set(re.findall(r"python -m (msc_dist(?:\.[a-z_]+)*)", f.read_text()))
    return mods


@pytest.mark.parametrize("module", sorted(_named_modules()))
def test_every_named_command_exists(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def test_named_modules_cover_the_jobs():
    assert {"msc_dist.train", "msc_dist.embed", "msc_dist.score", "msc_dist.bench", "msc_dist.data"} <= _named_modules()


def test_dockerfile_copies_only_existing_files_and_runs_as_non_root():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    copies = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.M)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for s in sources:
            assert (ROOT / s).exists(), f"Dockerfile copies {s}, which does not exist"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")


def test_constraints_pin_what_the_tests_ran_with():
    pins = dict(l.split("==", 1) for l in (ROOT / "infra" / "constraints.txt").read_text().splitlines()
                if "==" in l and not l.startswith("#"))
    import ray
    import torch

    assert pins["ray"] == ray.__version__
    assert pins["torch"] in (torch.__version__, torch.__version__.split("+")[0])


def test_iam_policy_is_least_privilege():
    pol = json.loads((ROOT / "infra" / "iam-policy.json").read_text())
    actions = {a for st in pol["Statement"] for a in st["Action"]}
    assert not any(a.endswith("*") for a in actions)
    data_stmt = next(st for st in pol["Statement"] if st["Sid"] == "ReadTrainingAndScoringData")
    assert data_stmt["Action"] == ["s3:GetObject"]


def _kuberay(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / "kuberay" / name).read_text())


def _cluster_specs():
    yield "raycluster.yaml", _kuberay("raycluster.yaml")["spec"]
    yield "rayjob.yaml", _kuberay("rayjob.yaml")["spec"]["rayClusterSpec"]
    yield "rayservice.yaml", _kuberay("rayservice.yaml")["spec"]["rayClusterConfig"]


@pytest.mark.parametrize("name,spec", list(_cluster_specs()))
def test_kuberay_clusters_use_token_auth_from_a_secret(name, spec):
    assert spec["authOptions"] == {"mode": "token", "secretName": "msc-ray-auth-token"}, name
    text = (ROOT / "cluster" / "kuberay" / name).read_text()
    assert "optional: true" not in text  # no secret may be left out silently (API key, token)
    assert "kubectl create secret generic msc-ray-auth-token" in (ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text()


def test_kuberay_network_policy_keeps_the_dashboard_inside():
    pol = _kuberay("networkpolicy.yaml")
    assert pol["kind"] == "NetworkPolicy" and pol["apiVersion"] == "networking.k8s.io/v1"
    assert pol["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    for rule in pol["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if not rule.get("from"):  # open to every source: the Serve port only
            assert ports == {8000}, rule
        else:
            for src in rule["from"]:
                assert "ipBlock" not in src, rule  # sources are pods, never address ranges
                assert src.get("podSelector"), rule  # a namespace alone would admit all its pods


def test_aws_cluster_uses_token_auth_and_keeps_ray_ports_inside():
    cfg = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    setup = " ".join(cfg["setup_commands"])
    assert "msc-dist/ray-auth-token" in setup and "~/.ray/auth_token" in setup and "test -s ~/.ray/auth_token" in setup
    for rule in cfg["provider"]["security_group"]["IpPermissions"]:
        assert not (rule["FromPort"] <= 8265 <= rule["ToPort"] or rule["FromPort"] <= 6379 <= rule["ToPort"]
                    or rule["FromPort"] <= 10001 <= rule["ToPort"]), rule
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", [])), rule
    pol = json.loads((ROOT / "infra" / "iam-policy.json").read_text())
    secret = next(st for st in pol["Statement"] if st["Sid"] == "ReadRayAuthToken")
    assert secret["Action"] == ["secretsmanager:GetSecretValue"] and "msc-dist/ray-auth-token" in secret["Resource"][0]


def test_readme_says_how_to_submit_with_the_token():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Security", 1)[1].split("\n## ", 1)[0]
    assert "RAY_AUTH_TOKEN" in section and "ray job submit" in section and "allow_anonymous" in section
