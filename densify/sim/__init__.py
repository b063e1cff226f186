"""The simulator, a test and demo tool: an engine that answers from ground truth through a seeded error
model (engine, its typed options, errors), the truth providers it reads (truth: files beside an image,
DepthLM manifest labels, scenes in memory) and simulated object answers (objects).

Only this package and densify.synthetic name ground truth. It may import densify.engines.base and
densify.engines.options, the question layer (queries, objects), geometry and io; nothing of the real data
path imports it (the engine registry names its engine and options by string, like every engine's).
"""
