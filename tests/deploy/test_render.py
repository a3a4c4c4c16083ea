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
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.configio import load_config
from orchestrator.deploy_config import DeployConfig
from orchestrator.deploy_render import HEADER, render, to_yaml, write

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
    },
    "loadbalancer-minimal": {
        "mlflow": {"service_type": "LoadBalancer"},
        "cpu_workers": {"enabled": False},
        "create_namespace": False,
        "pod_security": "restricted",
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
    assert {"RayCluster", "RayJob"} <= kinds
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
    (svc,), _ = services({"mlflow": {"service_type": "LoadBalancer"}})
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
    assert sorted(kinds) == sorted(["Namespace", "PersistentVolumeClaim", "Deployment", "Service", "RayCluster"])


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
