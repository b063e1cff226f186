import json

import numpy as np
import pytest

from densify.io.cameras import (Camera, CameraError, PixelMap, prepare_image, preprocessed_size, read_sidecar,
                                resolve_camera)


def test_corr_published_example():
    # model-formats.md: (264, 24) in 600x400 -> resized (450.56, 40.96) -> normalised (440.0, 59.971) -> (440, 60)
    cam = Camera(500, 500, 300, 200, 600, 400)
    size = preprocessed_size(cam, max_side=1024)
    assert size == (1024, 683)
    pm = prepare_image(np.zeros((400, 600, 3), np.uint8), cam, max_side=1024, coord_range=1000).pixel_map
    xp, yp = pm.to_pre(264, 24)
    assert xp == pytest.approx(450.56) and yp == pytest.approx(40.96)
    u, v = pm.pre_to_prompt_float(xp, yp)
    assert u == pytest.approx(440.0) and v == pytest.approx(59.971, abs=1e-3)
    assert pm.to_prompt(264, 24) == (440, 60)


def test_focal_normalisation_size_and_rounding():
    cam = Camera(559.62, 559.62, 320, 240, 640, 480)
    s = 1000 / 559.62
    assert preprocessed_size(cam, focal=1000) == (round(640 * s), round(480 * s))
    assert preprocessed_size(Camera(750, 750, 1, 1, 1000, 750), focal=750) == (1000, 750)


def test_square_pixels_resamples_rows_first():
    cam = Camera(559.62, 558.14, 361.87, 241.99, 640, 480)
    h1 = round(480 * 559.62 / 558.14)
    s = 1000 / 559.62
    assert preprocessed_size(cam, focal=1000) == (round(640 * s), round(h1 * s))
    assert preprocessed_size(cam, focal=1000, square_pixels=False) == (round(640 * s), round(480 * s))


def test_prompt_coordinates_vlm3_depth_follow_release_formula():
    # resize by 1000 / fx, then round(x' / W' * 2000) with the rounded resized size; Python rounding
    cam = Camera(559.62, 559.62, 361.87, 241.99, 640, 480)
    pm = prepare_image(np.zeros((480, 640, 3), np.uint8), cam, focal=1000, coord_range=2000).pixel_map
    s = 1000 / 559.62
    W, H = round(640 * s), round(480 * s)
    assert pm.pre_size == (W, H)
    for x, y in [(519, 129), (45, 56), (0, 0), (639, 479)]:
        assert pm.to_prompt(x, y) == (round(x * s / W * 2000), round(y * s / H * 2000))
    assert pm.to_prompt(639, 479)[0] < 2000


def test_anisotropic_focal_scales_each_axis_to_the_target_focal():
    cam = Camera(559.62, 558.14, 361.87, 241.99, 640, 480)
    prep = prepare_image(np.zeros((480, 640, 3), np.uint8), cam, focal=1000, coord_range=2000)
    assert prep.camera.fx == pytest.approx(1000) and prep.camera.fy == pytest.approx(1000)
    assert prep.pixel_map.to_pre(0, 100)[1] == pytest.approx(100 * 1000 / 558.14)


def test_round_trip_original_pre_prompt():
    pm = PixelMap((640, 480), (1144, 860), 2000)
    x, y = 123.0, 456.0
    u, v = pm.to_prompt(x, y)
    xo, yo = pm.prompt_to_orig(u, v)
    # prompt quantisation is 640/2000 = 0.32 px in the original image
    assert abs(xo - x) <= 0.16 + 1e-9 and abs(yo - y) <= 0.12 + 1e-9


def test_prepare_image_scales_intrinsics(textured_image):
    cam = Camera(500, 500, 320, 240, 640, 480)
    prep = prepare_image(textured_image, cam, focal=1000, coord_range=2000)
    assert prep.pixels.shape == (960, 1280, 3)
    assert prep.camera.fx == pytest.approx(1000) and prep.camera.cx == pytest.approx(640)
    with pytest.raises(CameraError, match="640x480"):
        prepare_image(textured_image[:100], cam, focal=1000)


def test_intrinsics_sources(tmp_path, caplog):
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    (tmp_path / "a.json").write_text(json.dumps({"fx": 600, "fy": 600, "cx": 320, "cy": 240}))
    cam = resolve_camera(img, 640, 480)
    assert cam.source == "sidecar" and cam.fx == 600
    # DepthLM list form with size, rescaled to the actual image
    cam = Camera.from_list([559.62, 558.14, 361.87, 241.99, 640, 480], 320, 240)
    assert cam.fx == pytest.approx(559.62 / 2) and cam.width == 320
    # default field of view, with a warning
    cam = resolve_camera(tmp_path / "b.png", 640, 480)
    assert cam.source == "default-fov" and "no intrinsics" in caplog.text


@pytest.mark.parametrize("content,match", [
    ("{not json", "cannot read intrinsics JSON"),
    (json.dumps({"fx": 600}), "needs fx, fy, cx, cy"),
    (json.dumps({"fx": "nan", "fy": 1, "cx": 1, "cy": 1}), "finite"),
    (json.dumps({"fx": -5, "fy": 1, "cx": 1, "cy": 1}), "positive"),
])
def test_bad_sidecar_names_file(tmp_path, content, match):
    p = tmp_path / "x.json"
    p.write_text(content)
    with pytest.raises(CameraError, match=match) as e:
        read_sidecar(p, 640, 480)
    assert str(p) in str(e.value)


def test_vectorised_prompt_rounding_matches_python_round(rng):
    cam = Camera(559.62, 558.14, 361.87, 241.99, 640, 480)
    pm = prepare_image(np.zeros((480, 640, 3), np.uint8), cam, focal=1000, coord_range=2000).pixel_map
    pts = np.c_[rng.uniform(0, 640, 5000), rng.uniform(0, 480, 5000)]
    pts = np.r_[pts, np.mgrid[0:640:7, 0:480:5].reshape(2, -1).T]
    assert np.array_equal(pm.to_prompt_array(pts), np.array([pm.to_prompt(x, y) for x, y in pts]))
