from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# beside the checkout (/work/main -> /work/shared), or two up for a worktree (/work/wt/NAME -> /work/shared)
SHARED = next((d for d in (REPO.parent / "shared", REPO.parents[1] / "shared") if d.is_dir()), REPO.parent / "shared")
IBIMS = SHARED / "data" / "ibims1-sample" / "ibims1_sample.jsonl"
MODEL_FORMATS = SHARED / "reference" / "model-formats.md"


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def textured_image(rng):
    """A 640x480 RGB image with structure (for tests that need a real-looking input)."""
    import cv2
    img = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    return cv2.resize(img, (640, 480), interpolation=cv2.INTER_CUBIC)


def sidecar_metrics(src, res) -> dict:
    """An evaluation hook for the depth stage: the saved synthetic scene's depth beside the image."""
    from pathlib import Path

    from densify.eval.metrics import depth_report

    gt = np.load(Path(src.path).with_suffix(".depth.npy"))
    return {"dense": depth_report(res.depth, gt)}


def bounded(fn, seconds: float) -> dict:
    """Run fn in a thread; fail when it is still running after `seconds`. -> {"value": ...} or {"error": exc}."""
    import threading

    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"still running after {seconds} s"
    return out
