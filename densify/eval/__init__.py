"""Metrics as the papers define them (depth, correspondence, pose, reconstruction) and benchmark
readers and scorers (SpatialRGPT-Bench, DepthLM-style labelled points).

May import: the question layer, geometry, io, config. Never the simulator or the stages' internals.
"""
