"""Configuration of one supervised fine-tuning cell (method-spec section 5).

Defaults are the published recipe: batch 32 (global), SGD nesterov momentum 0.99, weight decay
3e-5, poly LR (power 0.9) stepped once per epoch over ``epochs``, lr 0.01 from scratch and 0.005
when pretrained weights are loaded, 1000 epochs of one pass over the budget's labelled slices.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers.augment import AugmentConfig
from trainers.methods.config import OptimizerConfig
from trainers.methods.names import SCRATCH, Budget
LR_SCRATCH = 0.01
LR_PRETRAINED = 0.005


class FinetuneConfig(BaseModel):
    """One grid cell: which initialisation, which label budget, and the training recipe.

    ``method`` is an SSP method name (``trainers.methods.names``) or ``"scratch"``;
    ``weights`` a pretrained weights file or pretraining run directory (required unless scratch),
    ``part`` which part of it to load and ``pretrained_checkpoint`` which of the run's checkpoints
    (``last`` epoch, as published, or the ``best`` one by pretraining validation loss). ``budget``
    is a number of labelled training subjects or ``"all"``; with ``seed`` (the *subset seed*) it
    selects the split's nested subset. ``train_seed`` (the *training seed*) drives the
    initialisation, the data order and the augmentation draws; None uses ``seed`` (read it through
    ``training_seed``). ``lr`` defaults to 0.01 (scratch)
    or 0.005 (pretrained): read it through ``learning_rate``. The model grid (size, 1.25 mm
    spacing) is the store's; ``image_size`` only asserts it. ``augment`` holds the probabilities and
    ranges of the random affine and intensity augmentations (``trainers/augment.py``); the label
    follows the image's affine transform.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = SCRATCH
    weights: str | None = None
    part: Literal["encoder", "encoder_decoder"] = "encoder"
    pretrained_checkpoint: Literal["last", "best"] = Field(
        "last", description="which checkpoint of a pretraining run directory to load: last epoch (published) or best"
    )
    budget: Budget = "all"
    seed: int = Field(0, description="subset seed: which labelled subjects a budget draws (split file)")
    train_seed: int | None = Field(
        None, description="training seed: initialisation, data order, augmentation (None = seed)"
    )
    epochs: int = Field(1000, ge=1)
    iterations_per_epoch: int | None = Field(
        None, ge=1,
        description="steps per epoch, cycling the budget's slices as needed (nnU-Net style); None = one full pass (paper)",
    )
    batch_size: int = Field(32, ge=1, description="global batch (split over workers)")
    valid_batch_size: int = Field(128, ge=1)
    lr: float | None = Field(None, gt=0)
    momentum: float = Field(0.99, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(3e-5, ge=0)
    poly_power: float = Field(0.9, gt=0)
    frozen_encoder_epochs: int = Field(0, ge=0, description="epochs with the encoder frozen (pretrained only)")
    augment: AugmentConfig = AugmentConfig()
    augment_enabled: bool = Field(True, description="augment training batches (validation/test never are)")
    model_width: int = Field(32, ge=1, description="U-Net base channels (paper 32); must equal the pretraining run's")
    image_size: int | None = Field(None, ge=8, description="model input edge (px); None = the store's; must match it")
    val_every: int = Field(1, ge=1, description="validate every k epochs (and after the last)")
    eval_checkpoint: Literal["last", "best"] = "last"
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32 as published; bf16 autocast on GPU for speed (CPU always runs fp32)"
    )
    channels_last: bool = Field(False, description="NHWC memory format for model and batches (faster convs on GPU)")
    deterministic: bool = Field(False, description="deterministic kernels, no cuDNN benchmark (bit-identical reruns)")

    @model_validator(mode="after")
    def _weights_match_method(self) -> "FinetuneConfig":
        if self.method == SCRATCH and self.weights is not None:
            raise ValueError("weights: must be empty when method is 'scratch'")
        if self.method != SCRATCH and self.weights is None:
            raise ValueError(f"weights: required for method '{self.method}' (or use method 'scratch')")
        if self.budget != "all" and self.budget < 1:
            raise ValueError("budget: must be a positive number of subjects or 'all'")
        return self

    @property
    def pretrained(self) -> bool:
        """True when pretrained weights are loaded."""
        return self.weights is not None

    @property
    def training_seed(self) -> int:
        """The seed of initialisation, data order and augmentation: ``train_seed``, else ``seed``."""
        return self.seed if self.train_seed is None else self.train_seed

    @property
    def learning_rate(self) -> float:
        """``lr`` if given, else 0.01 from scratch and 0.005 when fine-tuning pretrained weights."""
        if self.lr is not None:
            return self.lr
        return LR_PRETRAINED if self.pretrained else LR_SCRATCH

    @property
    def optimizer(self) -> OptimizerConfig:
        """The SGD settings as the optimiser model pretraining uses (``trainers.optimizers.sgd``)."""
        return OptimizerConfig(lr=self.learning_rate, momentum=self.momentum, nesterov=self.nesterov,
                               weight_decay=self.weight_decay)
