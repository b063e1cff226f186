"""Dense fields: sparse point answers -> full-resolution depth / flow with confidence.

Densifiers register by name with one signature, so configs choose them (`densify.method`,
`corr.flow_method`): depth `(pixels, values, rgb, *, outliers, logprobs=None, **options)`, flow
`(pixels1, pixels2, rgb1, *, shape=None, **options)`. The adaptive planner (adaptive) places queries
where the field is uncertain.

May import: densify.queries, densify.io, numpy, SciPy, OpenCV. Nothing about engines or stages.
"""

import numpy as np

from densify.fields.adaptive import AdaptivePlanner
from densify.fields.edge_aware import densify_depth_edge, densify_flow_edge
from densify.fields.interpolate import DenseField, densify_depth, densify_flow, reject_outliers


def densify_depth_linear(pixels, values, rgb, *, outliers: bool = True, logprobs=None, **options) -> DenseField:
    """Piecewise-linear in inverse depth (the image and log-probabilities are not used)."""
    return densify_depth(pixels, values, np.asarray(rgb).shape[:2], outliers=outliers, **options)


def densify_flow_linear(pixels, targets, rgb=None, *, shape=None, **options) -> DenseField:
    """Piecewise-linear displacement; needs only the size (`shape`, else the image's)."""
    return densify_flow(pixels, targets, shape or np.asarray(rgb).shape[:2], **options)


DEPTH_METHODS = {"linear": densify_depth_linear, "edge": densify_depth_edge}
FLOW_METHODS = {"linear": densify_flow_linear, "edge": densify_flow_edge}


def depth_method(name: str):
    if name not in DEPTH_METHODS:
        raise KeyError(f"unknown depth densifier {name!r}; available: {', '.join(DEPTH_METHODS)}")
    return DEPTH_METHODS[name]


__all__ = ["DenseField", "densify_depth", "densify_flow", "reject_outliers", "densify_depth_edge",
           "densify_flow_edge", "densify_depth_linear", "densify_flow_linear", "DEPTH_METHODS", "FLOW_METHODS",
           "depth_method", "AdaptivePlanner"]
