"""Object questions (VLM3-object, SpatialRGPT-Bench): regions and their normalised boxes, the exact
question text and answer parsers (questions), one image's questions end to end (qa), and the same
questions answered from dense depth (geometry).

May import: densify.queries, densify.geometry, densify.io, densify.config, densify.engines.base.
"""
