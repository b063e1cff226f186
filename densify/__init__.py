"""densify: dense depth, correspondences, poses and fused scenes from point-query VLMs."""

__version__ = "0.1.0"
