"""Geometry: point clouds, relative poses, pose graphs and fusion."""
