"""The multi-view depth scale check: per-view scale errors are found from the pairs' metric poses."""

import numpy as np

from densify.geometry.scale import pair_log_scale, relative_log_scales


def test_per_view_scales_are_recovered_from_pairs():
    from densify.synthetic.scenes import SceneSpec, make_scene

    scene = make_scene(SceneSpec(seed=3, n_views=3, width=160, height=120))
    s = np.array([0.10, -0.05, 0.02])  # each view's depth map is off by its own factor exp(s_k)
    depth = [v.depth * np.float32(np.exp(s[k])) for k, v in enumerate(scene.views)]
    rows = []
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        m = scene.matches(i, j)
        ys, xs = np.nonzero(np.isfinite(m[..., 0]))
        pick = np.linspace(0, len(xs) - 1, 300).astype(int)
        xy1 = np.stack([xs[pick], ys[pick]], 1).astype(float)
        xy2 = m[ys[pick], xs[pick]].astype(float)
        T = scene.relative_pose(i, j)  # a metric pose (from view i's own, scaled depth in real runs: t scales too)
        lr = pair_log_scale(xy1, xy2, depth[i], depth[j], scene.views[i].camera, T[:3, :3], T[:3, 3] * np.exp(s[i]))
        assert abs(lr - (s[j] - s[i])) < 0.01, (i, j, lr)
        rows.append((i, j, lr))
    est = relative_log_scales(3, rows)
    np.testing.assert_allclose(est, s - s.mean(), atol=0.01)
    assert relative_log_scales(3, []) is None
    assert pair_log_scale(xy1[:5], xy2[:5], depth[0], depth[1], scene.views[0].camera, np.eye(3), np.zeros(3)) is None
