"""Synthetic inputs with ground truth: seeded indoor scenes rendered with Open3D (scenes), question sets
built from them (object_questions) and Qwen3-VL model folders with real file formats and fake weights
(qwen3vl).

May import: densify.io, densify.config, densify.geometry, densify.objects, densify.sim (truth formats).
"""
