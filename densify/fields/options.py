"""Typed options of each densifier (`densify.options`), checked when the settings load: a misspelt key, a
wrong type or an out-of-range value is named before any engine work. Each model's fields are exactly the
keyword options of its function (tests/test_structure.py checks this)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DensifierOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LinearDepthOptions(DensifierOptions):
    inverse: bool = Field(True, description="interpolate inverse depth (straight lines stay straight)")


class LinearFlowOptions(DensifierOptions):
    pass


class EdgeOptions(DensifierOptions):
    k_fit: int = Field(40, ge=3, description="neighbours per plane fit")
    radius: float = Field(2.5, gt=0, description="plane-fit kernel in local sample spacings")
    k_blend: int = Field(12, ge=1, description="planes blended per pixel")
    blend_radius: float = Field(0.9, gt=0, description="per-pixel blending kernel in sample spacings")
    edge_sigma: float = Field(0.3, gt=0, description="image-edge strength (0-1) that counts as a boundary")
    texture_suppress: bool = Field(True, description="ignore image edges inside textured regions")
    gate: tuple[float, float] | None = Field((1.3, 1.8), description="edges count only near answers this many "
                                             "times rougher than the noise (lo, hi); null: everywhere")
    colour_sigma: float | None = Field(20.0, gt=0, description="colour-similarity scale (Lab units)")
    logprob_scale: float = Field(1.0, gt=0, description="answer weight falls by e per this much log-probability")
    iters: int = Field(3, ge=1, description="refit passes")
    block: int | None = Field(None, ge=1, description="block size of the evaluation grid (default: from spacing)")

    @field_validator("gate")
    @classmethod
    def _gate(cls, v):
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError(f"must be (lo, hi) with 0 < lo <= hi, got {v}")
        return v


class EdgeDepthOptions(EdgeOptions):
    tau: float = Field(0.3, gt=0, description="log-depth difference treated as another surface")


class EdgeFlowOptions(EdgeOptions):
    tau: float = Field(6.0, gt=0, description="displacement difference (pixels) treated as another surface")
    outlier_thresh: float = Field(20.0, gt=0, description="matches this far (pixels) from their neighbours' "
                                  "displacement are dropped")
