"""Pretraining configuration: the common recipe (``PretrainConfig``) and one block per SSP method.

``PretrainConfig.method`` is a discriminated union on ``name`` (``simclr``, ``pcl``, ``dino``,
``mim``). Top-level fields the YAML leaves out take the paper's value *for that method*
(``PAPER_DEFAULTS``, method-spec §4 and §10), so ``{"method": "dino"}`` alone is the published DINO
run. ``batch_size`` counts GLOBAL images per optimizer step (views/crops are extra rows).

The configs hold data only: the schedules that read them are pure functions in
``trainers/schedules.py`` (learning rate, weight decay, DINO's teacher temperature and EMA momentum)
and the optimizer is built by ``trainers/optimizers.py`` (DINO: biases and 1-D parameters get no
weight decay; frozen parameters such as the weight-norm magnitude are left out).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers.augment import AugmentConfig

_FROZEN = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# method blocks


class MethodBlock(BaseModel):
    """What every method block says about its run: how it selects the best epoch, and its checks.

    ``best_metric`` is ``valid_loss`` (the published validation loss) or ``train_loss`` (DINO, which
    has no validation loop); ``check(config)`` raises ``ValueError`` naming the key when the block
    does not fit the run's recipe (``config``, a ``PretrainConfig``).
    """

    model_config = _FROZEN

    best_metric: ClassVar[Literal["valid_loss", "train_loss"]] = "valid_loss"

    def check(self, config: PretrainConfig) -> None:
        """Nothing to check by default."""


class SimCLRConfig(MethodBlock):
    """SimCLR: two views per image, NT-Xent over the global batch (spec §4.1)."""

    name: Literal["simclr"] = "simclr"
    temperature: float = Field(0.1, gt=0)
    hidden_dim: int = Field(512, ge=1, description="projection MLP hidden width")
    projection_dim: int = Field(512, ge=1, description="projection MLP output width")
    mlp_layers: int = Field(3, ge=1)
    augment: AugmentConfig = AugmentConfig()


class PCLConfig(SimCLRConfig):
    """PCL: SimCLR with positives = rows whose slice positions differ by < ``threshold`` (spec §4.2)."""

    name: Literal["pcl"] = "pcl"  # type: ignore[assignment]
    threshold: float = Field(0.1, gt=0, description="strict bound on |pos_i - pos_j| for a positive pair")


#: DINO's base intensity probabilities (noise, smooth, scale, shift, gamma) of ``dino-config.yaml``.
_DINO_BASE: dict[str, Any] = {"noise_p": 0.15, "smooth_p": 0.1, "scale_intensity_p": 0.2, "shift_p": 0.15, "gamma_p": 0.15}


class DINOConfig(MethodBlock):
    """DINO: 2 global + ``n_local_crops`` local crops, EMA teacher, centring (spec §4.3, §2.3).

    ``teacher_init_from_student``: ``False`` (default) reproduces the published code, whose
    teacher is initialised independently of the student; ``True`` is the usual ("fixed") DINO,
    teacher = copy of the student at the start. Its best epoch is the one with the lowest training
    loss (no validation loop, as published).
    """

    best_metric: ClassVar[Literal["valid_loss", "train_loss"]] = "train_loss"

    name: Literal["dino"] = "dino"
    out_dim: int = Field(8192, ge=2, description="prototypes (logit dimension)")
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    use_bn: bool = True
    n_local_crops: int = Field(6, ge=0)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp_start: float = Field(0.02, gt=0)
    teacher_temp_end: float = Field(0.04, gt=0)
    teacher_temp_warmup_epochs: int = Field(30, ge=0, description="linear warm-up, per epoch, clipped to the run")
    center_momentum: float = Field(0.9, ge=0, le=1)
    momentum_teacher_start: float = Field(0.996, ge=0, le=1)
    momentum_teacher_end: float = Field(1.0, ge=0, le=1)
    freeze_last_layer_epochs: int = Field(1, ge=0, description="epochs with the last layer's gradient dropped")
    teacher_init_from_student: bool = False
    global_blur: AugmentConfig = AugmentConfig(
        **_DINO_BASE | {"smooth_p": 1.0, "smooth_sigma": (0.1, 2.0), "scale_range": (0.524, 1.4)}
    )
    global_solarize: AugmentConfig = AugmentConfig(**_DINO_BASE | {"scale_range": (0.524, 1.4), "solarize_p": 0.2})
    local: AugmentConfig = AugmentConfig(
        **_DINO_BASE | {"crop_fraction": 0.5, "scale_range": (0.313, 0.524), "translate_fraction": 160 / 128}
    )

    def check(self, config: PretrainConfig) -> None:
        """No validation batch: DINO has no validation loop."""
        if config.valid_batch_size is not None:
            raise ValueError(
                "valid_batch_size: DINO has no validation loop (published; its loss updates the teacher's centre), "
                "leave it null"
            )


class MIMConfig(MethodBlock):
    """MIM: mask ``mask_ratio`` of ``patches_per_side**2`` patches, reconstruct with the U-Net (spec §4.4).

    The patch edge is ``image_size / patches_per_side`` (32 px at 256 px, the paper's setting).
    """

    name: Literal["mim"] = "mim"
    patches_per_side: int = Field(8, ge=1)
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    fill_value: float = 0.0
    augment: AugmentConfig = AugmentConfig()

    def check(self, config: PretrainConfig) -> None:
        """The patches tile the image."""
        if config.image_size % self.patches_per_side:
            raise ValueError(
                f"method.patches_per_side: {self.patches_per_side} does not divide image_size {config.image_size}"
            )


#: The config block of every method, by name (``register`` adds one).
METHOD_CONFIGS: dict[str, type[MethodBlock]] = {
    block.model_fields["name"].default: block for block in (SimCLRConfig, PCLConfig, DINOConfig, MIMConfig)
}
MethodConfig = Annotated[SimCLRConfig | PCLConfig | DINOConfig | MIMConfig, Field(discriminator="name")]


# ---------------------------------------------------------------------------------------------
# common recipe


class OptimizerConfig(BaseModel):
    """SGD settings; ``lr`` is the peak rate (DINO's already includes the 64/256 linear scaling)."""

    model_config = _FROZEN

    name: Literal["sgd"] = "sgd"
    lr: float = Field(gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    weight_decay_end: float | None = Field(None, ge=0, description="cosine target per iteration; None = constant")
    exclude_bias_and_norm_from_wd: bool = False


class ScheduleConfig(BaseModel):
    """Learning-rate schedule (see the module docstring)."""

    model_config = _FROZEN

    kind: Literal["cosine_epoch", "warmup_cosine_step"] = "cosine_epoch"
    warmup_epochs: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)


#: Paper values per method for the top-level fields (method-spec §10).
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "simclr": {
        "batch_size": 224, "valid_batch_size": 224, "precision": "fp16",
        "optimizer": {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4},
        "schedule": {"kind": "cosine_epoch"},
    },
    "pcl": {
        "batch_size": 64, "valid_batch_size": 64, "precision": "fp32",
        "optimizer": {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-5},
        "schedule": {"kind": "cosine_epoch"},
    },
    "dino": {
        "batch_size": 64, "valid_batch_size": None, "precision": "fp16",
        "optimizer": {
            "lr": 0.03 * 64 / 256, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
            "weight_decay_end": 1e-4, "exclude_bias_and_norm_from_wd": True,
        },
        "schedule": {"kind": "warmup_cosine_step", "warmup_epochs": 10, "min_lr": 1e-6},
    },
    "mim": {
        "batch_size": 128, "valid_batch_size": 256, "precision": "fp16",
        "optimizer": {"lr": 0.01, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5},
        "schedule": {"kind": "cosine_epoch"},
    },
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class PretrainConfig(BaseModel):
    """One pretraining run. Missing top-level fields take the paper's value for ``method.name``.

    ``batch_size`` is GLOBAL images per step (split evenly over workers); ``precision`` is the
    autocast dtype (``fp16`` uses a GradScaler); ``steps_per_epoch`` optionally caps an epoch
    (demos); ``checkpoint_every`` is in epochs.

    Validation (published for SimCLR, PCL and MIM): every epoch the loss on the split's validation
    subjects, in batches of ``valid_batch_size`` GLOBAL images (``None`` = no validation: DINO, whose
    published code has none and whose loss moves its teacher's centre), at most ``valid_steps``
    batches (demos; ``None`` = all). ``deterministic`` switches the run to deterministic kernels
    (``trainers/determinism.py``).
    """

    model_config = _FROZEN

    method: MethodConfig
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(ge=1, description="global images per optimizer step")
    valid_batch_size: int | None = Field(None, ge=1, description="global validation batch; None = no validation")
    valid_steps: int | None = Field(None, ge=1, description="cap on validation batches per epoch; None = all")
    steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch; None = one full pass")
    image_size: int = Field(256, ge=8)
    model_width: int = Field(32, ge=1, description="U-Net base channels (paper 32: 32..512); fine-tuning must match")
    seed: int = 0
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    compile: bool = False
    channels_last: bool = False
    optimizer: OptimizerConfig
    schedule: ScheduleConfig = ScheduleConfig()
    checkpoint_every: int = Field(1, ge=1)
    deterministic: bool = Field(False, description="deterministic kernels, no cuDNN benchmark (bit-identical reruns)")

    @model_validator(mode="before")
    @classmethod
    def _paper_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        method = data.get("method")
        if isinstance(method, str):
            method = data["method"] = {"name": method}
        name = method.get("name") if isinstance(method, dict) else getattr(method, "name", None)
        if name in PAPER_DEFAULTS:
            data = _merge(PAPER_DEFAULTS[name], data)
        return data

    @model_validator(mode="after")
    def _method_fits(self) -> PretrainConfig:
        self.method.check(self)
        return self

    @property
    def validates(self) -> bool:
        """Whether the run computes a validation loss (given validation subjects)."""
        return self.valid_batch_size is not None

    @property
    def best_metric(self) -> Literal["valid_loss", "train_loss"]:
        """What selects the best checkpoint: the validation loss, or (DINO, as published) the epoch training loss."""
        return self.method.best_metric


def add_method_config(name: str, block: type[MethodBlock], paper_defaults: dict[str, Any]) -> None:
    """Accept ``block`` as ``PretrainConfig.method`` when its ``name`` is ``name`` (rebuilds the union and
    the models that embed ``PretrainConfig``).

    Raises:
        ValueError: ``name`` is taken or ``block.name`` does not default to it.
    """
    if name in METHOD_CONFIGS:
        raise ValueError(f"method {name!r}: a config block of that name exists")
    if not issubclass(block, MethodBlock):
        raise ValueError(f"method {name!r}: {block.__name__} must subclass MethodBlock")
    field = block.model_fields.get("name")
    if field is None or field.default != name:
        raise ValueError(f"method {name!r}: {block.__name__}.name must default to {name!r}")
    METHOD_CONFIGS[name] = block
    PAPER_DEFAULTS[name] = paper_defaults
    rebuild_method_union()


def rebuild_method_union() -> None:
    """Make ``PretrainConfig.method`` (and the models embedding ``PretrainConfig``) accept exactly the
    blocks of ``METHOD_CONFIGS``."""
    from functools import reduce
    from operator import or_

    from trainers.jobs import PretrainJob

    PretrainConfig.model_fields["method"].annotation = reduce(or_, METHOD_CONFIGS.values())
    PretrainConfig.model_rebuild(force=True)
    PretrainJob.model_rebuild(force=True)
