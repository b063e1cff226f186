"""Edge-aware densification: noisy point answers -> dense depth / flow that keeps discontinuities sharp.

Point answers of a VLM are noisy (VLM3-depth: ~12% log error per answer) and sparse. Piecewise-linear
interpolation keeps every answer's noise and smears each depth edge across a whole sample spacing. Here:

1. **Local planes per answer.** Each answer gets a plane (inverse depth, or flow displacement, affine in the
   pixel position) fitted by iteratively reweighted least squares to its ~40 nearest answers, with weights
   that fall with distance (kernel `radius` x the local sample spacing) and with disagreement (|log depth
   ratio| or flow difference beyond `tau`). The fit averages the noise of tens of answers; it is exact on
   planar scenes (inverse depth is affine in the pixel for a plane) and on affine flow.
2. **Image guidance where the answers jump.** Answers whose neighbours disagree with their plane more than
   the image's typical (noise) level mark discontinuity zones (`gate`). There, the planes are refitted
   with the image: a neighbour loses weight when the straight path to it crosses a strong image edge
   (texture-suppressed, thinned colour gradient) or when its colour differs. Outside those zones surface
   texture is ignored, so it does not cut the noise averaging.
3. **Partition of unity per pixel.** A pixel's value is the spatially weighted mean of its nearby answers'
   planes evaluated at the pixel (computed on a block grid and interpolated where the planes agree). Where
   they disagree, the candidates are weighted by image visibility and colour, the pixel takes the surface
   (mode of the candidates' predictions) with the most support, and blends only planes consistent with it.
4. **Confidence** per pixel in [0, 1]: distance to the nearest answer, ambiguity between surfaces (share
   of weight on other surfaces), image edges inside discontinuity zones, the fit residual of the chosen
   planes, and the answers' log-probabilities when the engine reports them (low ones also weigh less).

Vectorised numpy/OpenCV: ~0.5-1.5 s per 640x480 image on one CPU core. `benchmarks/densify_bench.py`
measures it against the query budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import cKDTree

from densify.fields.interpolate import DenseField, reject_outliers

__all__ = ["densify_depth_edge", "densify_flow_edge", "edge_map", "guide_maps", "fit_sample_planes",
           "guided_planes", "reject_flow_outliers", "segment_max", "SamplePlanes"]


# ---------------------------------------------------------------------------------------------- guide

_EDGE_CACHE: dict = {}


def require_contrib() -> None:
    """Fail at once, with the fix, where OpenCV lacks its contrib modules (an opencv-python wheel shadowing
    opencv-contrib-python-headless, as on hosts with their own OpenCV): the edge guide's texture
    suppression needs cv2.ximgproc."""
    if not hasattr(cv2, "ximgproc"):
        raise ImportError(f"the edge-aware densifier and the adaptive plan need OpenCV's contrib modules "
                          f"(cv2.ximgproc), which this OpenCV {cv2.__version__} lacks: pip install "
                          f"opencv-contrib-python-headless (after pip uninstall opencv-python "
                          f"opencv-python-headless, which shadow it), or use --set densify.method=linear "
                          f"--set plan.mode=grid")


def edge_map(rgb: np.ndarray | None, shape: tuple[int, int], *, texture_suppress: bool = True) -> np.ndarray:
    """HxW float32 image-edge strength in [0, 1] (see `guide_maps`)."""
    return guide_maps(rgb, shape, texture_suppress=texture_suppress)[0]


def guide_maps(rgb: np.ndarray | None, shape: tuple[int, int], *,
               texture_suppress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(edges, colour): HxW float32 image-edge strength in [0, 1], thinned to ~2 px (1 = among the image's strongest edges).

    With `texture_suppress`, an edge-preserving global smoother (fast global smoother, guided by the image
    itself) first flattens small-scale surface texture so that object outlines dominate. Non-maximum
    suppression keeps each edge thin (it then marks where a boundary is, not a band around it). Results
    are cached per image content (the adaptive planner and the densifier ask for the same image).
    colour: HxWx3 float32 Lab of the texture-suppressed image (None without an image).
    """
    h, w = shape
    if rgb is None:
        return np.zeros((h, w), np.float32), None
    img = np.asarray(rgb)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    if img.shape[:2] != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    import hashlib

    key = (hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest(), img.shape, bool(texture_suppress))
    hit = _EDGE_CACHE.get(key)
    if hit is not None:
        return hit
    if texture_suppress:
        require_contrib()
        img = cv2.ximgproc.fastGlobalSmootherFilter(img, img, 400.0, 8.0)
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2Lab).astype(np.float32)
    lab = cv2.GaussianBlur(lab, (0, 0), 1.0)
    gx = cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3)
    gxx, gyy, gxy = (gx * gx).sum(2), (gy * gy).sum(2), (gx * gy).sum(2)
    mag = np.sqrt(gxx + gyy)
    # Dominant gradient direction of the colour image (structure tensor), then non-maximum suppression.
    ang = 0.5 * np.arctan2(2 * gxy, gxx - gyy)
    q = (np.round(ang / (np.pi / 4)) % 4).astype(np.int8)   # 0: x, 1: diagonal, 2: y, 3: anti-diagonal
    pad = np.pad(mag, 1, mode="edge")
    nb = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros((h, w), bool)
    for d, ((ay, ax), (by, bx)) in nb.items():
        m1 = pad[1 + ay:1 + ay + h, 1 + ax:1 + ax + w]
        m2 = pad[1 + by:1 + by + h, 1 + bx:1 + bx + w]
        keep |= (q == d) & (mag >= m1) & (mag >= m2)
    thin = np.where(keep, mag, 0.0).astype(np.float32)
    thin = cv2.dilate(thin, np.ones((2, 2), np.uint8))       # closes diagonal gaps for line sampling
    ref = float(np.percentile(mag, 97))
    out = np.zeros((h, w), np.float32) if ref <= 1e-6 else np.clip(thin / ref, 0.0, 1.0).astype(np.float32)
    if len(_EDGE_CACHE) > 8:
        _EDGE_CACHE.clear()
    _EDGE_CACHE[key] = (out, cv2.blur(lab, (3, 3)))
    return _EDGE_CACHE[key]


