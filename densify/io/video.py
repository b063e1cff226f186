"""Video input: frames sampled from a video file (OpenCV) become images with their timestamps.

`extract_frames` writes the kept frames as PNG files into a folder (each a plain image input from then
on) with frames.json beside them: the video, its native frame rate, the sampling, and per frame its id, file,
index in the video and timestamp in seconds. A second call with the same video (size and modification
time) and the same sampling reuses the frames without decoding the video again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np

from densify.io import outputs
from densify.io.images import ImageError, ImageSource

log = logging.getLogger(__name__)

__all__ = ["VIDEO_SUFFIXES", "is_video", "extract_frames"]

VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _sources(folder: Path, frames: list[dict]) -> list[ImageSource]:
    return [ImageSource(f["id"], folder / f["file"], extra={"timestamp_s": f["timestamp_s"], "frame": f["frame"]})
            for f in frames]


def _reusable(index: Path, key: dict, folder: Path) -> list[dict] | None:
    try:
        old = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    if old.get("key") != key or not all((folder / f["file"]).is_file() for f in old.get("frames", [])):
        return None
    return old["frames"]


def extract_frames(video: str | Path, folder: str | Path, *, fps: float | None = None, every: int | None = None,
                   max_frames: int | None = None) -> tuple[list[ImageSource], dict]:
    """Frames of `video` as images in `folder`: `fps` frames per second of video time, or every `every`-th
    frame (default: every frame); at most `max_frames`. Returns the sources (each with `extra` timestamp_s and
    frame) and the record written to frames.json."""
    video, folder = Path(video), Path(folder)
    if fps is not None and every is not None:
        raise ValueError("give --fps or --every, not both")
    if not video.is_file():
        raise ImageError(f"{video}: no such video file", "missing")
    st = video.stat()
    key = {"video": str(video.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "fps": fps,
           "every": every, "max_frames": max_frames}
    index = folder / "frames.json"
    frames = _reusable(index, key, folder)
    if frames is not None:
        log.info("%s: reusing %d extracted frames in %s", video, len(frames), folder)
        return _sources(folder, frames), json.loads(index.read_text())
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise ImageError(f"{video}: OpenCV cannot decode this video; convert it (e.g. to H.264 .mp4) or give its "
                         f"frames as images", "image")
    native = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    frames, k, next_t = [], 0, 0.0
    try:
        while max_frames is None or len(frames) < max_frames:
            ok, bgr = cap.read()
            if not ok:
                break
            t = _timestamp(cap, k, native)
            keep = (k % every == 0) if every else (t >= next_t - 1e-6) if fps else True
            if keep:
                if fps:
                    next_t += 1.0 / fps
                name = f"{video.stem}_{k:06d}"
                outputs.write_png(folder / f"{name}.png", np.ascontiguousarray(bgr[:, :, ::-1]))
                frames.append({"id": name, "file": f"{name}.png", "frame": k, "timestamp_s": round(t, 6)})
            k += 1
    finally:
        cap.release()
    if not frames:
        raise ImageError(f"{video}: no frame could be decoded; convert it (e.g. to H.264 .mp4) or give its frames "
                         f"as images", "image")
    record = {"key": key, "video": str(video), "native_fps": native, "decoded_frames": k,
              "sampling": {"fps": fps, "every": every, "max_frames": max_frames}, "frames": frames}
    outputs.write_json(index, record)
    log.info("%s: %d of %d frames kept (%s)", video, len(frames), k,
             f"{fps:g} per second" if fps else f"every {every}" if every else "all")
    return _sources(folder, frames), record


def _timestamp(cap, k: int, native: float) -> float:
    """The decoded frame's time in seconds: the container's, else its index over the frame rate."""
    ms = cap.get(cv2.CAP_PROP_POS_MSEC)
    if ms and ms > 0 or k == 0:
        return float(ms or 0.0) / 1000.0
    return k / native if native > 0 else float(k)
