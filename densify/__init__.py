"""densify: dense depth, correspondences, poses and fused scenes from point-query VLMs.

    from densify import Densifier
    with Densifier(profile="vlm3-depth", engine="vllm", model="/ckpt/VLM3-depth") as d:
        maps = d.depth("photos/")
"""

__version__ = "0.1.0"

__all__ = ["Densifier", "DepthMap", "RelativePose", "SceneResult", "__version__"]


def __getattr__(name):  # the facade pulls in OpenCV, Open3D and pydantic models: load it on first use
    if name in ("Densifier", "DepthMap", "RelativePose", "SceneResult"):
        from densify import api

        return getattr(api, name)
    raise AttributeError(f"module 'densify' has no attribute {name!r}")
