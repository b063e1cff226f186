"""Dense fields: sparse point answers -> full-resolution depth / flow with confidence."""

from densify.fields.interpolate import DenseField, densify_depth, densify_flow, reject_outliers
from densify.fields.edge_aware import densify_depth_edge, densify_flow_edge
from densify.fields.adaptive import AdaptivePlanner, run_adaptive, run_adaptive_depth

__all__ = ["DenseField", "densify_depth", "densify_flow", "reject_outliers", "densify_depth_edge",
           "densify_flow_edge", "AdaptivePlanner", "run_adaptive", "run_adaptive_depth"]
