"""Rendered Kubernetes manifests: schema-valid (KubeRay CRDs, Kubernetes core), secure, consistent.

KubeRay objects are checked against the v1 ``openAPIV3Schema`` of the CRDs in ``../shared/kuberay-crds``
made strict (``additionalProperties: false`` wherever the schema does not preserve unknown fields);
core objects with ``kubernetes-validate`` in strict mode for a pinned Kubernetes version.
"""

from __future__ import annotations

import copy
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.configio import load_config
from orchestrator.deploy_config import DeployConfig, NetworkPeer
from orchestrator.deploy_render import DASHBOARD_PORT, HEADER, render, to_yaml, write

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
DEFAULT_CONFIG = REPO / "configs" / "deploy" / "default.yaml"
COMMITTED = REPO / "deploy" / "manifests"
K8S_VERSION = "1.32.0"  # pinned: a version kubernetes-validate ships a strict schema for
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}

#: Variants that exercise every optional branch of the renderer.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "postgres-ingress": {
        "mlflow": {
            "backend": "postgresql",
            "ingress": {"host": "mlflow.example.org", "class_name": "nginx", "tls_secret": "mlflow-tls"},
        },
        "image": {"pull_secret": "regcred"},
        "storage": {"storage_class": "nfs-rwx", "size": "2Ti"},
        "gpu_workers": {"gpus_per_pod": 8, "gpu_product": "NVIDIA-H200", "min_replicas": 1, "max_replicas": 2},
        "jobs": {"active_deadline_seconds": 86400, "pretrain_methods": ["dino"], "pretrain_workers": 16},
        "env": {"NCCL_DEBUG": "WARN"},
        "network_policies": {
            "dashboard_namespaces": ["ml-notebooks", "ci"],
            "mlflow_from": [
                {"namespace": "ingress-nginx", "pod_labels": {"app.kubernetes.io/name": "ingress-nginx"}},
                {"pod_labels": {"app": "tensorboard"}},
                {"namespace": "ml-notebooks"},
            ],
        },
    },
    "loadbalancer-minimal": {
        "mlflow": {"service_type": "LoadBalancer", "port": 8080},
        "cpu_workers": {"enabled": False},
        "create_namespace": False,
        "pod_security": "restricted",
        "network_policies": {
            "mlflow_from": [{"cidr": "10.0.0.0/8"}],
            "kuberay_operator": {"namespace": "kuberay-system", "pod_labels": {"app": "kuberay"}},
        },
    },
    "spot-elastic": {
        "gpu_workers": {
            "min_replicas": 1, "max_replicas": 4, "termination_grace_period_s": 90,
            "node_selector": {"cloud.google.com/gke-spot": "true"},
            "tolerations": [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
                            {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Exists"}],
        },
        "jobs": {"elastic": True},
    },
    "external-mlflow-existing-pvc": {
        "mlflow": {"deploy": False, "tracking_uri": "https://mlflow.example.org"},
        "storage": {"create": False, "claim_name": "team-share"},
    },
}


# ------------------------------------------------------------------------------------- helpers


def _strict(node: Any) -> Any:
    """Copy of an OpenAPI schema with unknown keys rejected wherever unknown fields are not preserved."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    if (
        "properties" in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (needs the workspace's ../shared folder)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    validators = {}
    for kind, file_name in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / file_name).read_text(), Loader=loader)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        validators[kind] = jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return validators


def _rendered(overrides: dict[str, Any]) -> list[dict[str, Any]]:
    config = DeployConfig.model_validate(overrides)
    return [obj for objects in render(config).values() for obj in objects]


def _pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec inside a manifest, with a label saying where it is."""
    kind = obj["kind"]
    if kind not in ("Deployment", "RayCluster", "RayJob"):
        return
    if kind == "Deployment":
        yield "template", obj["spec"]["template"]["spec"]
    cluster = obj["spec"] if kind == "RayCluster" else obj["spec"].get("rayClusterSpec") if kind == "RayJob" else None
    if cluster:
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster["workerGroupSpecs"]:
            yield group["groupName"], group["template"]["spec"]
    if kind == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        yield "submitter", obj["spec"]["submitterPodTemplate"]["spec"]


def _containers(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, spec in _pod_specs(obj):
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield f"{obj['kind']}/{obj['metadata']['name']}/{where}/{container['name']}", container
    if obj["kind"] not in ("RayCluster", "RayJob"):
        return
    cluster = obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"].get("rayClusterSpec")
    if cluster and cluster.get("enableInTreeAutoscaling"):
        # The operator injects the autoscaler sidecar from these options.
        yield f"{obj['kind']}/{obj['metadata']['name']}/autoscaler", cluster["autoscalerOptions"]


def _walk_keys(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk_keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_keys(item)


# ------------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_validates_against_its_schema(variant: str, crd_validators) -> None:
    objects = _rendered(VARIANTS[variant])
    kinds = {obj["kind"] for obj in objects}
    assert {"RayCluster", "RayJob", "NetworkPolicy"} <= kinds
    for obj in objects:
        # Round-trip through the YAML text users apply.
        obj = yaml.safe_load(to_yaml([obj]))
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in crd_validators:
            errors = sorted(crd_validators[obj["kind"]].iter_errors(obj), key=lambda e: list(e.path))
            assert not errors, f"{name}: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message[:200]}" for e in errors[:5]
            )
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_crd_schema_rejects_a_misspelt_key(crd_validators) -> None:
    job = next(obj for obj in _rendered({}) if obj["kind"] == "RayJob")
    assert crd_validators["RayJob"].is_valid(job)
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
    assert not crd_validators["RayJob"].is_valid(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    assert not crd_validators["RayJob"].is_valid(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["backoffLimit"] = "two"
    assert not crd_validators["RayJob"].is_valid(bad)


def test_strict_core_validation_rejects_a_misspelt_key() -> None:
    service = next(obj for obj in _rendered({}) if obj["kind"] == "Service")
    kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    bad = copy.deepcopy(service)
    bad["spec"]["selectr"] = bad["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    policy = next(obj for obj in _rendered({}) if obj["kind"] == "NetworkPolicy" and "ingress" in obj["spec"])
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    bad = copy.deepcopy(policy)
    bad["spec"]["ingress"][0]["form"] = bad["spec"]["ingress"][0].pop("from")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# ----------------------------------------------------------------------------------- security


@pytest.mark.parametrize("variant", VARIANTS)
def test_security_rules_hold_for_every_container(variant: str) -> None:
    objects = _rendered(VARIANTS[variant])
    seen = 0
    for obj in objects:
        for where, spec in _pod_specs(obj):
            pod_ctx = spec["securityContext"]
            assert pod_ctx["runAsNonRoot"] is True and pod_ctx["runAsUser"] != 0, where
            assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        for where, container in _containers(obj):
            seen += 1
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True and ctx.get("runAsUser", 1000) != 0, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx.get("privileged", False) is False, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert "add" not in ctx["capabilities"], where
            limits = container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(limits), f"{where}: missing limits"
            assert container["resources"]["requests"] == limits, f"{where}: requests must equal limits"
            image = container.get("image")
            if image is not None:
                assert not image.endswith(":latest") and ":" in image.rsplit("/", 1)[-1], where
            for env in container.get("env", []):
                name = env["name"].upper()
                if any(word in name for word in ("PASSWORD", "SECRET", "TOKEN", "BACKEND_STORE_URI")):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{where}: {name}"
        for key, _ in _walk_keys(obj):
            assert key != "hostPath", f"{obj['kind']}: host paths are not allowed"
        assert obj["kind"] != "Secret", "credentials are referenced, never rendered"
    assert seen >= 5


def test_mlflow_is_internal_by_default_and_exposed_only_on_request() -> None:
    def services(overrides):
        objects = _rendered(overrides)
        return [o for o in objects if o["kind"] == "Service"], [o for o in objects if o["kind"] == "Ingress"]

    (svc,), ingresses = services({})
    assert svc["spec"]["type"] == "ClusterIP" and not ingresses
    (svc,), _ = services(VARIANTS["loadbalancer-minimal"])
    assert svc["spec"]["type"] == "LoadBalancer"
    _, (ingress,) = services(VARIANTS["postgres-ingress"])
    assert ingress["spec"]["rules"][0]["host"] == "mlflow.example.org"
    assert ingress["spec"]["tls"][0]["secretName"] == "mlflow-tls"


def test_postgres_uri_comes_from_a_secret_reference() -> None:
    objects = _rendered(VARIANTS["postgres-ingress"])
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (env,) = [e for e in container["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "sspctl-mlflow-db", "key": "uri"}
    assert not any("postgresql://" in str(arg) for arg in container["command"])
    assert "--serve-artifacts" in container["command"]
    # The host header the in-cluster clients send must be accepted.
    hosts = container["command"][container["command"].index("--allowed-hosts") + 1].split(",")
    assert "sspctl-mlflow.sspctl.svc.cluster.local:*" in hosts and "mlflow.example.org" in hosts


# ----------------------------------------------------------------------------- network policies


@dataclass(frozen=True)
class _Pod:
    """A pod as the cluster would run it: namespace, final labels, and what it is (for expectations)."""

    name: str
    namespace: str
    labels: dict[str, str] = field(hash=False)
    #: ray | submitter | mlflow (ours); operator | dashboard-user | mlflow-client (configured); none: a stranger
    roles: frozenset[str] = frozenset()
    cluster: str = ""  # KubeRay's ray.io/cluster of a Ray pod (a RayJob's cluster name is random)
    head: bool = False


def _kuberay_pod_labels(template: dict[str, str], cluster: str, node_type: str, group: str) -> dict[str, str]:
    """The labels KubeRay v1.7 puts on a Ray pod (``labelPod``): its own, overridden by the template's."""
    labels = {
        "ray.io/is-ray-node": "yes",
        "ray.io/cluster": cluster,
        "ray.io/node-type": node_type,
        "ray.io/group": group,
        "ray.io/identifier": f"{cluster}-{node_type}",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    fixed = ("ray.io/node-type", "ray.io/group", "ray.io/cluster")
    labels.update({key: value for key, value in template.items() if key not in fixed})
    return labels


def _ray_pods(cluster_spec: dict[str, Any], cluster: str, namespace: str) -> list[_Pod]:
    ray = frozenset({"ray"})
    head = cluster_spec["headGroupSpec"]["template"]["metadata"]["labels"]
    head_labels = _kuberay_pod_labels(head, cluster, "head", "headgroup")
    pods = [_Pod(f"{cluster}-head", namespace, head_labels, ray, cluster, head=True)]
    for group in cluster_spec["workerGroupSpecs"]:
        labels = _kuberay_pod_labels(group["template"]["metadata"]["labels"], cluster, "worker", group["groupName"])
        pods.append(_Pod(f"{cluster}-{group['groupName']}-worker", namespace, labels, ray, cluster))
    return pods


def _deployment_pods(objects: list[dict[str, Any]]) -> list[_Pod]:
    """Every pod the rendered objects make once applied (Ray pods, job submitters, MLflow)."""
    pods: list[_Pod] = []
    for obj in objects:
        namespace, name = obj["metadata"].get("namespace", ""), obj["metadata"]["name"]
        if obj["kind"] == "Deployment":
            labels = dict(obj["spec"]["template"]["metadata"]["labels"])
            pods.append(_Pod(f"{name}-pod", namespace, labels, frozenset({"mlflow"})))
        elif obj["kind"] == "RayCluster":
            pods += _ray_pods(obj["spec"], name, namespace)
        elif obj["kind"] == "RayJob":
            cluster = f"{name}-x7k2p"  # KubeRay: GenerateRayClusterName = <rayjob>-<5 random characters>
            pods += _ray_pods(obj["spec"]["rayClusterSpec"], cluster, namespace)
            labels = dict(obj["spec"]["submitterPodTemplate"]["metadata"]["labels"])
            labels.update({"batch.kubernetes.io/job-name": name, "job-name": name})  # the Job controller's
            pods.append(_Pod(f"{name}-submitter", namespace, labels, frozenset({"submitter"}), cluster))
    return pods


def _outside_pods(config: DeployConfig) -> list[_Pod]:
    """Pods that are not the deployment's: the operator, configured clients, and strangers.

    Their roles come from the config (where a pod lives, which labels it has), independently of the
    rendered selectors.
    """
    np = config.network_policies

    def member(peer: NetworkPeer, namespace: str, labels: dict[str, str]) -> bool:
        wanted = (peer.pod_labels or {}).items()
        return peer.cidr is None and namespace == (peer.namespace or config.namespace) and wanted <= labels.items()

    def pod(name: str, namespace: str, labels: dict[str, str]) -> _Pod:
        roles = {"operator"} if member(np.kuberay_operator, namespace, labels) else set()
        if namespace in np.dashboard_namespaces:
            roles.add("dashboard-user")
        if any(member(peer, namespace, labels) for peer in np.mlflow_from):
            roles.add("mlflow-client")
        return _Pod(name, namespace, labels, frozenset(roles))

    operator = np.kuberay_operator
    ours = {"app.kubernetes.io/name": "sspctl", "app.kubernetes.io/instance": config.name}
    pods = [
        pod("kuberay-operator", operator.namespace or config.namespace, dict(operator.pod_labels or {})),
        pod("notebook", config.namespace, {"app": "notebook"}),
        pod("debug", config.namespace, {**ours, "app.kubernetes.io/component": "debug"}),  # our labels, not Ray
        pod("other", "default", {"app": "other"}),
        pod("fake-operator", "elsewhere", {"app.kubernetes.io/name": "kuberay-operator", "app": "kuberay"}),
    ]
    pods += [pod(f"user-{ns}", ns, {"app": "notebook"}) for ns in np.dashboard_namespaces]
    for i, peer in enumerate(np.mlflow_from):
        if peer.cidr is None:
            pods.append(pod(f"mlflow-client-{i}", peer.namespace or config.namespace, dict(peer.pod_labels or {})))
    return pods


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND every matchExpression)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _allowed(policies: list[dict[str, Any]], src: _Pod, dst: _Pod, port: int) -> bool:
    """Whether NetworkPolicies let ``src`` open a TCP connection to ``dst:port`` (pod-to-pod only)."""
    selecting = [
        p for p in policies
        if p["metadata"]["namespace"] == dst.namespace
        and "Ingress" in p["spec"]["policyTypes"]
        and _selects(p["spec"]["podSelector"], dst.labels)
    ]  # fmt: skip
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in ports):
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                if "ipBlock" in peer:
                    continue
                if "namespaceSelector" in peer:
                    ns_ok = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": src.namespace})
                else:
                    ns_ok = src.namespace == policy["metadata"]["namespace"]
                if ns_ok and _selects(peer.get("podSelector", {}), src.labels):
                    return True
    return False


def _expected(config: DeployConfig, src: _Pod, dst: _Pod, port: int) -> bool:
    """What the policies are meant to allow, stated from what the pods are, not from their labels."""
    if "ray" in dst.roles and "ray" in src.roles and src.cluster == dst.cluster:
        return True  # one Ray cluster: every port
    if "ray" in dst.roles and dst.head and port == DASHBOARD_PORT:
        return bool(src.roles & {"ray", "submitter", "operator", "dashboard-user"})
    if "mlflow" in dst.roles and port == config.mlflow.port:
        return bool(src.roles & {"ray", "mlflow-client"})
    return False


def _policy_mismatches(config: DeployConfig, objects: list[dict[str, Any]]) -> list[str]:
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    ours = _deployment_pods(objects)
    everyone = ours + _outside_pods(config)
    ports = sorted({6379, 10001, DASHBOARD_PORT, config.mlflow.port, 23456})
    wrong = []
    for dst in ours:
        for src in everyone:
            for port in ports:
                allowed, expected = _allowed(policies, src, dst, port), _expected(config, src, dst, port)
                if allowed != expected:
                    wrong.append(f"{src.name} -> {dst.name}:{port} {'allowed' if allowed else 'denied'}")
    return wrong


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policies_allow_exactly_the_intended_traffic(variant: str) -> None:
    config = DeployConfig.model_validate(VARIANTS[variant])
    objects = _rendered(VARIANTS[variant])
    pods = _deployment_pods(objects)
    assert {role for pod in pods for role in pod.roles} >= {"ray", "submitter"}
    assert len({pod.cluster for pod in pods if "ray" in pod.roles}) == 1 + len(config.jobs.pretrain_methods) + 2
    wrong = _policy_mismatches(config, objects)
    assert not wrong, f"{len(wrong)} unexpected: " + "; ".join(wrong[:8])
    # every pod of the deployment is under the default deny (not only those an allow rule selects)
    (deny,) = [o for o in objects if o["kind"] == "NetworkPolicy" and "ingress" not in o["spec"]]
    assert deny["spec"]["policyTypes"] == ["Ingress"]
    assert all(_selects(deny["spec"]["podSelector"], pod.labels) for pod in pods)
    assert not any(_selects(deny["spec"]["podSelector"], pod.labels) for pod in _outside_pods(config)[:1])


@pytest.mark.parametrize(
    ("path", "label", "value"),
    [
        (("spec", "headGroupSpec"), "app.kubernetes.io/component", "head"),
        (("spec", "workerGroupSpecs", 0), "sspctl/ray-cluster", "other"),
        (("spec", "workerGroupSpecs", 1), "app.kubernetes.io/instance", "renamed"),
    ],
)
def test_network_policy_check_notices_a_changed_pod_label(path: tuple[Any, ...], label: str, value: str) -> None:
    config = DeployConfig()
    objects = copy.deepcopy(_rendered({}))
    node: Any = next(obj for obj in objects if obj["kind"] == "RayCluster")
    for key in path:
        node = node[key]
    node["template"]["metadata"]["labels"][label] = value
    assert _policy_mismatches(config, objects)


def test_network_policies_render_only_when_enabled_and_mlflow_exposure_needs_a_source() -> None:
    files = render(DeployConfig())
    kinds = {obj["kind"] for obj in files["03-network-policies.yaml"]}
    assert kinds == {"NetworkPolicy"} and len(files["03-network-policies.yaml"]) == 10
    off = render(DeployConfig.model_validate({"network_policies": {"enabled": False}}))
    assert "03-network-policies.yaml" not in off
    assert not any(obj["kind"] == "NetworkPolicy" for objects in off.values() for obj in objects)
    with pytest.raises(ValueError, match="network_policies.mlflow_from"):
        DeployConfig.model_validate({"mlflow": {"ingress": {"host": "mlflow.example.org"}}})
    DeployConfig.model_validate(
        {"mlflow": {"service_type": "LoadBalancer"}, "network_policies": {"enabled": False}}
    )
    external = render(DeployConfig.model_validate(VARIANTS["external-mlflow-existing-pvc"]))
    assert not any("mlflow" in o["metadata"]["name"] for o in external["03-network-policies.yaml"])


# --------------------------------------------------------------------------- cluster contents


@pytest.mark.parametrize("variant", ["default", "postgres-ingress"])
def test_ray_pods_share_the_volume_shm_and_environment(variant: str) -> None:
    config = DeployConfig.model_validate(VARIANTS[variant])
    objects = _rendered(VARIANTS[variant])
    mount = config.storage.mount_path
    for obj in objects:
        if obj["kind"] not in ("RayCluster", "RayJob", "Deployment"):
            continue
        for where, spec in _pod_specs(obj):
            if where == "submitter":
                continue
            (claim,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
            assert claim["persistentVolumeClaim"]["claimName"] == config.storage.claim_name
            container = spec["containers"][0]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts[mount] == claim["name"], f"{where}: volume not at {mount}"
            if obj["kind"] == "Deployment":
                continue
            shm = next(v for v in spec["volumes"] if v["name"] == mounts["/dev/shm"])
            assert shm["emptyDir"]["medium"] == "Memory"
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["SSPCTL_HOME"] == f"{mount}/runs"
            assert env["MLFLOW_TRACKING_URI"] == config.tracking_uri


def test_gpu_group_autoscales_with_gpu_limits_and_cpu_head() -> None:
    config = DeployConfig.model_validate(VARIANTS["postgres-ingress"])
    (cluster,) = [o for o in _rendered(VARIANTS["postgres-ingress"]) if o["kind"] == "RayCluster"]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert (gpu["minReplicas"], gpu["maxReplicas"], gpu["replicas"]) == (1, 2, 1)
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 8 and limits["cpu"] == config.gpu_workers.cpu
    assert gpu["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}


def test_spot_group_tolerates_its_pool_gets_a_grace_period_and_jobs_follow_its_range() -> None:
    (cluster,) = [o for o in _rendered(VARIANTS["spot-elastic"]) if o["kind"] == "RayCluster"]
    (gpu,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    pod = gpu["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
        {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Exists"},
    ]
    assert pod["terminationGracePeriodSeconds"] == 90
    assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == [
        "python", "-m", "trainers.preemption", "--grace", "80"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 4)
    jobs = render(DeployConfig.model_validate(VARIANTS["spot-elastic"]))
    entry = jobs["jobs/pretrain-dino.yaml"][0]["spec"]["entrypoint"]
    assert "--workers 1-4 " in entry  # the elastic range is the group's replicas x GPUs per pod
    # the default (on-demand) group keeps a fixed count and gets the default grace period
    (default,) = [o for o in _rendered({}) if o["kind"] == "RayCluster"]
    (gpu,) = [g for g in default["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["template"]["spec"]["terminationGracePeriodSeconds"] == 60 and "nodeSelector" not in gpu["template"]["spec"]


def test_rayjobs_cover_the_pipeline_and_resume_by_rerun() -> None:
    files = render(DeployConfig())
    jobs = {name: objs[0] for name, objs in files.items() if name.startswith("jobs/")}
    assert set(jobs) == {
        "jobs/ingest.yaml", "jobs/study.yaml",
        *(f"jobs/pretrain-{m}.yaml" for m in ("simclr", "pcl", "dino", "mim")),
    }  # fmt: skip
    dino = jobs["jobs/pretrain-dino.yaml"]["spec"]["entrypoint"]
    assert dino.startswith("sspctl pretrain --method dino --workers 4 --gpus-per-worker 1 --cpus-per-worker 8 ")
    assert "--store /mnt/sspctl/data/mnms.zarr" in dino and "{" not in dino
    assert jobs["jobs/ingest.yaml"]["spec"]["entrypoint"].startswith("bash -c 'sspctl ingest ")
    assert jobs["jobs/study.yaml"]["spec"]["entrypoint"].startswith("sspctl study")
    for job in jobs.values():
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 2
        assert spec["ttlSecondsAfterFinished"] == 3600
        assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
        assert len(job["metadata"]["name"]) <= 47


@pytest.mark.parametrize(
    "command",
    [
        "sspctl pretrain --method dino --workers 4 --store /mnt/sspctl/data/mnms.zarr",
        "sspctl ingest --store /mnt/s.zarr && sspctl splits make --store /mnt/s.zarr --out /mnt/split.yaml",
        "sspctl study --store /mnt/s.zarr; sspctl report --study x > /mnt/report.txt",
    ],
)
def test_entrypoint_survives_kuberay_submitter_quoting(command: str) -> None:
    from subprocess import list2cmdline

    from orchestrator.deploy_render import entrypoint

    rendered = entrypoint(command)
    # KubeRay v1.7 (K8sJobMode): bash -c "... ray job submit --address URL -- <entrypoint> ; fi"
    submitter_argv = shlex.split(f"ray job submit --address http://head:8265 -- {rendered}")
    submitted = submitter_argv[submitter_argv.index("--") + 1 :]
    # `ray job submit` joins its trailing arguments with subprocess.list2cmdline; the head runs it in a shell.
    head_argv = shlex.split(list2cmdline(submitted))
    if "&" in command or ";" in command:
        assert head_argv == ["bash", "-c", command]
    else:
        assert head_argv == shlex.split(command)
    # The Job Submission API path (sspctl submit) hands the same string to the head's shell.
    assert shlex.split(rendered) == head_argv


# ------------------------------------------------------------------------ config and commands


def test_default_config_file_equals_the_model_defaults() -> None:
    assert load_config(DeployConfig, DEFAULT_CONFIG) == DeployConfig()


def test_committed_manifests_equal_a_fresh_render(tmp_path: Path) -> None:
    write(load_config(DeployConfig, DEFAULT_CONFIG), tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in sorted(tmp_path.rglob("*.yaml"))}
    committed = {p.relative_to(COMMITTED): p.read_text() for p in sorted(COMMITTED.rglob("*.yaml"))}
    assert sorted(committed) == sorted(fresh), "re-run: sspctl deploy render --config configs/deploy/default.yaml"
    for name, text in fresh.items():
        assert committed[name] == text, f"deploy/manifests/{name} is stale: re-render it"


def test_render_command_writes_manifests_and_removes_stale_ones(tmp_path: Path) -> None:
    stale = tmp_path / "jobs" / "pretrain-old.yaml"
    stale.parent.mkdir(parents=True)
    stale.write_text(HEADER + "kind: RayJob\n")
    mine = tmp_path / "notes.yaml"
    mine.write_text("user: file\n")
    result = CliRunner().invoke(app, ["deploy", "render", "--config", str(DEFAULT_CONFIG), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "10-raycluster.yaml").is_file() and (tmp_path / "jobs" / "study.yaml").is_file()
    assert not stale.exists() and mine.exists()
    kustomization = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    assert "10-raycluster.yaml" in kustomization["resources"]
    assert not any(r.startswith("jobs/") for r in kustomization["resources"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomization_builds_offline() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(COMMITTED)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(out.stdout)]
    expected = ["Namespace", "PersistentVolumeClaim", "Deployment", "Service", "RayCluster"] + ["NetworkPolicy"] * 10
    assert sorted(kinds) == sorted(expected)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("gpu_workers:\n  gpus: 4\n", "gpu_workers.gpus: unknown key"),
        ("gpu_workers:\n  min_replicas: 5\n  max_replicas: 2\n", "min_replicas (5) > max_replicas (2)"),
        ("storage:\n  size: lots\n", "storage.size"),
        ("image:\n  tag: latest\n", "image.tag"),
        ("env:\n  DB_PASSWORD: hunter2\n", "credential"),
        ("jobs:\n  pretrain_workers: 64\n", "exceeds the GPU group's capacity"),
        ("jobs:\n  study: sspctl study --gpus {gpus}\n", "jobs.study: Value error, only {mount_path}"),
        ("gpu_workers:\n  cpu: 8Gi\n", "gpu_workers.cpu"),
        ("jobs:\n  study: sspctl study --out $HOME\n", "not allowed in a job command"),
        ("mlflow:\n  deploy: false\n", "set tracking_uri"),
        ("mlflow:\n  service_type: LoadBalancer\n", "network_policies.mlflow_from"),
        ("network_policies:\n  mlflow_from: [{cidr: 10.0.0.0/8, namespace: x}]\n", "cannot be combined"),
        ("network_policies:\n  mlflow_from: [{cidr: 10.0.0.1/8}]\n", "not a CIDR range"),
        ("network_policies:\n  mlflow_from: [{}]\n", "set namespace, pod_labels"),
        ("network_policies:\n  mlflow_from: [{pod_labels: {'a b': c}}]\n", "not a valid label key"),
        ("network_policies:\n  dashboard_namespaces: [Team_A]\n", "not a valid namespace name"),
        ("network_policies:\n  allow_all: true\n", "network_policies.allow_all: unknown key"),
    ],
)
def test_bad_config_gives_one_line_error(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    result = CliRunner().invoke(app, ["deploy", "render", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], result.output
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["deploy", "render", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code != 0 and "config file not found" in result.output


# --------------------------------------------------------------------------------------- images


def _stages(dockerfile: Path) -> list[list[str]]:
    """Instructions of each build stage (continuation lines joined)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_images_are_multistage_non_root_and_pin_torch(name: str) -> None:
    dockerfile = REPO / "deploy" / "docker" / name
    text = dockerfile.read_text()
    stages = _stages(dockerfile)
    assert len(stages) >= 2, "multi-stage build expected"
    final = stages[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    assert all("build-essential" not in line and "gcc" not in line for line in final), "build tools in final image"
    assert not any(line.upper().startswith(("ARG ", "ENV ")) and "TOKEN" in line.upper() for line in final)
    assert "COPY --from=build" in "\n".join(final)
    assert "wget" in "\n".join(final)  # KubeRay probes need it
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch>=2.13,<2.14"' in pyproject, "update the images together with the torch pin"
    installs = [
        part.strip()
        for line in text.replace("\\\n", " ").splitlines()
        for part in line.split("&&")
        if "pip install" in part
    ]
    assert any("/src" in part for part in installs), "the image must install sspctl"
    for part in installs:
        if "/src" in part:  # the project depends on torch: pip must keep the pinned one
            assert "--constraint" in part, f"project installed without the torch constraint: {part}"
        elif "torch" in part:
            assert "torch==" in part, f"unpinned torch install: {part}"
    if name == "Dockerfile":
        (base,) = [line for line in text.splitlines() if line.startswith("ARG BASE_IMAGE=")]
        assert base.split("=", 1)[1].startswith("pytorch/pytorch:2.13.") and "cuda" in base
    else:
        assert "ARG TORCH_VERSION=2.13.0" in text and "download.pytorch.org/whl/cpu" in text
