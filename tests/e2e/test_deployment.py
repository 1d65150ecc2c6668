"""The replicas' deployment examples are what they say: the replica config
passes `portcullis check`, Debian's HAProxy accepts the balancer's config,
and the Kubernetes manifest validates against the API's schemas (with
kubernetes-validate, strictly), its ConfigMap holding a config and a lock
that parse."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from conftest import PORTCULLIS, ROOT

EXAMPLES = ROOT / "examples" / "replicas"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def test_the_replica_config_checks_with_its_environment():
    env = {**os.environ, "REPLICA": "replica-a", "REDIS_URL": "redis://127.0.0.1:6379/0",
           "APPROVALS_URL": "postgres://portcullis:s3cret@127.0.0.1:1/portcullis",
           "SESSION_KEY": "an-example-session-key-of-40-characters-x"}
    checked = subprocess.run([str(PORTCULLIS), "check", str(EXAMPLES / "replica.toml")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The store is named, its password hidden; that it cannot be reached
    # here is a warning, not a failure.
    [store] = [line for line in checked.stdout.splitlines() if line.startswith("approve")]
    assert "postgres://portcullis@127.0.0.1:1/portcullis" in store and "s3cret" not in checked.stdout
    assert "WARNING: cannot be read" in store


def test_haproxy_accepts_the_balancer_config():
    haproxy = shutil.which("haproxy")
    assert haproxy, "Debian's haproxy is not installed (scripts/setup installs it)"
    checked = subprocess.run([haproxy, "-c", "-f", str(EXAMPLES / "haproxy.cfg")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_kubernetes_manifest_validates_strictly_and_a_mistake_does_not(tmp_path: Path):
    manifest = EXAMPLES / "kubernetes" / "portcullis.yaml"
    validated = subprocess.run([str(VALIDATE), "--strict", "--quiet", str(manifest)], capture_output=True, text=True)
    assert validated.returncode == 0, validated.stdout + validated.stderr

    documents = list(yaml.safe_load_all(manifest.read_text()))
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "PodDisruptionBudget", "Secret", "Service", "Service"]
    [config_map] = [d for d in documents if d["kind"] == "ConfigMap"]
    config = tomllib.loads(config_map["data"]["portcullis.toml"])
    lock = json.loads(config_map["data"]["portcullis.lock.json"])
    assert config["state"]["replica"] == "${env:POD_NAME}" and lock["portcullis_lock"] == 1
    [deployment] = [d for d in documents if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config["serve"]["drain_secs"] + 5, "SIGTERM's drain and the preStop pause fit in the grace"

    mistaken = tmp_path / "mistaken.yaml"
    mistaken.write_text(manifest.read_text().replace("periodSeconds: 5", "periodSecond: 5"))
    refused = subprocess.run([str(VALIDATE), "--strict", "--quiet", str(mistaken)], capture_output=True, text=True)
    assert refused.returncode != 0 and "periodSecond" in refused.stdout + refused.stderr
