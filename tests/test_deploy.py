"""The Kubernetes manifests parse and say what deploy/README.md promises: several replicas
on one PostgreSQL URL from a Secret, a shared volume, an autoscaler, a disruption budget,
and a Dask cluster whose scheduler is where campaigns look for it."""

from pathlib import Path

import yaml

KUBERNETES = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


def documents(name: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc}


def test_replicas_share_a_postgresql_store_from_a_secret_and_scale():
    docs = documents("forcedphot.yaml")
    deployment, pod = docs["Deployment"], docs["Deployment"]["spec"]["template"]
    assert deployment["spec"]["replicas"] > 1 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["FORCEDPHOT_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "forcedphot-database", "key": "url"}
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    labels = pod["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"] == labels == docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"] and 1 < hpa["minReplicas"] < hpa["maxReplicas"]
    assert {m["type"] for m in hpa["metrics"]} == {"Pods", "Resource"}
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "forcedphot_measurements_in_flight"
    assert "forcedphot_measurements_in_flight" in (Path(__file__).resolve().parents[1] / "service" / "api" / "metrics.py").read_text()


def test_campaigns_find_the_dask_scheduler_the_operator_makes():
    config = documents("forcedphot.yaml")["ConfigMap"]["data"]
    cluster = documents("dask-cluster.yaml")["DaskCluster"]
    service = f"{cluster['metadata']['name']}-scheduler"  # the operator's name for the scheduler Service
    assert config["FORCEDPHOT_DASK_SCHEDULER"] == f"tcp://{service}:8786"
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert worker["args"][:2] == ["dask", "worker"] and "1" == worker["args"][worker["args"].index("--nthreads") + 1]
    assert {m["mountPath"] for m in worker["volumeMounts"]} == {"/data", "/repository"}
