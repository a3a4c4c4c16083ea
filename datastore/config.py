"""``IngestConfig``: the settings of ``sspctl ingest`` (YAML via ``--config``, flags override)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from datastore.store import DEFAULT_CHUNK_SLICES


class IngestConfig(BaseModel):
    """How raw M&Ms / M&Ms-2 subjects become store slices.

    The values that change the stored bytes are recorded in the store's root attributes; resuming
    an ingest with different values is refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    spacing: float = Field(1.25, gt=0, le=10, description="Target in-plane spacing in mm.")
    size: int = Field(256, ge=16, le=1024, description="Stored slice height and width in pixels.")
    chunk_slices: int = Field(
        DEFAULT_CHUNK_SLICES, ge=1, le=1024, description="Slices per stored chunk of `images`."
    )
    center_on_heart: bool = Field(
        True, description="Centre the crop on the label's enclosing-circle centre (else image centre)."
    )
    image_interpolation: Literal["bicubic", "bilinear"] = Field(
        "bicubic", description="In-plane interpolation of images (labels always use nearest)."
    )

    def store_fields(self) -> dict[str, object]:
        """The fields that define the stored content (checked on resume)."""
        return self.model_dump(mode="json")
