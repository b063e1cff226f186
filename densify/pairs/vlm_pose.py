"""Relative pose asked directly of a pose profile (VLM3-pose): answers -> R, unit t and distance.

VLM3-pose describes camera 2 in camera 1's frame: its orientation as intrinsic yaw -> pitch -> roll
(densify.geometry.rotations: R_12 = Ry(yaw) Rx(pitch) Rz(roll), x_1 = R_12 x_2 + C_2) and its centre's
direction C_2 / |C_2| (x right, y down, z forward), plus |C_2| in metres. A PairPose uses OpenCV's
direction instead (x_2 = R x_1 + t), so R = R_12^T and t = -R_12^T C_2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from densify.config.profiles import Profile
from densify.engines.base import Completion, Engine, generate_stream
from densify.geometry.pose import FAILED, GOOD, PairPose
from densify.geometry.rotations import angle_between_deg, matrix_from_euler, rotation_angle_deg
from densify.io.cameras import Camera, PreparedImage, prepare_for
from densify.queries.answers import parse_completion
from densify.queries.prompts import image_ref, image_uid, pose_batch

__all__ = ["VlmPose", "pose_view", "ask_pose", "collect_pose", "vlm_answer_from_T", "compare_poses"]


@dataclass
class VlmPose:
    """The pose profile's answers about one ordered pair."""

    euler: tuple[float, float, float] | None = None
    """(yaw, pitch, roll) degrees."""
    direction: np.ndarray | None = None
    """Unit direction of camera 2's centre in camera 1's frame."""
    distance: float | None = None
    """Metres between the camera centres."""
    angle: float | None = None
    """Relative rotation angle, degrees (the rotation_angle question)."""
    texts: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)
    """question -> failure kind, for questions that gave no value."""

    @property
    def R_12(self) -> np.ndarray | None:
        return None if self.euler is None else matrix_from_euler(*self.euler)

    def pair_pose(self) -> PairPose:
        """As a PairPose (source 'vlm'); failed when the rotation or the direction is missing."""
        if self.euler is None or self.direction is None:
            missing = [q for q in ("euler", "direction") if getattr(self, q) is None]
            return PairPose(None, None, None, 0, 0, FAILED, f"pose answers missing: {', '.join(missing)} "
                            f"({self.failures or 'not asked'})", "vlm", self.to_dict())
        R12 = self.R_12
        d = self.direction / max(np.linalg.norm(self.direction), 1e-12)
        R = R12.T
        t = -R12.T @ d
        t_metric = t * self.distance if self.distance is not None else None
        return PairPose(R, t, t_metric, 0, 0, GOOD, "", "vlm", self.to_dict())

    def to_dict(self) -> dict:
        return {"euler_ypr_deg": None if self.euler is None else list(self.euler),
                "direction": None if self.direction is None else self.direction.tolist(),
                "distance_m": self.distance, "angle_deg": self.angle, "failures": dict(self.failures),
                "texts": dict(self.texts)}


def pose_view(rgb: np.ndarray, camera: Camera, profile: Profile) -> PreparedImage:
    return prepare_for(rgb, camera, profile)


_KIND_TO_FIELD = {"euler": "euler", "vector3": "direction", "distance": "distance", "angle": "angle"}


def collect_pose(profile: Profile, questions: list[str], completions: list[Completion]) -> VlmPose:
    out = VlmPose()
    for name, c in zip(questions, completions):
        q = profile.questions[name]
        out.texts[name] = c.text
        p = parse_completion(q, c)
        if p.failure is not None:
            out.failures[name] = p.failure
            continue
        attr = _KIND_TO_FIELD.get(q.parser)
        if attr is None:
            continue
        v = p.value
        if attr == "direction":
            v = np.asarray(v, float)
            if not np.linalg.norm(v) > 0:
                out.failures[name] = "zero_vector"
                continue
        setattr(out, attr, v)
    return out


def ask_pose(engine: Engine, profile: Profile, prep1: PreparedImage, prep2: PreparedImage, *, id1: str, id2: str,
             questions: list[str] | None = None, path1=None, path2=None) -> VlmPose:
    """Ask the pose profile's questions about a pair (one query each)."""
    uid1, uid2 = image_uid(prep1, id1), image_uid(prep2, id2)
    names = questions or list(profile.questions)
    batch = pose_batch(prep1, prep2, profile, uid1=uid1, uid2=uid2, questions=names,
                       ref1=image_ref(id1, prep1, path1), ref2=image_ref(id2, prep2, path2))
    completions = next(generate_stream(engine, [batch]))[1]
    return collect_pose(profile, names, completions)


def vlm_answer_from_T(T_2_from_1: np.ndarray) -> tuple[tuple[float, float, float], np.ndarray, float]:
    """What an exact VLM3-pose would answer for a relative pose: ((yaw, pitch, roll), direction, distance)."""
    from densify.geometry.rotations import euler_from_matrix, relative_from_T

    R12, C = relative_from_T(T_2_from_1)
    dist = float(np.linalg.norm(C))
    return euler_from_matrix(R12), C / max(dist, 1e-12), dist


def compare_poses(a: PairPose, b: PairPose) -> dict:
    """Angles between two estimates of the same pair (rotation, translation direction)."""
    if a.R is None or b.R is None:
        return {"rotation_deg": None, "direction_deg": None}
    return {"rotation_deg": rotation_angle_deg(a.R @ b.R.T),
            "direction_deg": angle_between_deg(a.t, b.t) if a.t is not None and b.t is not None else None}
