"""Global camera poses from pairwise relative poses: Open3D pose-graph optimisation.

Open3D's convention (checked by a round-trip test): a PoseGraphNode's pose is that camera's
camera-to-world transform, and a PoseGraphEdge(source, target, T) says x_target = T @ x_source, i.e.
T = inv(pose_target) @ pose_source. A PairPose's metric T (camera 1 -> camera 2) is exactly that with
source = image 1 and target = image 2.

Only the largest connected component of the pair graph can be placed in one frame; the rest is reported
as dropped. The world frame is the reference camera's frame (the first image of the component).

Robustness: the initial poses come from the spanning tree most edges agree with (random trees, scored by
consensus), so one wrong pair in the tree cannot hold the graph in a wrong basin. "Uncertain" edges (loop
closures, retrieved pairs) are then weighed by Open3D's line process
(Choi et al. 2015), which down-weighs and prunes edges that disagree with the rest. Its scale,
`max_correspondence_distance`, is how far (metres) an edge may move the points it relates before it counts
as an outlier; a loop whose chained odometry has drifted further than that would have its closing edges
pruned instead of closing it. So the optimisation runs coarse to fine (graduated non-convexity): first with
the distance times each of `coarse_scales` and nothing pruned, each pass starting where the last ended,
then at the distance itself with pruning. Edges pruned from the images' only links drop those images.

Short pairs first: a metric pose from PnP on a monocular depth map is off by the depth errors its points
share (per object, smooth fields), and those move the pose in proportion to the baseline (a pure rotation
does not depend on depth at all). Such errors are shared, so they verify and agree with each other well
enough to pass the line process, and an exhaustive set's many wide pairs outvote its short ones. So each
image keeps only its `short_edges_per_image` shortest pairs (certain edges always stay; a left-out edge
that alone joins two parts of the graph is put back), measured on the unordered 24-view benchmark set
(benchmarks/reconstruct_sets.py).
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

__all__ = ["PoseEdge", "PoseGraphConfig", "PoseGraphResult", "connected_components", "optimize_poses",
           "information_from_points", "relative_residual", "short_edges"]


class PoseGraphConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    optimize: bool = Field(True, description="run Levenberg-Marquardt (else keep the spanning-tree chain)")
    loop_edges_uncertain: bool = Field(True, description="edges other than a sequence's "
                                         "consecutive pairs (skips, loops, retrieved pairs) may be pruned")
    max_correspondence_distance: float = Field(0.05, gt=0, description="metres; scales the line process "
                                               "that weighs uncertain edges (Open3D)")
    edge_prune_threshold: float = Field(0.25, ge=0, le=1, description="uncertain edges whose line-process "
                                        "weight falls below this are dropped")
    preference_loop_closure: float = Field(1.0, ge=0, description="weight of uncertain edges vs odometry")
    coarse_scales: list[float] = Field([16.0, 4.0], description="passes before the final one, each at "
                                       "max_correspondence_distance times this and without pruning, so a loop "
                                       "that drifted further than that distance still closes ([]: one pass)")
    tree_trials: int = Field(50, ge=1, description="random spanning trees tried for the initial poses (the one "
                             "most edges agree with wins), when some edges are uncertain")
    tree_inlier_ratio: float = Field(0.1, gt=0, description="an edge agrees with a tree's poses when they move its "
                                     "points by less than this fraction of their distance (0.1: ~6 degrees)")
    seed: int = Field(0, description="seed of the random spanning trees (results are reproducible)")
    short_edges_per_image: int = Field(4, ge=0, description="each image keeps its this many shortest pairs "
                                       "(metric baseline); longer uncertain pairs are left out unless they alone "
                                       "connect the graph (0: every pair enters)")
    scale_pairs: bool = Field(True, description="divide each pair's metric translation by its first image's "
                              "depth scale as the other views estimate it (the fusion scale check's), so pairs "
                              "whose metres come from different depth maps agree")


@dataclass
class PoseEdge:
    """A relative pose between two images (indices), metric: x_j = T @ x_i."""

    i: int
    j: int
    T: np.ndarray
    information: np.ndarray | None = None
    """6x6 (Open3D order: rotation, then translation); default: identity times `weight`."""
    weight: float = 1.0
    uncertain: bool = False


@dataclass
class PoseGraphResult:
    cam_to_world: dict[int, np.ndarray]
    """image index -> 4x4 camera-to-world (world = the reference camera)."""
    reference: int | None
    component: list[int]
    dropped: list[int]
    """Images with no path of usable pairs to the reference."""
    pruned_edges: list[tuple[int, int]] = field(default_factory=list)
    """Uncertain edges the optimiser rejected."""
    long_edges: list[tuple[int, int]] = field(default_factory=list)
    """Uncertain edges left out before optimising: each of their images has enough shorter pairs."""


def information_from_points(points_target: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Information matrix of a rigid alignment supported by 3D points (target frame), as Open3D computes
    it for point clouds: sum of G^T G with G = [-skew(p) | I]."""
    p = np.asarray(points_target, float).reshape(-1, 3)
    G = np.zeros((len(p), 3, 6))
    G[:, 0, 1], G[:, 0, 2] = p[:, 2], -p[:, 1]
    G[:, 1, 0], G[:, 1, 2] = -p[:, 2], p[:, 0]
    G[:, 2, 0], G[:, 2, 1] = p[:, 1], -p[:, 0]
    G[:, :, 3:] = np.eye(3)
    return scale * np.einsum("nki,nkj->ij", G, G)


