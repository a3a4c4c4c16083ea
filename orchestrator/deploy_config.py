"""``DeployConfig``: the one config from which every Kubernetes manifest of a deployment is rendered.

Users change values here (image, namespace, GPU count and type, worker min/max, storage class and
size, MLflow URL, job commands); ``orchestrator/deploy_render.py`` turns them into KubeRay and core
Kubernetes objects. Quantities (``cpu``, ``memory``, sizes) use Kubernetes notation (``"8"``,
``"500m"``, ``"64Gi"``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainers.methods.names import METHOD_NAMES, MethodName

#: Kubernetes quantity: a number with an optional decimal/binary suffix ("8", "500m", "64Gi", "1.5").
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
#: DNS-1035 label (names of RayClusters, RayJobs, Services must be one).
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
#: DNS-1123 subdomain (names of Secrets, PVCs, namespaces, StorageClasses).
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: Name part of a label key and a non-empty label value (at most 63 characters each).
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")

PretrainMethod = MethodName
#: Placeholders a job command may use (with sample values for validation).
PLACEHOLDERS = {"mount_path": "/mnt", "workers": 1, "cpus_per_worker": 1, "method": "simclr"}


def _quantity(value: str) -> str:
    if not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. '8', '500m', '64Gi')")
    return value


def _cpu(value: str) -> str:
    if not re.match(r"^[0-9]+(\.[0-9]+)?m?$", value) or float(value.rstrip("m")) <= 0:
        raise ValueError(f"{value!r} is not a CPU amount (cores like '8' or millicores like '500m')")
    return value


def _dns1123(value: str) -> str:
    if len(value) > 253 or not _DNS1123.match(value):
        raise ValueError(f"{value!r} is not a valid Kubernetes name (lower-case letters, digits, '-', '.')")
    return value


def _labels(value: dict[str, str]) -> dict[str, str]:
    """Check Kubernetes label keys (``[prefix/]name``) and values."""
    for key, label in value.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS1123.match(prefix))) or not _LABEL_NAME.match(name):
            raise ValueError(f"{key!r} is not a valid label key")
        if label and not _LABEL_NAME.match(label):
            raise ValueError(f"{label!r} (label {key}) is not a valid label value")
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageConfig(_Frozen):
    """The container image every pod runs (built from ``deploy/docker/Dockerfile``)."""

    repository: str = Field("ghcr.io/example/sspctl", description="Registry and repository, no tag.")
    tag: str = Field("0.1.0-cuda", description="Image tag; pin it (never 'latest').")
    pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    pull_secret: str | None = Field(None, description="Name of a docker-registry Secret, if private.")

    @field_validator("tag")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if value == "latest" or not value:
            raise ValueError("pin the image tag; 'latest' makes runs irreproducible")
        return value

    @field_validator("pull_secret")
    @classmethod
    def _secret_name(cls, value: str | None) -> str | None:
        return None if value is None else _dns1123(value)

    @property
    def ref(self) -> str:
        """``repository:tag``."""
        return f"{self.repository}:{self.tag}"


class StorageConfig(_Frozen):
    """The shared read-write-many volume: Zarr store, checkpoints, run state, MLflow data."""

    claim_name: str = Field("sspctl-data", description="PersistentVolumeClaim name.")
    create: bool = Field(True, description="Render the PVC; false to use an existing claim.")
    storage_class: str | None = Field(
        None, description="StorageClass of an RWX provisioner (NFS, EFS, Filestore, CephFS); None = cluster default."
    )
    size: str = Field("500Gi", description="Requested capacity.")
    mount_path: str = Field("/mnt/sspctl", description="Where every pod mounts the volume (same path everywhere).")
    home_subdir: str = Field("runs", description="SSPCTL_HOME = mount_path/home_subdir (run state, checkpoints).")

    _v_size = field_validator("size")(classmethod(lambda cls, v: _quantity(v)))
    _v_claim = field_validator("claim_name")(classmethod(lambda cls, v: _dns1123(v)))

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or value.rstrip("/") in ("", "/dev", "/proc", "/sys", "/tmp"):
            raise ValueError(f"{value!r} must be an absolute path outside /dev, /proc, /sys, /tmp")
        if not re.fullmatch(r"/[A-Za-z0-9._/-]+", value):
            # it is pasted into the RayJob shell lines: no spaces, quotes or shell syntax
            raise ValueError(f"{value!r} may only contain letters, digits, '.', '_', '-' and '/'")
        return value.rstrip("/")

    @field_validator("home_subdir")
    @classmethod
    def _relative(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/") or not value.strip("/"):
            raise ValueError(f"{value!r} must be a relative path inside the volume")
        return value.strip("/")

    @property
    def home(self) -> str:
        """``SSPCTL_HOME`` inside the pods."""
        return f"{self.mount_path}/{self.home_subdir}"


class HeadConfig(_Frozen):
    """The Ray head pod (CPU only): GCS, dashboard, job drivers, Tune trial functions."""

    cpu: str = "4"
    memory: str = "16Gi"
    ray_cpus: int = Field(
        2, ge=0, description="Logical CPUs the head offers to Ray (job drivers, Tune trials); 0 keeps work off it."
    )

    _v_q = field_validator("memory")(classmethod(lambda cls, v: _quantity(v)))
    _v_c = field_validator("cpu")(classmethod(lambda cls, v: _cpu(v)))


class Toleration(_Frozen):
    """A pod toleration (e.g. of a spot/preemptible node pool's taint)."""

    key: str | None = Field(None, description="Taint key; None with operator Exists tolerates every taint.")
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    @model_validator(mode="after")
    def _value(self) -> "Toleration":
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.operator == "Equal" and self.key is None:
            raise ValueError("a toleration with operator Equal needs a key")
        return self

    def manifest(self) -> dict[str, str]:
        """The Kubernetes ``Toleration`` object."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class GpuWorkerConfig(_Frozen):
    """The autoscaling GPU worker group (one Ray Train worker per GPU).

    On spot/preemptible GPU nodes: ``node_selector`` picks the pool, ``tolerations`` tolerate its
    taint, ``termination_grace_period_s`` gives a preempted worker time to checkpoint (the pod's
    ``preStop`` hook SIGTERMs the Ray Train workers, which checkpoint at their next step), and
    ``jobs.elastic`` makes the pretrain jobs' worker range follow ``min_replicas``-``max_replicas``.
    """

    gpus_per_pod: int = Field(1, ge=1, le=16, description="nvidia.com/gpu per worker pod.")
    gpu_product: str | None = Field(
        None, description="Node label nvidia.com/gpu.product to pin a GPU type (e.g. NVIDIA-H100-80GB-HBM3)."
    )
    cpu: str = Field("8", description="CPU per pod: DataLoader workers and batched augmentation need cores.")
    memory: str = "64Gi"
    shm_size: str = Field("16Gi", description="/dev/shm (memory-backed; counts against the memory limit).")
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(4, ge=1)
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the GPU pods must match (e.g. cloud.google.com/gke-spot: 'true')."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Extra tolerations, e.g. of a spot pool's taint (nvidia.com/gpu is always tolerated)."
    )
    termination_grace_period_s: int = Field(
        60, ge=1, le=3600,
        description="Pod terminationGracePeriodSeconds: time a preempted worker gets to write its checkpoint.",
    )

    _v_q = field_validator("memory", "shm_size")(classmethod(lambda cls, v: _quantity(v)))
    _v_c = field_validator("cpu")(classmethod(lambda cls, v: _cpu(v)))
    _v_l = field_validator("node_selector")(classmethod(lambda cls, v: _labels(v)))

    @property
    def checkpoint_grace_s(self) -> int:
        """Seconds the preStop hook waits for the workers' checkpoint (the pod's grace minus 10 s for Ray to stop)."""
        return max(1, self.termination_grace_period_s - 10)

    @model_validator(mode="after")
    def _bounds(self) -> "GpuWorkerConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class CpuWorkerConfig(_Frozen):
    """An optional autoscaling CPU worker group (ingest tasks, Tune drivers) so GPU pods keep their CPUs."""

    enabled: bool = True
    cpu: str = "8"
    memory: str = "32Gi"
    shm_size: str = "8Gi"
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(2, ge=1)

    _v_q = field_validator("memory", "shm_size")(classmethod(lambda cls, v: _quantity(v)))
    _v_c = field_validator("cpu")(classmethod(lambda cls, v: _cpu(v)))

    @model_validator(mode="after")
    def _bounds(self) -> "CpuWorkerConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class IngressConfig(_Frozen):
    """Expose MLflow through an Ingress (off unless configured)."""

    host: str
    class_name: str | None = None
    tls_secret: str | None = Field(None, description="Secret holding the TLS certificate for host.")


class MlflowConfig(_Frozen):
    """The MLflow tracking server (or the URL of an existing one)."""

    deploy: bool = Field(True, description="Render the MLflow Deployment and Service.")
    tracking_uri: str | None = Field(
        None, description="MLflow URL the pods use; None = the rendered in-cluster Service."
    )
    backend: Literal["sqlite", "postgresql"] = Field(
        "sqlite", description="sqlite on the shared volume (small team) or PostgreSQL (production)."
    )
    postgres_secret: str = Field("sspctl-mlflow-db", description="Secret holding the PostgreSQL URI.")
    postgres_secret_key: str = Field("uri", description="Key in that Secret (postgresql://user:pw@host/db).")
    service_type: Literal["ClusterIP", "LoadBalancer"] = Field(
        "ClusterIP", description="ClusterIP keeps MLflow inside the cluster (browse via port-forward)."
    )
    ingress: IngressConfig | None = None
    port: int = Field(5000, ge=1, le=65535)
    cpu: str = "1"
    memory: str = "2Gi"
    workers: int = Field(1, ge=1, description="MLflow server worker processes.")

    _v_q = field_validator("memory")(classmethod(lambda cls, v: _quantity(v)))
    _v_c = field_validator("cpu")(classmethod(lambda cls, v: _cpu(v)))
    _v_s = field_validator("postgres_secret")(classmethod(lambda cls, v: _dns1123(v)))

    @model_validator(mode="after")
    def _has_url(self) -> "MlflowConfig":
        if not self.deploy and not self.tracking_uri:
            raise ValueError("set tracking_uri when deploy is false (pods need an MLflow URL)")
        return self


class NetworkPeer(_Frozen):
    """A source a NetworkPolicy lets in: pods (by namespace and/or labels), or an IP range.

    ``namespace`` alone: every pod of that namespace. ``pod_labels`` alone: the pods with those
    labels in the deployment's namespace. Both: the pods with those labels in that namespace.
    ``cidr`` (alone): an IP range, for traffic from outside the pod network (a load balancer).
    """

    namespace: str | None = Field(None, description="Namespace name (matched by kubernetes.io/metadata.name).")
    pod_labels: dict[str, str] | None = Field(None, description="Labels the source pods carry.")
    cidr: str | None = Field(None, description="IP range, e.g. 10.0.0.0/8; not combinable with the others.")

    @field_validator("pod_labels")
    @classmethod
    def _pod_labels(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return value if value is None else _labels(value)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 63 or not _DNS1035.match(value)):
            raise ValueError(f"{value!r} is not a valid namespace name")
        return value

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_network(value, strict=True))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a CIDR range ({exc})") from None

    @model_validator(mode="after")
    def _one_kind(self) -> "NetworkPeer":
        selectors = self.namespace is not None or self.pod_labels is not None
        if self.cidr is not None and selectors:
            raise ValueError("cidr cannot be combined with namespace or pod_labels (use two entries)")
        if self.cidr is None and not selectors:
            raise ValueError("set namespace, pod_labels (or both), or cidr")
        return self


def _kuberay_operator() -> NetworkPeer:
    # `helm install kuberay-operator kuberay/kuberay-operator` without -n: namespace default; the
    # chart labels the operator pod app.kubernetes.io/name=kuberay-operator.
    return NetworkPeer(namespace="default", pod_labels={"app.kubernetes.io/name": "kuberay-operator"})


class NetworkPolicyConfig(_Frozen):
    """Ingress NetworkPolicies: nothing reaches the deployment's pods unless listed here.

    Rendered: default-deny ingress for every pod of the deployment; all ports between the Ray pods
    of one cluster; the dashboard / job API (8265) on a head from this deployment's Ray and job
    submitter pods, the KubeRay operator and ``dashboard_namespaces``; MLflow from the Ray pods and
    ``mlflow_from``. Egress stays open. Needs a network plugin that enforces NetworkPolicies.
    """

    enabled: bool = Field(True, description="Render the NetworkPolicies (03-network-policies.yaml).")
    dashboard_namespaces: list[str] = Field(
        default_factory=list, description="Namespaces whose pods may call the Ray dashboard / job API (8265)."
    )
    mlflow_from: list[NetworkPeer] = Field(
        default_factory=list, description="Extra sources allowed to reach MLflow (ingress controller, notebooks)."
    )
    kuberay_operator: NetworkPeer = Field(
        default_factory=_kuberay_operator,
        description="The KubeRay operator pod: it polls RayJob status through the head's dashboard port.",
    )

    @field_validator("dashboard_namespaces")
    @classmethod
    def _namespaces(cls, value: list[str]) -> list[str]:
        for name in value:
            if len(name) > 63 or not _DNS1035.match(name):
                raise ValueError(f"{name!r} is not a valid namespace name")
        return value


class JobsConfig(_Frozen):
    """RayJobs: one per pipeline step; each creates its own cluster and deletes it when done.

    Commands are shell lines run on the head. Placeholders: ``{mount_path}`` (the volume),
    ``{workers}`` (GPU workers per job), ``{cpus_per_worker}`` (a GPU pod's CPUs per GPU) and, in
    ``pretrain``, ``{method}``. Reruns resume: run names are deterministic under SSPCTL_HOME.
    """

    ingest: str = (
        "sspctl ingest --store {mount_path}/data/mnms.zarr --mnms {mount_path}/raw/mnms"
        " --mnms2 {mount_path}/raw/mnms2 --workers 8 --no-progress"
        " && sspctl splits make --store {mount_path}/data/mnms.zarr --test-per-vendor 15"
        " --out {mount_path}/data/split.yaml"
    )
    pretrain: str = (
        "sspctl pretrain --method {method} --workers {workers} --gpus-per-worker 1"
        " --cpus-per-worker {cpus_per_worker} --store {mount_path}/data/mnms.zarr"
        " --split {mount_path}/data/split.yaml --no-progress"
    )
    pretrain_methods: list[PretrainMethod] = Field(default_factory=lambda: list(METHOD_NAMES))
    pretrain_workers: int | None = Field(
        None, ge=1, description="Ray Train workers (GPUs) per pretrain job; None = all GPUs of the group."
    )
    elastic: bool = Field(
        False, description="{workers} becomes the range MIN-MAX: min_replicas x gpus_per_pod (at least 1) to "
        "pretrain_workers, so a job goes on with fewer GPUs when spot nodes are reclaimed (docs/pretraining.md).",
    )
    study: str = "sspctl study --config {mount_path}/study.yaml"
    backoff_limit: int = Field(2, ge=0, description="Whole-job retries on a new cluster (each resumes).")
    submitter_backoff_limit: int = Field(2, ge=0, description="Retries of the submitter pod alone.")
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="Keep the finished job's cluster this long.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Kill a job running longer than this.")

    @field_validator("ingest", "pretrain", "study")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("command must not be empty")
        return value.strip()

    @field_validator("ingest", "pretrain", "study")
    @classmethod
    def _template(cls, value: str) -> str:
        # KubeRay pastes the entrypoint into a bash line and `ray job submit` re-joins it with
        # Windows-style quoting: quotes, `$` and backslashes would not survive both.
        bad = sorted(set(value) & set("'\"`$\\"))
        if bad:
            raise ValueError(f"quotes, '$', '`' and '\\' are not allowed in a job command (found {''.join(bad)})")
        try:
            value.format(**PLACEHOLDERS)
        except (KeyError, IndexError, ValueError) as exc:
            names = ", ".join(f"{{{key}}}" for key in PLACEHOLDERS)
            raise ValueError(f"only {names} may be used in a command ({exc})") from None
        return value


class DeployConfig(_Frozen):
    """Everything a deployment varies in; see ``configs/deploy/default.yaml`` for a commented example."""

    name: str = Field("sspctl", description="Prefix of every object name (RayCluster, RayJobs, MLflow).")
    namespace: str = "sspctl"
    create_namespace: bool = True
    pod_security: Literal["restricted", "baseline"] = Field(
        "baseline",
        description=(
            "Pod Security Standard the namespace enforces ('restricted' is always audited and warned). "
            "Our pods meet 'restricted'; 'baseline' tolerates containers an operator injects."
        ),
    )
    ray_version: str = Field("2.60.0", description="Must equal the Ray version inside the image.")
    autoscaler_idle_timeout_s: int = Field(300, ge=0, description="Remove a worker idle this long.")
    image: ImageConfig = Field(default_factory=ImageConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    gpu_workers: GpuWorkerConfig = Field(default_factory=GpuWorkerConfig)
    cpu_workers: CpuWorkerConfig = Field(default_factory=CpuWorkerConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    network_policies: NetworkPolicyConfig = Field(default_factory=NetworkPolicyConfig)
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra non-secret environment variables for every Ray pod."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # RayJob-created clusters append a suffix and pods add more: keep the prefix short.
        if len(value) > 20 or not _DNS1035.match(value):
            raise ValueError(f"{value!r} must be a DNS-1035 label of at most 20 characters (a-z, 0-9, '-')")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if len(value) > 63 or not _DNS1035.match(value):
            raise ValueError(f"{value!r} is not a valid namespace name")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = {"SSPCTL_HOME", "MLFLOW_TRACKING_URI"}
        for key in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if key in reserved:
                raise ValueError(f"{key} is set from storage/mlflow; do not set it in env")
            if re.search(r"(PASSWORD|SECRET|TOKEN|KEY)", key.upper()):
                raise ValueError(f"{key} looks like a credential: pass credentials through a Secret, not env")
        return value

    @model_validator(mode="after")
    def _fits(self) -> "DeployConfig":
        capacity = self.gpu_workers.max_replicas * self.gpu_workers.gpus_per_pod
        if self.jobs.pretrain_workers is not None and self.jobs.pretrain_workers > capacity:
            raise ValueError(
                f"jobs.pretrain_workers={self.jobs.pretrain_workers} exceeds the GPU group's capacity "
                f"{capacity} (gpu_workers.max_replicas x gpus_per_pod): the job would wait forever"
            )
        m = self.mlflow
        exposed = m.ingress is not None or m.service_type == "LoadBalancer"
        if self.network_policies.enabled and m.deploy and exposed and not self.network_policies.mlflow_from:
            raise ValueError(
                "MLflow is exposed (mlflow.ingress or LoadBalancer) but the NetworkPolicy only lets Ray pods in: "
                "add the ingress controller's namespace (or the load balancer's source range) to "
                "network_policies.mlflow_from"
            )
        return self

    @property
    def pretrain_workers(self) -> int:
        """Ray Train workers per pretrain job (default: every GPU the group can scale to)."""
        return self.jobs.pretrain_workers or self.gpu_workers.max_replicas * self.gpu_workers.gpus_per_pod

    @property
    def workers_arg(self) -> str:
        """``{workers}`` of a job command: ``N``, or with ``jobs.elastic`` the range ``MIN-MAX`` of the GPU group."""
        if not self.jobs.elastic:
            return str(self.pretrain_workers)
        low = min(max(1, self.gpu_workers.min_replicas * self.gpu_workers.gpus_per_pod), self.pretrain_workers)
        return f"{low}-{self.pretrain_workers}"

    @property
    def cpus_per_worker(self) -> int:
        """Whole CPUs of a GPU pod per GPU (what each Ray Train worker may reserve)."""
        cpu = self.gpu_workers.cpu
        cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        return max(1, int(cores // self.gpu_workers.gpus_per_pod))

    def command(self, template: str, method: str = "") -> str:
        """A job command with its placeholders filled in."""
        return template.format(
            mount_path=self.storage.mount_path,
            workers=self.workers_arg,
            cpus_per_worker=self.cpus_per_worker,
            method=method,
        )

    @property
    def tracking_uri(self) -> str:
        """The MLflow URL pods log to."""
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"http://{self.name}-mlflow.{self.namespace}.svc.cluster.local:{self.mlflow.port}"