def segment_max(edges: np.ndarray, x0, y0, x1, y1, *, step: float = 1.0, skip: float = 1.0) -> np.ndarray:
    """Strongest edge value on each straight segment (x0, y0) -> (x1, y1), ignoring `skip` px at both ends."""
    h, w = edges.shape
    x0, y0, x1, y1 = (np.asarray(a, np.float32) for a in np.broadcast_arrays(x0, y0, x1, y1))
    seg = np.sqrt((x1 - x0) ** 2 + (y1 - y0) ** 2)
    out = np.zeros(seg.shape, np.float32)
    if seg.size == 0:
        return out
    steps = int(np.clip(np.ceil(float(seg.max()) / step), 1, 64))
    lo = np.minimum(skip / np.maximum(seg, 1e-6), 0.5)
    span = 1.0 - 2 * lo
    for t in (np.arange(steps, dtype=np.float32) + 0.5) / steps:
        tt = lo + t * span
        xs = np.clip(np.rint(x0 + tt * (x1 - x0)), 0, w - 1).astype(np.int32)
        ys = np.clip(np.rint(y0 + tt * (y1 - y0)), 0, h - 1).astype(np.int32)
        np.maximum(out, edges[ys, xs], out=out)
    return out


# ---------------------------------------------------------------------------------------------- planes