class _Parts:
    """Union-find over images: which part of the pair graph each is in."""

    def __init__(self, nodes):
        self.parent = {n: n for n in nodes}

    def find(self, a):
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def join(self, a, b) -> bool:
        """Join the parts of a and b; False when they were one part already."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True


def connected_components(nodes: list[int], edges: list[PoseEdge]) -> list[list[int]]:
    """Components of the pair graph, largest first (ties: the one holding the earliest image)."""
    parts = _Parts(nodes)
    for e in edges:
        if e.i in parts.parent and e.j in parts.parent:
            parts.join(e.i, e.j)
    comps: dict[int, list[int]] = {}
    for n in nodes:
        comps.setdefault(parts.find(n), []).append(n)
    return sorted((sorted(c) for c in comps.values()), key=lambda c: (-len(c), c[0]))


def short_edges(edges: list[PoseEdge], k: int) -> tuple[list[PoseEdge], list[PoseEdge]]:
    """(kept, left out): every certain edge and each image's k shortest edges (metric baseline); a left-out
    edge that joins two parts the kept ones leave apart is put back, shortest first (k <= 0: all kept)."""
    if k <= 0 or not edges:
        return list(edges), []
    length = [float(np.linalg.norm(e.T[:3, 3])) for e in edges]
    by_image: dict[int, list[int]] = {}
    for q, e in enumerate(edges):
        by_image.setdefault(e.i, []).append(q)
        by_image.setdefault(e.j, []).append(q)
    keep = {q for q, e in enumerate(edges) if not e.uncertain}
    for qs in by_image.values():
        keep.update(sorted(qs, key=lambda q: (length[q], q))[:k])
    parts = _Parts(by_image)
    for q in keep:
        parts.join(edges[q].i, edges[q].j)
    for q in sorted(set(range(len(edges))) - keep, key=lambda q: (length[q], q)):  # Kruskal over the rest
        if parts.join(edges[q].i, edges[q].j):
            keep.add(q)
    return [e for q, e in enumerate(edges) if q in keep], [e for q, e in enumerate(edges) if q not in keep]


def _spanning_tree_poses(root: int, comp: set[int], edges: list[PoseEdge],
                         weights: list[float] | None = None) -> dict[int, np.ndarray]:
    """Chain relative poses along a maximum-weight spanning tree (certain edges preferred)."""
    adj: dict[int, list[tuple[float, int, np.ndarray]]] = {n: [] for n in comp}
    for k, e in enumerate(edges):
        if e.i in comp and e.j in comp:
            w = weights[k] if weights is not None else e.weight * (0.5 if e.uncertain else 1.0)
            adj[e.i].append((w, e.j, e.T))                    # x_j = T x_i
            adj[e.j].append((w, e.i, np.linalg.inv(e.T)))     # x_i = T^-1 x_j
    poses = {root: np.eye(4)}
    heap = [(-w, n, k, T, root) for k, (w, n, T) in enumerate(adj[root])]
    heapq.heapify(heap)
    count = len(heap)
    while heap:
        _, n, _, T, frm = heapq.heappop(heap)
        if n in poses:
            continue
        # pose_n = pose_frm @ inv(T_n_from_frm)
        poses[n] = poses[frm] @ np.linalg.inv(T)
        for w, m, T2 in adj[n]:
            if m not in poses:
                count += 1
                heapq.heappush(heap, (-w, m, count, T2, n))
    return poses


def relative_residual(e: PoseEdge, poses: dict[int, np.ndarray]) -> float:
    """How far the poses move the points supporting edge e from where the edge puts them: RMS displacement
    over RMS distance of those points (from the edge's information matrix, as Open3D weighs edges)."""
    from scipy.spatial.transform import Rotation

    D = np.linalg.inv(poses[e.j]) @ poses[e.i] @ np.linalg.inv(e.T)  # identity when the edge agrees
    x = np.r_[Rotation.from_matrix(D[:3, :3]).as_rotvec(), D[:3, 3]]
    info = e.information if e.information is not None else np.eye(6) * e.weight
    n = max(float(info[5, 5]), 1e-12)
    spread = max(float(np.trace(info[:3, :3])) / (2 * n), 1e-12)  # mean squared distance of the points
    return float(np.sqrt(max(x @ info @ x, 0.0) / n / spread))


def _consensus_tree(root: int, comp: set[int], edges: list[PoseEdge], cfg: "PoseGraphConfig") -> dict:
    """Initial poses from the spanning tree most edges agree with (RANSAC over random spanning trees).

    One wrong edge in the tree that seeds the optimiser can hold the whole graph in a wrong basin; so
    random trees (certain edges always preferred, uncertain ones by randomly scaled weight) are scored by
    how many edges agree with their poses within `tree_inlier_ratio`, and the best one seeds the graph."""
    base = [e.weight * (0.5 if e.uncertain else 1.0) for e in edges]
    best, best_key = None, None
    rng = np.random.default_rng(cfg.seed)
    top = max(base) if base else 1.0
    for t in range(cfg.tree_trials if any(e.uncertain for e in edges) else 1):
        w = base if t == 0 else [b + 10 * top if not e.uncertain else b * rng.uniform(0.05, 1.0)
                                 for b, e in zip(base, edges)]
        poses = _spanning_tree_poses(root, comp, edges, w)
        res = [relative_residual(e, poses) for e in edges if e.i in comp and e.j in comp]
        key = (sum(r < cfg.tree_inlier_ratio for r in res), -float(np.sum(np.minimum(res, cfg.tree_inlier_ratio))))
        if best_key is None or key > best_key:
            best, best_key = poses, key
    return best


def _optimise(graph, option):
    """One Levenberg-Marquardt run of Open3D's global optimisation (quietly); returns the graph."""
    import open3d as o3d

    reg = o3d.pipelines.registration
    level = o3d.utility.get_verbosity_level()
    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    try:
        reg.global_optimization(graph, reg.GlobalOptimizationLevenbergMarquardt(),
                                reg.GlobalOptimizationConvergenceCriteria(), option)
    finally:
        o3d.utility.set_verbosity_level(level)
    return graph


def optimize_poses(nodes: list[int], edges: list[PoseEdge], cfg: PoseGraphConfig | None = None) -> PoseGraphResult:
    """Camera-to-world poses of the largest connected component; world = its first image's camera."""
    import open3d as o3d

    cfg = cfg or PoseGraphConfig()
    if not nodes:
        return PoseGraphResult({}, None, [], [])
    comps = connected_components(nodes, edges)
    comp = comps[0]
    edges, left_out = short_edges(edges, cfg.short_edges_per_image)
    long = [(e.i, e.j) for e in left_out if e.i in comp and e.j in comp]
    if long:
        log.info("pose graph: %d long pair(s) left out (each image keeps its %d shortest)", len(long),
                 cfg.short_edges_per_image)
    dropped = sorted(n for c in comps[1:] for n in c)
    root = comp[0]
    cset = set(comp)
    init = _consensus_tree(root, cset, edges, cfg)
    used = [e for e in edges if e.i in cset and e.j in cset]
    if len(comp) == 1 or not cfg.optimize or not used:
        return PoseGraphResult(init, root, comp, dropped, long_edges=long)

    reg = o3d.pipelines.registration
    graph = reg.PoseGraph()
    index = {n: k for k, n in enumerate(comp)}
    for n in comp:
        graph.nodes.append(reg.PoseGraphNode(np.asarray(init[n], np.float64)))
    for e in used:
        info = e.information if e.information is not None else np.eye(6) * e.weight
        graph.edges.append(reg.PoseGraphEdge(index[e.i], index[e.j], np.asarray(e.T, np.float64),
                                             np.asarray(info, np.float64), uncertain=bool(e.uncertain)))
    passes = [(cfg.max_correspondence_distance * s, 0.0) for s in cfg.coarse_scales if s > 1]
    for dist, prune in passes + [(cfg.max_correspondence_distance, cfg.edge_prune_threshold)]:
        graph = _optimise(graph, reg.GlobalOptimizationOption(
            max_correspondence_distance=dist, edge_prune_threshold=prune,
            preference_loop_closure=cfg.preference_loop_closure, reference_node=index[root]))
    kept = {(comp[e.source_node_id], comp[e.target_node_id]) for e in graph.edges}
    pruned = [(e.i, e.j) for e in used if (e.i, e.j) not in kept]
    if pruned:
        log.info("pose graph pruned %d inconsistent pair(s): %s", len(pruned), pruned)
    # Images whose every link was pruned float free: they leave the component.
    parts = connected_components(comp, [e for e in used if (e.i, e.j) in kept])
    linked = next(set(c) for c in parts if root in c)
    lost = sorted(set(comp) - linked)
    if lost:
        log.warning("pose graph: %d image(s) lost every pair to pruning: %s", len(lost), lost)
    comp = [n for n in comp if n in linked]
    dropped = sorted(dropped + lost)
    # Re-anchor on the reference exactly (the optimiser keeps it fixed, this removes rounding drift).
    ref_inv = np.linalg.inv(np.asarray(graph.nodes[index[root]].pose))
    poses = {n: ref_inv @ np.asarray(graph.nodes[index[n]].pose) for n in comp}
    return PoseGraphResult(poses, root, comp, dropped, pruned, long)
