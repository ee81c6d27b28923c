"""The Kubernetes manifests (deploy/kubernetes): each overlay renders with kustomize (kubectl's, where kubectl is
installed), every Kubernetes object validates against the Kubernetes schemas (kubernetes-validate, offline, strict:
no unknown fields), the KEDA objects against KEDA's CRD schema (cloudcoil's models of it, generated from the
CRDs; a field the schema lacks is dropped by the model, which the check catches), and they agree with each other
and with what the server and the client actually do."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda

from client.app import DRAIN_TIMEOUT_S
from tools.localfarm import REPO

pytestmark = pytest.mark.integration

KUBE = REPO / "deploy" / "kubernetes"
#: The Kubernetes version the manifests are checked against (kubernetes-validate ships its schemas).
KUBERNETES_VERSION = "1.30.0"
KEDA_KINDS = {"ScaledObject": keda.ScaledObject, "TriggerAuthentication": keda.TriggerAuthentication}
KUBECTL = shutil.which("kubectl")


def render(kustomization: Path) -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed here: the overlays cannot be rendered")
    out = subprocess.run([KUBECTL, "kustomize", str(kustomization)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def validate(doc: dict[str, Any]) -> None:
    kind = doc["kind"]
    if kind in KEDA_KINDS:
        model = KEDA_KINDS[kind].model_validate(doc)
        kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert _dropped(doc, kept) == [], f"{kind} {doc['metadata']['name']}: fields KEDA's schema lacks"
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _dropped(given: Any, kept: Any, path: str = "") -> list[str]:
    """The paths in `given` that the model did not keep (unknown to the schema)."""
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [path]
        return [p for key, value in given.items()
                for p in ([f"{path}.{key}"] if key not in kept else _dropped(value, kept[key], f"{path}.{key}"))]
    if isinstance(given, list):
        return [p for i, (g, k) in enumerate(zip(given, kept, strict=True)) for p in _dropped(g, k, f"{path}[{i}]")]
    return []


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_each_overlay_renders_and_validates(overlay: str) -> None:
    docs = render(KUBE / "overlays" / overlay)
    for doc in docs:
        validate(doc)
    objects = by_kind(docs)
    assert set(objects) == {"Namespace", "Secret", "Service", "StatefulSet", "Deployment", "ScaledObject"}
    assert all(doc["metadata"].get("namespace") == "microfarm" for doc in docs if doc["kind"] != "Namespace")
    server, clients, scaled = objects["StatefulSet"], objects["Deployment"], objects["ScaledObject"]
    assert server["spec"]["replicas"] == 1 and server["spec"]["volumeClaimTemplates"]
    assert "replicas" not in clients["spec"], "KEDA owns the number of clients"
    pod = clients["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    service = objects["Service"]
    farm_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "farm")
    assert env["MICROFARM_SERVER"] == f"{service['metadata']['name']}:{farm_port}"
    # The grace period holds the drain and the last upload.
    assert float(env["MICROFARM_DRAIN_TIMEOUT"]) == DRAIN_TIMEOUT_S < pod["terminationGracePeriodSeconds"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == clients["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 0 and scaled["spec"]["maxReplicaCount"] > 0
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    names = set(re.findall(r"microfarm_\w+", trigger["metadata"]["query"]))
    assert names == {"microfarm_frames_pending", "microfarm_frames_leased", "microfarm_probes_pending"}
    resources = pod["containers"][0]["resources"]
    if overlay == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == "1" and env["MICROFARM_DEVICE"] == "auto"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert clients["spec"]["template"]["spec"]["containers"][0]["image"] == "microfarm-client:cuda"
    else:
        assert "nvidia.com/gpu" not in resources.get("limits", {}) and env["MICROFARM_DEVICE"] == "CPU"


def test_the_metrics_api_variant_renders_and_validates(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "microfarm",
        "resources": [os.path.relpath(KUBE / "base", tmp_path)],  # (kustomize takes relative paths only)
        "components": [os.path.relpath(KUBE / "components" / "keda-metrics-api", tmp_path)]}))
    docs = render(tmp_path)
    for doc in docs:
        validate(doc)
    objects = by_kind(docs)
    trigger = objects["ScaledObject"]["spec"]["triggers"][0]
    assert trigger["type"] == "metrics-api" and trigger["metadata"]["authMode"] == "bearer"
    assert trigger["metadata"]["url"].endswith(":9100/api/queue")
    assert trigger["metadata"]["valueLocation"] == "outstanding"
    auth = objects["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["secretTargetRef"][0]["name"] == objects["Secret"]["metadata"]["name"]


def test_every_manifest_file_validates_alone() -> None:
    """Without kubectl too: each object file of the base and the components, as written."""
    files = [p for p in sorted(KUBE.rglob("*.yaml")) if p.name != "kustomization.yaml" and "overlays" not in p.parts]
    assert len(files) >= 8
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            validate(doc)


def test_the_checks_catch_a_misspelt_field() -> None:
    scaled = yaml.safe_load((KUBE / "components" / "keda-prometheus" / "scaledobject.yaml").read_text())
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    with pytest.raises(AssertionError, match="fields KEDA's schema lacks"):
        validate(scaled)
    deployment = yaml.safe_load((KUBE / "base" / "client-deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
