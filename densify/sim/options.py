"""The simulated engine's typed options (`engine.options` with `engine.name: simulated`), registered by
string in densify.engines.registry like every engine's, so the engines package never names the simulator."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, InstanceOf

from densify.engines.options import EngineOptions
from densify.sim.errors import ErrorModel


class SimulatedOptions(EngineOptions):
    """Answers from ground truth through an error model: a test and demo tool, never a model."""
    engine_name: ClassVar[str] = "simulated"
    simulated: ClassVar[bool] = True
    runtime: ClassVar[frozenset[str]] = frozenset({"truth"})
    seed: int = Field(0, description="seed of the error model (answers depend on it, on the images and the prompt)")
    noise: bool = Field(True, description="false: exact answers (checks the pipeline, not a model)")
    error: str | dict | InstanceOf[ErrorModel] | None = Field(
        None, description="error preset (iid, the default; structured; exact) or ErrorModel parameters "
                          "(densify.sim.errors; in Python also an ErrorModel)")
    object_error: dict | None = Field(None, description="object-question error model "
                                      "(densify.sim.objects.ObjectErrorModel)")
    answers_per_s: float | None = Field(None, gt=0, description="pace answers to at most this many queries per "
                                        "second per engine (benchmarks: stands in for a GPU engine's rate); "
                                        "None: as fast as the CPU allows")
    transport: ClassVar[frozenset[str]] = frozenset({"answers_per_s"})

    def with_model(self, model: str | None):
        if model is None:
            return self
        raise ValueError("the simulated engine answers from ground truth and takes no model; drop it, or choose a "
                         "real engine with --engine")
