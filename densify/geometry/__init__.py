"""Geometry: point clouds, rotations, relative poses (RANSAC / PnP), pose graphs, per-view scale, TSDF
fusion and scene exports (COLMAP, nerfstudio).

May import: densify.io, densify.config, numpy, OpenCV, Open3D. Nothing about models or engines.
"""