@dataclass
class SamplePlanes:
    """A local affine model per kept answer: value(x, y) = base + gx * x + gy * y (per channel)."""

    xy: np.ndarray
    """Nx2 answer positions (pixels)."""
    base: np.ndarray
    """NxC value at pixel (0, 0) (inverse depth: C = 1; flow displacement: C = 2)."""
    gx: np.ndarray
    gy: np.ndarray
    spacing: np.ndarray
    """N: local sample spacing (mean distance to the 4 nearest other answers)."""
    resid: np.ndarray
    """N: weighted RMS disagreement of the neighbours with the plane (log ratio or pixels)."""
    weight: np.ndarray
    """N: the answer's own confidence (from log-probabilities; 1 without)."""
    jump: np.ndarray
    """N: RMS disagreement of the close neighbours' answers with this plane (high at discontinuities)."""

    @property
    def center(self) -> np.ndarray:
        """NxC denoised value at each answer's own pixel."""
        return self.base + self.gx * self.xy[:, :1] + self.gy * self.xy[:, 1:]

    def predict(self, idx: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Planes `idx` (any shape) evaluated at pixels (px, py) (broadcastable) -> idx.shape + (C,)."""
        return (self.base[idx] + self.gx[idx] * np.asarray(px)[..., None]
                + self.gy[idx] * np.asarray(py)[..., None])


def _colour_at(colour: np.ndarray, xy: np.ndarray) -> np.ndarray:
    h, w = colour.shape[:2]
    xi = np.clip(np.rint(xy[:, 0]).astype(int), 0, w - 1)
    yi = np.clip(np.rint(xy[:, 1]).astype(int), 0, h - 1)
    return colour[yi, xi].astype(np.float32)


def _colour_w(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    """Colour-similarity weight between Lab colours (..., 3); a 4th channel (gate in [0, 1]) scales the
    colour distance (the larger gate of the two counts)."""
    dc2 = ((a[..., :3] - b[..., :3]) ** 2).sum(-1)
    if a.shape[-1] > 3:
        dc2 = dc2 * np.maximum(a[..., 3], b[..., 3])
    return np.exp(-0.5 * dc2 / sigma ** 2) + 1e-2


def _disagree(kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Disagreement between values (..., C): |log ratio| for inverse depth, Euclidean pixels for flow."""
    if kind == "depth":
        return np.abs(np.log(np.maximum(a[..., 0], 1e-9)) - np.log(np.maximum(b[..., 0], 1e-9)))
    return np.sqrt(((a - b) ** 2).sum(axis=-1))


def _local_spacing(tree: cKDTree, xy: np.ndarray, n: int) -> np.ndarray:
    kk = min(5, n)
    if kk < 2:
        return np.full(n, 50.0)
    d, _ = tree.query(xy, k=kk)
    return np.maximum(d[:, 1:].mean(axis=1), 1.0)


def fit_sample_planes(xy: np.ndarray, vals: np.ndarray, *, kind: str = "depth", k: int = 40,
                      radius: float = 2.5, tau: float = 0.3, weights: np.ndarray | None = None,
                      iters: int = 3, ridge: float = 1e-3, edges: np.ndarray | None = None,
                      edge_sigma: float = 0.3, colour: np.ndarray | None = None,
                      colour_sigma: float = 20.0) -> SamplePlanes:
    """Robust local affine fits (see module docstring); vals NxC (inverse depth or displacement).

    With `edges`, a neighbour whose straight path to the answer crosses a strong image edge loses weight
    (exp(-0.5 (edge / edge_sigma)^2)): the plane then stays on its own side of an object outline. With
    `colour` (HxWx3 Lab), neighbours of another colour lose weight too (exp(-0.5 (dLab / colour_sigma)^2)).
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    vals = np.asarray(vals, np.float64).reshape(len(xy), -1)
    n, C = vals.shape
    sw = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    tree = cKDTree(xy)
    spacing = _local_spacing(tree, xy, n)
    kk = min(k, n)
    dist, idx = tree.query(xy, k=kk)
    dist, idx = dist.reshape(n, kk), idx.reshape(n, kk)
    dx = xy[idx, 0] - xy[:, None, 0]
    dy = xy[idx, 1] - xy[:, None, 1]
    sig = radius * spacing[:, None]
    w_sp = np.exp(-0.5 * (dist / sig) ** 2) * sw[idx]
    if edges is not None:
        e = segment_max(edges, xy[:, None, 0], xy[:, None, 1], xy[idx, 0], xy[idx, 1])
        w_sp = w_sp * (np.exp(-0.5 * (e / edge_sigma) ** 2) + 1e-3)
    if colour is not None:
        cs = _colour_at(colour, xy)
        w_sp = w_sp * _colour_w(cs[idx], cs[:, None, :], colour_sigma)
    nb = vals[idx]                                    # N x k x C
    # Slopes are fitted in units of "per local spacing" so the ridge is scale-free.
    s = spacing[:, None]
    A = np.stack([np.ones_like(dx), dx / s, dy / s], axis=-1)  # N x k x 3
    ref = np.broadcast_to(vals[:, None, :], nb.shape)           # first pass: the answer's own value
    coef = np.zeros((n, 3, C))
    R = np.diag([1e-9, ridge, ridge])
    for _ in range(max(1, iters)):
        r = _disagree(kind, nb, ref)
        w = w_sp * np.exp(-0.5 * (r / tau) ** 2)
        w[:, 0] = np.maximum(w[:, 0], 1e-6)           # the answer itself always counts a little
        AtW = A.transpose(0, 2, 1) * w[:, None, :]    # N x 3 x k
        M = AtW @ A + R[None] * w.sum(axis=1)[:, None, None]
        rhs = AtW @ nb                                 # N x 3 x C
        coef = np.linalg.solve(M, rhs)
        ref = A @ coef                                 # plane predictions at the neighbours
    r = _disagree(kind, nb, ref)
    w = w_sp * np.exp(-0.5 * (r / tau) ** 2)
    resid = np.sqrt((w * r ** 2).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-12))
    gxs = coef[:, 1, :] / spacing[:, None]
    gys = coef[:, 2, :] / spacing[:, None]
    base = coef[:, 0, :] - gxs * xy[:, :1] - gys * xy[:, 1:]
    # Roughness: RMS disagreement of the close neighbours' answers with the plane (largest one dropped, so
    # that one stray answer does not count). Smooth surfaces give the answer noise; a discontinuity, more.
    close = (dist <= 1.8 * spacing[:, None]) & (np.arange(kk)[None, :] > 0)
    r2 = np.where(close, r, 0.0) ** 2
    cnt = close.sum(axis=1)
    jump = np.sqrt((r2.sum(axis=1) - r2.max(axis=1)) / np.maximum(cnt - 1, 1))
    return SamplePlanes(xy, base, gxs, gys, spacing, resid, sw, jump)


# ---------------------------------------------------------------------------------------------- pixels

def _gate(planes: SamplePlanes, shape, lo: float, hi: float) -> np.ndarray:
    """HxW in [0, 1]: where the answers themselves show a discontinuity, spread 1.5 spacings.

    An answer's roughness (`jump`) is compared with the image's typical roughness (the answer noise):
    0 below lo x typical, 1 above hi x typical.
    """
    h, w = shape
    g = np.zeros((h, w), np.float32)
    xi = np.clip(np.rint(planes.xy[:, 0]).astype(int), 0, w - 1)
    yi = np.clip(np.rint(planes.xy[:, 1]).astype(int), 0, h - 1)
    typ = max(float(np.median(planes.jump)), 1e-6)
    s = np.clip((planes.jump / typ - lo) / max(hi - lo, 1e-9), 0, 1).astype(np.float32)
    np.maximum.at(g, (yi, xi), s)
    r = int(np.ceil(1.5 * float(np.median(planes.spacing))))
    ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(g, ker)


def _blend(planes: SamplePlanes, shape: tuple[int, int], edges: np.ndarray, *, kind: str, k: int,
           blend_radius: float, tau: float, edge_sigma: float, block: int | None,
           colour: np.ndarray | None = None, colour_sigma: float = 20.0):
    """Per-pixel partition of unity over nearby answers' planes with image-guided side selection.

    The plain blend is smooth wherever the candidate planes agree, so it is computed on a grid of
    b x b block centres and interpolated bilinearly; blocks near disagreeing planes are done per pixel,
    with the image deciding the side. Returns values (HxWxC), ambiguity (HxW, share of weight on other
    surfaces), resid (HxW), nearest answer distance (HxW), and the zone (HxW bool) where planes disagree.
    """
    h, w = shape
    n = len(planes.xy)
    kk = min(k, n)
    tree = cKDTree(planes.xy)
    glob = float(np.sqrt(h * w / max(n, 1)))
    b = int(block or np.clip(round(glob / 3), 2, 8))
    sx = planes.xy[:, 0].astype(np.float32)
    sy = planes.xy[:, 1].astype(np.float32)
    sp = planes.spacing.astype(np.float32)
    sw = planes.weight.astype(np.float32)
    base = planes.base.astype(np.float32)
    pgx = planes.gx.astype(np.float32)
    pgy = planes.gy.astype(np.float32)
    pres = planes.resid.astype(np.float32)
    C = base.shape[1]

    def evaluate(px, py, idx):
        """Plain blend at points (P x 1 arrays) over candidates idx (P x k)."""
        d2 = (px - sx[idx]) ** 2 + (py - sy[idx]) ** 2
        near = idx[np.arange(len(idx)), d2.argmin(axis=1)]
        wsp = np.exp(-d2 * (0.5 / (blend_radius * sp[near]) ** 2)[:, None]) * sw[idx] + 1e-12
        pred = base[idx] + pgx[idx] * px[..., None] + pgy[idx] * py[..., None]  # P x k x C
        if kind == "depth":
            np.maximum(pred, 1e-4, out=pred)
            feat = np.log(pred)
        else:
            feat = pred
        wn = wsp / wsp.sum(axis=1, keepdims=True)
        mu = (wn[..., None] * feat).sum(axis=1, keepdims=True)
        dev = np.sqrt(((feat - mu) ** 2).sum(-1))
        spread = np.max(np.where(wn > 0.02, dev, 0.0), axis=1)
        val = (wn[..., None] * pred).sum(axis=1)
        resid = (wn * pres[idx]).sum(axis=1)
        return wsp, pred, feat, spread, val, resid

    # Block centres, with one extra ring outside the image so that interpolation covers every pixel.
    nby, nbx = (h + b - 1) // b + 2, (w + b - 1) // b + 2
    by, bx = np.mgrid[0:nby, 0:nbx]
    cx = ((bx.ravel() - 1 + 0.5) * b - 0.5).astype(np.float32)[:, None]
    cy = ((by.ravel() - 1 + 0.5) * b - 0.5).astype(np.float32)[:, None]
    _, cidx = tree.query(np.hstack([cx, cy]), k=kk, workers=-1)
    cidx = cidx.reshape(len(cx), kk)
    _, _, _, spread_c, val_c, res_c = evaluate(cx, cy, cidx)
    zone_c = (spread_c > 0.5 * tau).reshape(nby, nbx).astype(np.uint8)
    zone_c = cv2.dilate(zone_c, np.ones((3, 3), np.uint8)) > 0
    # Bilinear interpolation of the block-centre values to every pixel.
    fy = (np.arange(h, dtype=np.float32) + 0.5) / b - 0.5 + 1
    fx = (np.arange(w, dtype=np.float32) + 0.5) / b - 0.5 + 1
    y0 = np.clip(np.floor(fy).astype(int), 0, nby - 2)
    x0 = np.clip(np.floor(fx).astype(int), 0, nbx - 2)
    ty = (fy - y0)[:, None, None]
    tx = (fx - x0)[None, :, None]
    grid = np.concatenate([val_c, res_c[:, None]], axis=1).reshape(nby, nbx, C + 1)
    up = ((1 - ty) * ((1 - tx) * grid[y0][:, x0] + tx * grid[y0][:, x0 + 1])
          + ty * ((1 - tx) * grid[y0 + 1][:, x0] + tx * grid[y0 + 1][:, x0 + 1]))
    val = up[..., :C].reshape(h * w, C)
    resid = up[..., C].reshape(h * w)
    ambiguity = np.zeros(h * w, np.float32)
    zone = np.zeros(h * w, bool)
    # Per pixel where planes may disagree.
    gy, gx = np.mgrid[0:h, 0:w]
    blk = ((gy // b + 1) * nbx + (gx // b + 1)).ravel()
    todo = np.flatnonzero(zone_c.ravel()[blk])
    scol = _colour_at(colour, planes.xy) if colour is not None else None
    pcol = colour.reshape(h * w, -1) if colour is not None else None
    for chunk in np.array_split(todo, max(1, len(todo) // 30000 + 1)):
        if len(chunk) == 0:
            continue
        idx = cidx[blk[chunk]]
        px = (chunk % w).astype(np.float32)[:, None]
        py = (chunk // w).astype(np.float32)[:, None]
        wsp, pred, feat, spread, v, r = evaluate(px, py, idx)
        val[chunk], resid[chunk] = v, r
        z = spread > 0.5 * tau
        zone[chunk] = z
        if not z.any():
            continue
        sel = np.flatnonzero(z)
        ia, wz, fz, pz = idx[sel], wsp[sel], feat[sel], pred[sel]
        # Visibility: the strongest image edge on the straight path from the pixel to each candidate.
        e = segment_max(edges, px[sel], py[sel], sx[ia], sy[ia])
        vis = np.exp(-0.5 * (e / edge_sigma) ** 2) + 0.01
        if pcol is not None:
            vis = vis * _colour_w(scol[ia], pcol[chunk[sel]][:, None, :], colour_sigma)
        wa = wz * vis
        diff = np.sqrt(((fz[:, :, None, :] - fz[:, None, :, :]) ** 2).sum(-1))  # c x k x k
        same = np.exp(-0.5 * (diff / tau) ** 2)
        support = (wa[:, None, :] * same).sum(axis=2)        # support of each candidate's surface
        best = support.argmax(axis=1)
        keep = same[np.arange(len(sel)), best]                # consistent with the chosen surface
        wf = wa * keep
        amb = np.maximum(1.0 - wf.sum(axis=1) / np.maximum(wa.sum(axis=1), 1e-12),
                         1.0 - (wz * keep).sum(axis=1) / wz.sum(axis=1))
        ambiguity[chunk[sel]] = amb
        wn = wf / wf.sum(axis=1, keepdims=True)
        val[chunk[sel]] = (wn[..., None] * pz).sum(axis=1)
        resid[chunk[sel]] = (wn * pres[ia]).sum(axis=1)
    # Distance to the nearest answer.
    mask = np.full((h, w), 255, np.uint8)
    xi = np.clip(np.rint(planes.xy[:, 0]).astype(int), 0, w - 1)
    yi = np.clip(np.rint(planes.xy[:, 1]).astype(int), 0, h - 1)
    mask[yi, xi] = 0
    dmin = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    return (val.reshape(h, w, C), ambiguity.reshape(h, w), resid.reshape(h, w), dmin, zone.reshape(h, w))


def _confidence(dmin, ambiguity, zone, edges, resid, res_scale, glob_spacing, sample_conf=None):
    c_dist = np.exp(-0.5 * (dmin / max(glob_spacing, 1e-6)) ** 2)
    c_amb = 1.0 - ambiguity
    near_edge = cv2.GaussianBlur(edges, (0, 0), 2.0) * 2.0
    c_edge = 1.0 - 0.6 * np.clip(near_edge, 0, 1) * zone      # image edges where the surfaces disagree
    c_fit = np.exp(-0.5 * (resid / max(res_scale, 1e-9)) ** 2)
    c = c_dist * c_amb * c_edge * (0.5 + 0.5 * c_fit)
    if sample_conf is not None:
        c = c * sample_conf
    return np.clip(c, 0.0, 1.0).astype(np.float32)


def _shape_of(rgb, shape):
    if shape is not None:
        return int(shape[0]), int(shape[1])
    if rgb is None:
        raise ValueError("give the guide image (rgb) or shape=(H, W)")
    return int(rgb.shape[0]), int(rgb.shape[1])


def _lp_weights(logprobs, n, scale):
    if logprobs is None:
        return None
    lp = np.asarray(logprobs, float).reshape(-1)
    if len(lp) != n or not np.isfinite(lp).any():
        return None
    med = float(np.nanmedian(lp))
    lp = np.where(np.isfinite(lp), lp, med)
    # Relative to the image's typical answer: log-probabilities are only comparable within one model.
    return np.clip(np.exp((lp - med) / max(scale, 1e-9)), 1e-3, 1.0)


def guided_planes(xy, vals, rgb, shape, *, kind: str = "depth", tau: float = 0.3, sw=None, k_fit: int = 40,
                  radius: float = 2.5, edge_sigma: float = 0.3, texture_suppress: bool = True, iters: int = 3,
                  gate=(1.3, 1.8), colour_sigma: float | None = 20.0) -> SamplePlanes:
    """Local planes per answer, image-guided where the answers jump (what `densify_*_edge` fits)."""
    return _guided(xy, vals, rgb, shape, kind=kind, tau=tau, sw=sw, k_fit=k_fit, radius=radius,
                   edge_sigma=edge_sigma, texture_suppress=texture_suppress, iters=iters, gate=gate,
                   colour_sigma=colour_sigma)[0]


def _field(xy, vals, rgb, shape, *, kind, tau, sw, k_fit, radius, k_blend, blend_radius, edge_sigma,
           texture_suppress, iters, block, gate, colour_sigma):
    """The shared core: planes (range-robust, then image-guided where answers jump) and the blend."""
    planes, edges, colour = _guided(xy, vals, rgb, shape, kind=kind, tau=tau, sw=sw, k_fit=k_fit,
                                    radius=radius, edge_sigma=edge_sigma, texture_suppress=texture_suppress,
                                    iters=iters, gate=gate, colour_sigma=colour_sigma)
    out = _blend(planes, shape, edges, kind=kind, k=k_blend, blend_radius=blend_radius, tau=tau,
                 edge_sigma=edge_sigma, block=block, colour=colour, colour_sigma=colour_sigma or 20.0)
    return planes, edges, out


def _guided(xy, vals, rgb, shape, *, kind, tau, sw, k_fit, radius, edge_sigma, texture_suppress, iters, gate,
            colour_sigma):
    h, w = shape
    edges, colour = guide_maps(rgb, (h, w), texture_suppress=texture_suppress)
    planes = fit_sample_planes(xy, vals, kind=kind, k=k_fit, radius=radius, tau=tau, weights=sw, iters=iters)
    if colour_sigma is None:
        colour = None
    if rgb is not None:
        g = None
        if gate is not None:
            # Only near a jump in the answers does the image decide: texture edges and colour changes
            # elsewhere would just cut the noise averaging.
            g = _gate(planes, (h, w), gate[0], gate[1])
            edges = edges * g
        if colour is not None and g is not None:
            # Outside the gated zones colour differences are scaled away so they do not cut support there
            # (a 4th channel carries the gate; see _colour_w).
            colour = np.concatenate([colour, g[..., None]], axis=2)
        planes = fit_sample_planes(xy, vals, kind=kind, k=k_fit, radius=radius, tau=tau, weights=sw,
                                   iters=iters, edges=edges, edge_sigma=edge_sigma, colour=colour,
                                   colour_sigma=colour_sigma or 20.0)
    return planes, edges, colour


# ---------------------------------------------------------------------------------------------- depth

def densify_depth_edge(pixels, values, rgb, *, outliers: bool = True, logprobs=None, shape=None,
                       k_fit: int = 40, radius: float = 2.5, tau: float = 0.3, k_blend: int = 12,
                       blend_radius: float = 0.9, edge_sigma: float = 0.3, texture_suppress: bool = True,
                       gate: tuple[float, float] | None = (1.3, 1.8), colour_sigma: float | None = 20.0,
                       logprob_scale: float = 1.0,
                       iters: int = 3, block: int | None = None) -> DenseField:
    """Sparse depth answers (Nx2 pixels, N metres) + guide image -> dense HxW depth (see module doc).

    outliers: drop answers that disagree with their neighbours first (as `densify_depth`).
    logprobs: N answer log-probabilities (NaN = unknown): an answer weighs
        min(1, exp((logprob - median logprob) / logprob_scale)).
    radius: plane-fit kernel, in local sample spacings (larger = more noise averaging, more bias on curves).
    tau: log-depth disagreement treated as another surface. blend_radius: per-pixel kernel, in spacings.
    edge_sigma: image-edge strength (0-1) at which a path to an answer counts as crossing a boundary.
    gate: (lo, hi): image edges count only near answers whose roughness exceeds lo..hi times the typical
        (answer-noise) roughness; None: every image edge counts.
    rgb may be None (then shape=(H, W) is needed and no image guidance is used).
    """
    h, w = _shape_of(rgb, shape)
    xy = np.asarray(pixels, float).reshape(-1, 2)
    depth = np.asarray(values, float).reshape(-1)
    ok = np.isfinite(depth) & (depth > 0) & np.all(np.isfinite(xy), axis=1)
    used = ok.copy()
    if outliers and ok.sum() > 4:
        sub = reject_outliers(xy[ok], depth[ok])
        used[np.flatnonzero(ok)[~sub]] = False
    if used.sum() == 0:
        return DenseField(np.full((h, w), np.nan, np.float32), np.zeros((h, w), np.float32), used)
    lpw = _lp_weights(logprobs, len(depth), logprob_scale)
    sw = None if lpw is None else lpw[used]
    pts = xy[used]
    planes, edges, (val, amb, resid, dmin, zone) = _field(
        pts, 1.0 / depth[used], rgb, (h, w), kind="depth", tau=tau, sw=sw, k_fit=k_fit, radius=radius,
        k_blend=k_blend, blend_radius=blend_radius, edge_sigma=edge_sigma, texture_suppress=texture_suppress,
        iters=iters, block=block, gate=gate, colour_sigma=colour_sigma)
    depth_map = 1.0 / np.maximum(val[..., 0], 1e-6)
    lo, hi = depth[used].min(), depth[used].max()
    depth_map = np.clip(depth_map, 0.5 * lo, 2.0 * hi)
    glob = float(np.sqrt(h * w / len(pts)))
    sconf = _pixel_sample_conf(planes, sw, (h, w)) if sw is not None else None
    conf = _confidence(dmin, amb, zone, edges, resid, tau, glob, sconf)
    return DenseField(depth_map.astype(np.float32), conf, used)


def _pixel_sample_conf(planes: SamplePlanes, sw: np.ndarray, shape) -> np.ndarray:
    """Answer confidences spread to pixels (nearest answer, lightly smoothed)."""
    h, w = shape
    gy, gx = np.mgrid[0:h, 0:w]
    _, nn = cKDTree(planes.xy).query(np.stack([gx.ravel(), gy.ravel()], 1), k=1, workers=-1)
    m = sw[nn].reshape(h, w).astype(np.float32)
    s = float(np.median(planes.spacing))
    m = cv2.GaussianBlur(m, (0, 0), max(s / 2, 0.5))
    return np.sqrt(np.clip(m, 0, 1))


# ---------------------------------------------------------------------------------------------- flow

def reject_flow_outliers(xy: np.ndarray, disp: np.ndarray, *, k: int = 8, thresh: float = 20.0,
                         min_support: int = 3) -> np.ndarray:
    """Flag matches whose displacement differs from their k neighbours' median by > thresh pixels (and
    from their nearest neighbour's): the flow analogue of `reject_outliers`."""
    n = len(xy)
    keep = np.ones(n, dtype=bool)
    if n < min_support + 1:
        return keep
    _, idx = cKDTree(xy).query(xy, k=min(k + 1, n))
    med = np.median(disp[idx[:, 1:]], axis=1)
    far = np.linalg.norm(disp - med, axis=1) > thresh
    near = np.linalg.norm(disp - disp[idx[:, 1]], axis=1) > thresh
    return ~(far & near)


def densify_flow_edge(pixels, targets, rgb, *, outliers: bool = True, logprobs=None, shape=None,
                      k_fit: int = 40, radius: float = 2.5, tau: float = 6.0, k_blend: int = 12,
                      blend_radius: float = 0.9, edge_sigma: float = 0.3, texture_suppress: bool = True,
                      gate: tuple[float, float] | None = (1.3, 1.8), colour_sigma: float | None = 20.0,
                      outlier_thresh: float = 20.0,
                      logprob_scale: float = 1.0, iters: int = 3, block: int | None = None) -> DenseField:
    """Sparse matches (Nx2 pixels in image 1 -> Nx2 pixels in image 2) + image 1 -> dense HxWx2 targets.

    The displacement is modelled as locally affine per answer (exact for affine flow); `tau` (pixels) is the
    displacement difference treated as another surface (motion boundary / occlusion). Options as
    `densify_depth_edge`; confidence also falls where neighbouring matches disagree.
    """
    h, w = _shape_of(rgb, shape)
    xy = np.asarray(pixels, float).reshape(-1, 2)
    tgt = np.asarray(targets, float).reshape(-1, 2)
    used = np.all(np.isfinite(tgt), axis=1) & np.all(np.isfinite(xy), axis=1)
    disp = tgt - xy
    if outliers and used.sum() > 4:
        sub = reject_flow_outliers(xy[used], disp[used], thresh=outlier_thresh)
        used[np.flatnonzero(used)[~sub]] = False
    if used.sum() == 0:
        return DenseField(np.full((h, w, 2), np.nan, np.float32), np.zeros((h, w), np.float32), used)
    lpw = _lp_weights(logprobs, len(xy), logprob_scale)
    sw = None if lpw is None else lpw[used]
    pts = xy[used]
    planes, edges, (val, amb, resid, dmin, zone) = _field(
        pts, disp[used], rgb, (h, w), kind="flow", tau=tau, sw=sw, k_fit=k_fit, radius=radius,
        k_blend=k_blend, blend_radius=blend_radius, edge_sigma=edge_sigma, texture_suppress=texture_suppress,
        iters=iters, block=block, gate=gate, colour_sigma=colour_sigma)
    gy, gx = np.mgrid[0:h, 0:w]
    field = val + np.stack([gx, gy], -1)
    glob = float(np.sqrt(h * w / len(pts)))
    sconf = _pixel_sample_conf(planes, sw, (h, w)) if sw is not None else None
    conf = _confidence(dmin, amb, zone, edges, resid, tau, glob, sconf)
    return DenseField(field.astype(np.float32), conf, used)
