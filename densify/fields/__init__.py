"""Dense fields: sparse point answers -> full-resolution depth / flow with confidence."""

from densify.fields.interpolate import DenseField, densify_depth, densify_flow, reject_outliers

__all__ = ["DenseField", "densify_depth", "densify_flow", "reject_outliers"]
