"""`densify label` on a manifest full of bad inputs: each one handled (grayscale, 16-bit) or recorded as failed
with the right kind; the job completes, exit status 1, the summary and the output manifest say what failed."""

import json
import math
import struct
import zlib

import cv2
import numpy as np
import pytest

from pipelines.cli import main

EXPECTED = {
    # id: (status, error kind)
    "good": ("ok", None),
    "gray": ("ok", None),
    "deep16": ("ok", None),
    "truncated": ("failed", "image"),
    "empty": ("failed", "image"),
    "notes": ("failed", "image"),
    "huge": ("failed", "too_large"),
    "bad_intrinsics": ("failed", "intrinsics"),
    "nan_intrinsics": ("failed", "intrinsics"),
    "short_intrinsics": ("failed", "intrinsics"),
    "negative_focal": ("failed", "intrinsics"),
    "missing": ("failed", "missing"),
    "bad-record-13": ("failed", "manifest"),
    "bad-record-14": ("failed", "manifest"),
}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data to speak of)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    rgb = cv2.resize((rng.random((12, 16, 3)) * 255).astype(np.uint8), (160, 120), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(d / "good.png"), rgb)
    cv2.imwrite(str(d / "gray.png"), cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(d / "deep16.png"), (cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 200))
    ok, jpg = cv2.imencode(".jpg", rgb)
    (d / "truncated.jpg").write_bytes(jpg.tobytes()[: len(jpg) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "notes.png").write_text("these are my notes, not an image\n")
    (d / "huge.png").write_bytes(_png_header_only(100_000, 100_000))
    for name in ("bad_intrinsics", "nan_intrinsics", "short_intrinsics", "negative_focal"):
        cv2.imwrite(str(d / f"{name}.png"), rgb)
    for name in ("good", "gray", "deep16"):
        np.save(d / f"{name}.depth.npy", np.full((120, 160), 2.5, np.float32))
    K = [150.0, 150.0, 80.0, 60.0]
    recs = [{"image": "good.png", "intrinsics": K}, {"image": "gray.png", "intrinsics": K},
            {"image": "deep16.png"}, {"image": "truncated.jpg"}, {"image": "empty.png"},
            {"image": "notes.png", "intrinsics": K}, {"image": "huge.png"},
            {"image": "bad_intrinsics.png", "intrinsics": "abc"},
            {"image": "nan_intrinsics.png", "intrinsics": [math.nan, 150.0, 80.0, 60.0]},
            {"image": "short_intrinsics.png", "intrinsics": [150.0, 150.0]},
            {"image": "negative_focal.png", "intrinsics": [-150.0, 150.0, 80.0, 60.0]},
            {"image": "missing.png", "intrinsics": K}]
    lines = [json.dumps(r) for r in recs] + ["{this is not json", json.dumps({"intrinsics": K})]
    (d / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return d / "manifest.jsonl"


def test_bad_inputs_are_recorded_and_the_job_completes(bad_manifest, tmp_path, capsys):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    rc = main(["label", str(bad_manifest), "--out", str(out), "--no-ray", "--count", "96", "--engine", "simulated"])
    assert rc == 1
    printed = capsys.readouterr().out
    assert "3 ok" in printed and "11 failed" in printed and "too_large: 1" in printed

    rows = {r["id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert set(rows) == set(EXPECTED)
    for sid, (status, kind) in EXPECTED.items():
        r = rows[sid]
        assert (r["status"], r["error_kind"]) == (status, kind), (sid, r["error"])
        if status == "ok":
            assert (out / sid / "result.json").is_file() and r["depth_npy"] == f"{sid}/depth.npy"
            assert np.isfinite(np.load(out / sid / "depth.npy")).all()
        else:
            assert r["error"] and not (out / sid / "result.json").exists() and r["depth_npy"] is None
    assert "64,000,000-pixel limit" in rows["huge"]["error"] or "exceeds limit" in rows["huge"]["error"]
    assert "no such file" in rows["missing"]["error"]

    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] and (s["ok"], s["failed"]) == (3, 11)
    assert s["failed_by_kind"] == {"image": 3, "too_large": 1, "intrinsics": 4, "missing": 1, "manifest": 2}
    assert {f["id"] for f in s["failed_images"]} == {k for k, v in EXPECTED.items() if v[0] == "failed"}

    # A rerun skips what is done and records the same failures again.
    assert main(["label", str(bad_manifest), "--out", str(out), "--no-ray", "--count", "96", "--engine", "simulated"]) == 1
    s2 = json.loads((out / "summary.json").read_text())
    assert (s2["ok"], s2["skipped"], s2["failed"]) == (0, 3, 11) and s2["engine_queries"] == 0


def test_grayscale_and_16_bit_images_give_the_same_labels_as_rgb_would(bad_manifest, tmp_path):
    """Grayscale and 16-bit inputs are expanded to RGB; their labels are real depth maps."""
    out = tmp_path / "out"
    main(["label", str(bad_manifest), "--out", str(out), "--no-ray", "--count", "96", "--engine", "simulated"])
    for sid in ("gray", "deep16"):
        depth = np.load(out / sid / "depth.npy")
        assert depth.shape == (120, 160)
        assert np.median(np.abs(depth / 2.5 - 1)) < 0.15  # the ground truth is a 2.5 m wall
