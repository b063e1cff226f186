"""VLM3-pose's rotation convention and helpers.

Camera frame: x right, y down, z forward. The relative rotation is camera 2's orientation in camera 1's
frame (x_1 = R @ x_2 + C_2), written as intrinsic yaw -> pitch -> roll:
R = Ry(yaw) @ Rx(pitch) @ Rz(roll), where yaw > 0 turns the optical axis towards +x (right),
pitch > 0 towards -y (up), and roll > 0 turns the camera's x axis towards +y (banks right).
"""

from __future__ import annotations

import numpy as np


def _rx(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def matrix_from_euler(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    y, p, r = np.radians([yaw_deg, pitch_deg, roll_deg])
    return _ry(y) @ _rx(p) @ _rz(r)


def euler_from_matrix(R: np.ndarray) -> tuple[float, float, float]:
    """Inverse of matrix_from_euler (pitch in [-90, 90])."""
    R = np.asarray(R, float)
    # R = Ry(y) Rx(p) Rz(r): R[1,2] = -sin p; R[0,2] = cos p sin y; R[2,2] = cos p cos y;
    # R[1,0] = cos p sin r; R[1,1] = cos p cos r
    p = np.arcsin(np.clip(-R[1, 2], -1.0, 1.0))
    y = np.arctan2(R[0, 2], R[2, 2])
    r = np.arctan2(R[1, 0], R[1, 1])
    return tuple(float(v) for v in np.degrees([y, p, r]))


def rotation_angle_deg(R: np.ndarray) -> float:
    c = (np.trace(np.asarray(R, float)) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def relative_from_T(T_2_from_1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, C2): camera 2's orientation and centre in camera 1's frame, from x_2 = T @ x_1."""
    T = np.asarray(T_2_from_1, float)
    R21, t21 = T[:3, :3], T[:3, 3]
    return R21.T, -R21.T @ t21


def angle_between_deg(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(np.degrees(np.arccos(np.clip(a @ b / (na * nb), -1.0, 1.0))))
