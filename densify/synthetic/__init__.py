"""Synthetic inputs with ground truth: seeded indoor scenes rendered with Open3D (scenes), question sets
built from them (object_questions) and model folders with real file formats and fake weights (models:
Qwen3-VL for VLM3, Pixtral in the LLaVA layout for DepthLM).

May import: densify.io, densify.config, densify.geometry, densify.objects, densify.sim (truth formats).
"""
