"""Questions in text: which pixels to ask (plan), the exact prompt of a profile (prompts) and answer
texts back to values with a failure kind for each (answers).

May import: densify.io, densify.config, densify.engines.base (the batch types). Never the engines
themselves, the stages or the simulator.
"""
