"""Library stages: each runs a stream of images or pairs through the data path and writes named outputs.

    depth   plan -> prompts -> engine rounds -> answers -> dense field -> files   (DepthStage)
    label   the depth stage over a manifest as a resumable batch job             (LabelJob)
    pairs   correspondences -> relative poses (RANSAC / PnP), or asked of a pose profile
    scene   pose graph -> TSDF fusion -> exports; `reconstruct` runs depth, pairs and scene in turn

Every job's settings live here too (settings: pydantic models loaded from configs/pipelines/*.yaml).
Commands (pipelines/) and the Python facade (densify.Densifier) are thin layers over these.

The top of the library: may import every other package except the simulator (densify.sim), which it
reaches only through the engine registry.
"""

from densify.stages.depth import DepthResult, DepthStage
from densify.stages.engine import StageEngines, build_engine
from densify.stages.label import LabelJob
from densify.stages.scene import SceneResult, reconstruct, relative_pose

__all__ = ["DepthStage", "DepthResult", "LabelJob", "SceneResult", "StageEngines", "build_engine", "reconstruct",
           "relative_pose"]
