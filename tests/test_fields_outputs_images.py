import json

import cv2
import numpy as np
import pytest

from densify.fields import densify_depth, densify_flow
from densify.io import outputs
from densify.io.images import ImageError, discover, load_rgb, read_jsonl_manifest


def test_linear_in_inverse_depth_is_exact_on_a_plane(rng):
    h, w = 120, 160
    yy, xx = np.mgrid[0:h, 0:w]
    inv = 0.2 + 0.001 * xx + 0.0005 * yy           # a plane has depth linear in inverse depth
    xy = np.c_[rng.uniform(0, w - 1, 300), rng.uniform(0, h - 1, 300)]
    xy = np.r_[xy, [[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]]]
    vals = 1 / (0.2 + 0.001 * xy[:, 0] + 0.0005 * xy[:, 1])
    f = densify_depth(xy, vals, (h, w), outliers=False)
    assert np.allclose(f.values, 1 / inv, rtol=2e-3)
    assert f.confidence.max() == pytest.approx(1.0) and f.confidence.min() < 0.9


def test_outliers_rejected(rng):
    xy = np.stack(np.meshgrid(np.arange(5, 160, 10), np.arange(5, 120, 10)), -1).reshape(-1, 2).astype(float)
    vals = np.full(len(xy), 3.0)
    vals[[20, 50, 90]] = [30.0, 0.3, 12.0]
    f = densify_depth(xy, vals, (120, 160))
    assert not f.used[[20, 50, 90]].any() and f.used.sum() == len(xy) - 3
    assert np.allclose(f.values, 3.0)


def test_failed_answers_ignored_and_empty_input():
    xy = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], float)
    f = densify_depth(xy, np.array([2.0, np.nan, 2.0, 2.0]), (11, 11), outliers=False)
    assert np.allclose(f.values, 2.0)
    empty = densify_depth(xy, np.full(4, np.nan), (11, 11))
    assert np.isnan(empty.values).all() and (empty.confidence == 0).all()


def test_flow_exact_on_affine_motion(rng):
    h, w = 60, 80
    xy = np.c_[rng.uniform(0, w - 1, 200), rng.uniform(0, h - 1, 200)]
    A = np.array([[1.05, 0.02], [-0.01, 0.97]])
    tgt = xy @ A.T + [3.0, -2.0]
    f = densify_flow(xy, tgt, (h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    exact = np.stack([xx, yy], -1) @ A.T + [3.0, -2.0]
    from scipy.spatial import Delaunay
    hull = (Delaunay(xy).find_simplex(np.stack([xx, yy], -1).reshape(-1, 2)) >= 0).reshape(h, w)
    assert np.abs(f.values - exact)[hull].max() < 1e-3


def test_png16_and_preview():
    d = np.array([[0.5, np.nan], [70.0, 1.2344]], np.float32)
    p = outputs.depth_png16(d)
    assert p.dtype == np.uint16 and p.tolist() == [[500, 0], [65535, 1234]]
    prev = outputs.depth_preview(d)
    assert prev.shape == (2, 2, 3) and prev[0, 1].tolist() == [0, 0, 0]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with outputs.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    outputs.write_json(target, {"a": np.float32(1.5)})
    assert json.loads(target.read_text()) == {"a": 1.5}


def test_png16_roundtrip_through_file(tmp_path):
    d = np.random.default_rng(0).uniform(0.5, 10, (20, 30)).astype(np.float32)
    outputs.write_png(tmp_path / "d.png", outputs.depth_png16(d))
    back = cv2.imread(str(tmp_path / "d.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.abs(back / 1000.0 - d).max() <= 0.0005 + 1e-6


def _write(path, arr):
    cv2.imwrite(str(path), arr)
    return path


def test_load_rgb_kinds_and_errors(tmp_path, textured_image):
    rgb = load_rgb(_write(tmp_path / "c.png", textured_image[..., ::-1]))
    assert rgb.shape == (480, 640, 3) and np.array_equal(rgb, textured_image)
    gray = load_rgb(_write(tmp_path / "g.png", textured_image[..., 0]))
    assert gray.shape == (480, 640, 3)
    g16 = load_rgb(_write(tmp_path / "g16.png", (textured_image[..., 0].astype(np.uint16) * 200)))
    assert g16.dtype == np.uint8 and g16.max() == 255
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    jpg = _write(tmp_path / "t.jpg", textured_image)
    (tmp_path / "trunc.jpg").write_bytes(jpg.read_bytes()[:2000])
    for name, match in [("empty.png", "empty file"), ("text.png", "not a readable image"),
                        ("trunc.jpg", "not a readable image"), ("missing.png", "no such file")]:
        with pytest.raises(ImageError, match=match) as e:
            load_rgb(tmp_path / name)
        assert name in str(e.value)


def test_discover_folder_glob_jsonl(tmp_path, textured_image):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "a.png", textured_image)
    _write(tmp_path / "sub" / "a.png", textured_image)
    srcs = discover([tmp_path])
    # ids are file stems; the second "a" gets a stable suffix from its path, recorded on the source
    assert [s.id for s in srcs][0] == "a" and srcs[1].id.startswith("a-") and len(srcs[1].id) == 10
    assert srcs[1].extra["id_wanted"] == "a" and [s.id for s in discover([tmp_path])] == [s.id for s in srcs]
    assert len(discover([str(tmp_path / "*.png")])) == 1
    man = tmp_path / "m.jsonl"
    man.write_text(json.dumps({"image": "a.png", "intrinsics": [500, 500, 320, 240, 640, 480]}) + "\n")
    (s,) = read_jsonl_manifest(man)
    assert s.path == tmp_path / "a.png" and s.intrinsics[0] == 500
    with pytest.raises(ImageError, match="matches no file"):
        discover([tmp_path / "sub" / "*.jpg"])
    man.write_text("{broken\n")
    with pytest.raises(ImageError, match="m.jsonl:1"):
        read_jsonl_manifest(man)
