"""Dense fields: sparse point answers -> full-resolution depth / flow with confidence.

Densifiers register by name with one signature, so configs choose them (`densify.method`,
`corr.flow_method`): depth `(pixels, values, rgb, *, outliers, logprobs=None, **options)`, flow
`(pixels1, pixels2, rgb1, *, shape=None, **options)`; each registers the pydantic model of its options
(fields/options.py), so `densify.options` is checked when the settings load. The adaptive planner
(adaptive) places queries where the field is uncertain.

May import: densify.queries, densify.io, numpy, SciPy, OpenCV, pydantic. Nothing about engines or stages.
"""

import difflib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from pydantic import ValidationError

from densify.fields.adaptive import AdaptivePlanner
from densify.fields.edge_aware import densify_depth_edge, densify_flow_edge
from densify.fields.interpolate import DenseField, densify_depth, densify_flow, reject_outliers
from densify.fields.options import (DensifierOptions, EdgeDepthOptions, EdgeFlowOptions, LinearDepthOptions,
                                    LinearFlowOptions)


def densify_depth_linear(pixels, values, rgb, *, outliers: bool = True, logprobs=None, **options) -> DenseField:
    """Piecewise-linear in inverse depth (the image and log-probabilities are not used)."""
    return densify_depth(pixels, values, np.asarray(rgb).shape[:2], outliers=outliers, **options)


def densify_flow_linear(pixels, targets, rgb=None, *, shape=None, **options) -> DenseField:
    """Piecewise-linear displacement; needs only the size (`shape`, else the image's)."""
    return densify_flow(pixels, targets, shape or np.asarray(rgb).shape[:2], **options)


@dataclass(frozen=True)
class Method:
    """A densifier as configs name it: its function and the typed model of its options."""

    fn: Callable[..., DenseField]
    options: type[DensifierOptions]


DEPTH_DENSIFIERS = {"linear": Method(densify_depth_linear, LinearDepthOptions),
                    "edge": Method(densify_depth_edge, EdgeDepthOptions)}
FLOW_DENSIFIERS = {"linear": Method(densify_flow_linear, LinearFlowOptions),
                   "edge": Method(densify_flow_edge, EdgeFlowOptions)}
DEPTH_METHODS = {k: d.fn for k, d in DEPTH_DENSIFIERS.items()}
FLOW_METHODS = {k: d.fn for k, d in FLOW_DENSIFIERS.items()}


def depth_method(name: str):
    if name not in DEPTH_METHODS:
        raise KeyError(f"unknown depth densifier {name!r}; available: {', '.join(DEPTH_METHODS)}")
    return DEPTH_METHODS[name]


def validate_options(name: str, options: dict | None, *, kind: str = "depth", where: str = "densify.options") -> dict:
    """A densifier's options checked against its typed model: the options as given (coerced), or a
    ValueError naming the key (`where`.key), with the closest known key for a misspelt one."""
    registry = DEPTH_DENSIFIERS if kind == "depth" else FLOW_DENSIFIERS
    model = registry[name].options
    options = dict(options or {})
    for key in options:
        if key not in model.model_fields:
            close = difflib.get_close_matches(str(key), list(model.model_fields), n=1)
            raise ValueError(f"{where}.{key}: not an option of the {name} densifier"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; its options: {', '.join(model.model_fields) or 'none'}")
    try:
        return model.model_validate(options).model_dump(exclude_unset=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{where}.{key}: {err['msg']} (got {err.get('input')!r})") from None


__all__ = ["DenseField", "densify_depth", "densify_flow", "reject_outliers", "densify_depth_edge",
           "densify_flow_edge", "densify_depth_linear", "densify_flow_linear", "DEPTH_METHODS", "FLOW_METHODS",
           "DEPTH_DENSIFIERS", "FLOW_DENSIFIERS", "Method", "validate_options", "depth_method", "AdaptivePlanner"]
