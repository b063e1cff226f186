"""Hostile image inputs (folders, pipes, unreadable files, dangling links, inflating PNGs, big JPEGs,
rotated photos) and output files (permissions, temporaries of interrupted writes)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import bounded
from PIL import Image, ImageOps

from densify.io import outputs
from densify.io.images import ImageError, image_size, load_image, load_rgb

REPO = Path(__file__).resolve().parents[1]


_bounded = bounded


def _png(path: Path, w: int = 16, h: int = 12) -> Path:
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)
    return path


# -- what is not an image file

def test_a_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(ImageError) as info:
        load_rgb(tmp_path)
    assert info.value.kind == "not_a_file" and "folder" in str(info.value) and str(tmp_path) in str(info.value)


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    res = _bounded(lambda: load_rgb(fifo), 5)  # opening a FIFO for reading would block here
    err = res.get("error")
    assert isinstance(err, ImageError) and err.kind == "not_a_file" and "pipe" in str(err)


def test_a_dangling_link_names_its_target(tmp_path):
    link = tmp_path / "img.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageError) as info:
        load_rgb(link)
    assert info.value.kind == "missing" and "symbolic link" in str(info.value) and "gone.png" in str(info.value)


def test_a_missing_file_is_missing(tmp_path):
    with pytest.raises(ImageError) as info:
        load_rgb(tmp_path / "nope.png")
    assert info.value.kind == "missing" and "no such file" in str(info.value)


def test_an_unreadable_file_says_permission_denied():
    """chmod 000, read by an unprivileged process (root reads anything: a forked child drops to `nobody`)."""
    d = Path(tempfile.mkdtemp(prefix="densify-perm-"))
    try:
        os.chmod(d, 0o755)
        img = _png(d / "secret.png")
        os.chmod(img, 0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what load_rgb says, then leave without running pytest's cleanup
            msg = "no error"
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                load_rgb(img)
            except ImageError as exc:
                msg = f"{exc.kind} | {exc}"
            except BaseException as exc:
                msg = f"{type(exc).__name__}: {exc}"
            os.write(w, msg.encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            out = f.read()
        os.waitpid(pid, 0)
        assert out.startswith("unreadable |") and "permission denied" in out, out
    finally:
        os.chmod(d / "secret.png", 0o644)
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


# -- orientation

@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)  # stored 160 wide, 120 high
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "photo.png"
    Image.fromarray(stored).save(p, exif=exif)
    rgb = load_rgb(p)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    np.testing.assert_array_equal(rgb, upright)
    if orientation in (6, 8):
        assert rgb.shape == (160, 120, 3)  # a displayed 120x160 photo is 160 high
    assert image_size(p) == (rgb.shape[1], rgb.shape[0])
    li = load_image(p, max_side=80)
    assert max(li.rgb.shape[:2]) == 80 and li.size == (upright.shape[1], upright.shape[0])
    assert (li.rgb.shape[0] > li.rgb.shape[1]) == (upright.shape[0] > upright.shape[1])


def test_exif_orientation_of_a_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "photo.jpg"
    Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(p, exif=exif, quality=95)
    assert load_rgb(p).shape == (160, 120, 3)


# -- decoding at most what is needed

def test_inflating_png_is_decoded_reduced_within_the_budget(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("RGB", (4000, 4000), (10, 200, 30)).save(p, optimize=True)
    assert p.stat().st_size < 100_000  # kilobytes on disk, 48 MB decoded
    li = load_image(p, max_side=512)
    assert li.rgb.shape == (512, 512, 3) and li.size == (4000, 4000) and li.scale == pytest.approx(512 / 4000)
    assert (li.rgb == [10, 200, 30]).all()
    # beyond the pixel budget it is refused before a pixel is decoded
    with pytest.raises(ImageError) as info:
        load_image(p, max_pixels=4_000_000, max_side=512)
    assert info.value.kind == "too_large"


def test_large_jpeg_is_decoded_reduced_with_bounded_memory(tmp_path):
    """A 6000x4000 JPEG (72 MB as RGB) asked at 640 px: peak memory of the decode stays far below the full
    image, because the JPEG is decoded at 1/8 scale (measured in a fresh process by its peak RSS)."""
    p = tmp_path / "big.jpg"
    small = np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    Image.fromarray(small).resize((6000, 4000), Image.Resampling.NEAREST).save(p, quality=80)
    code = ("import resource, sys; from densify.io.images import load_image\n"
            "import numpy, PIL.Image, cv2\n"
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "li = load_image(sys.argv[1], max_side=640)\n"
            "r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(li.rgb.shape, li.size, (r1 - r0) // 1024)\n")
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    shape, grew_mb = r.stdout.rsplit(" ", 1)[0], int(r.stdout.split()[-1])
    assert shape.startswith("(427, 640, 3) (6000, 4000)")
    assert grew_mb < 30, r.stdout  # full decode alone would be 72 MB


def test_reduced_decode_is_close_to_a_full_decode_then_resize(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    p = tmp_path / "x.png"
    Image.fromarray(img).resize((1800, 1200), Image.Resampling.BICUBIC).save(p)
    ref = np.asarray(Image.open(p).convert("RGB").resize((300, 200), Image.Resampling.LANCZOS)).astype(int)
    got = load_rgb(p, max_side=300).astype(int)
    assert got.shape == ref.shape and np.abs(got - ref).mean() < 3
    assert load_rgb(p, max_side=5000).shape == (1200, 1800, 3)  # never enlarged


def test_16_bit_images_keep_their_scaling(tmp_path):
    a = (np.random.default_rng(2).random((30, 40)) * 60000).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    expect = (a.astype(np.float64) / a.max() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(load_rgb(p), np.repeat(expect[..., None], 3, axis=2))
    assert load_rgb(p, max_side=20).shape == (15, 20, 3)


def test_a_very_elongated_image_fails_saying_why(tmp_path):
    p = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (4, 20000, 3), np.uint8)).save(p)
    assert load_image(p).rgb.shape == (4, 20000, 3)  # it decodes at full size
    with pytest.raises(ImageError) as info:
        load_image(p, max_side=2048)  # ... but not reduced to 2048 x 0.4 px
    assert "20000x4 is too elongated" in str(info.value) and str(p) in str(info.value)
    assert "unexpected image shape" not in str(info.value)


def test_a_narrow_image_with_a_guessed_focal_is_refused_before_it_inflates(tmp_path):
    """4x20000 with a 60 degree guess: fx 3.5 px, and focal 1000 would make it 1155 x 5.8 million px (20 GB)."""
    p = tmp_path / "tall.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20000, 4, 3), np.uint8)).save(p)
    code = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from pathlib import Path
from densify.io.cameras import CameraError
from densify.io.images import ImageSource
from densify.stages.depth import DepthStage
from densify.stages.settings import DepthConfig
try:
    DepthStage(DepthConfig(engine={{"name": "simulated"}}, max_side=100000), None).prepare(ImageSource("t", Path({str(p)!r})))
except CameraError as exc:
    print("refused:", exc)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and "refused:" in r.stdout and "1155x5773503 px" in r.stdout, r.stdout + r.stderr[-2000:]


def test_gif_files_are_read_and_an_animation_gives_its_first_frame(tmp_path, caplog):
    import json
    import shutil

    from densify.synthetic.scenes import SceneSpec, make_scene
    from pipelines.cli import main

    scene = tmp_path / "scene"
    make_scene(SceneSpec(seed=9, n_views=2, width=160, height=120)).save(scene)
    Image.open(scene / "view_001.png").save(scene / "view_001.gif")  # the truth beside it names the stem
    (scene / "view_001.png").unlink()
    frames = [Image.fromarray(np.full((12, 16, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with caplog.at_level("WARNING"):
        rgb = load_rgb(tmp_path / "anim.gif")
    assert rgb.shape == (12, 16, 3) and abs(int(rgb.mean()) - 10) <= 2 and "2 frames; using the first" in caplog.text
    out = tmp_path / "out"
    assert main(["-q", "depth", str(scene), "--out", str(out), "--engine", "simulated", "--count", "128"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["images"] == 2 and s["ok"] == 2 and (out / "view_001" / "result.json").is_file()
    from densify.stages.label import count_manifest

    assert count_manifest(str(scene)) == 2
    shutil.rmtree(out)


# -- outputs

def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        outputs.write_json(tmp_path / "a.json", {"x": 1})
        outputs.write_npy(tmp_path / "d.npy", np.zeros(3))
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "d.npy").stat().st_mode) == 0o644
        os.umask(0o077)
        outputs.write_text(tmp_path / "private.txt", "x")
        assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_killed_write_leaves_a_temporary_the_sweep_recognises(tmp_path):
    (tmp_path / ".keep").write_text("not ours")
    pid = os.fork()
    if pid == 0:  # killed in the middle of a write: no cleanup runs
        with outputs.atomic_path(tmp_path / "depth.npy") as tmp:
            tmp.write_bytes(b"half")
            os._exit(9)
    os.waitpid(pid, 0)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != ".keep")
    assert len(left) == 1 and outputs.TEMP_RE.match(left[0]).group("target") == "depth.npy"
    assert left[0].endswith(".npy")  # writers that pick the format by suffix still work
    assert [p.name for p in outputs.sweep_temp_files(tmp_path)] == left
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep"]


def test_sweep_removes_only_densify_temporaries(tmp_path):
    keep = [".hidden", ".git", "depth.npy", ".depth.npy", ".depth.abc123.npy", "notes.densify-tmp-abc123",
            ".x.densify-tmp-", "summary.json"]
    for name in keep:
        (tmp_path / name).write_text("keep")
    (tmp_path / ".cfg").mkdir()
    gone = [".depth.npy.densify-tmp-abc12345.npy", ".summary.json.densify-tmp-zz_9yy01.json",
            ".manifest-1.parquet.densify-tmp-q1w2e3r4.parquet"]
    for name in gone:
        (tmp_path / name).write_text("half")
    # a link named like a temporary is not followed nor removed
    target = tmp_path / "precious.txt"
    target.write_text("precious")
    (tmp_path / ".precious.txt.densify-tmp-abcdef12.txt").symlink_to(target)
    sub = tmp_path / "img1"
    sub.mkdir()
    (sub / ".result.json.densify-tmp-abcdef12.json").write_text("half")

    only = outputs.sweep_temp_files(tmp_path, targets=["manifest-1.parquet"])
    assert [p.name for p in only] == [".manifest-1.parquet.densify-tmp-q1w2e3r4.parquet"]
    removed = outputs.sweep_temp_files(tmp_path, recursive=True)
    assert sorted(p.name for p in removed) == sorted(gone[:2] + [".result.json.densify-tmp-abcdef12.json"])
    for name in keep:
        assert (tmp_path / name).read_text() == "keep"
    assert target.read_text() == "precious" and (tmp_path / ".precious.txt.densify-tmp-abcdef12.txt").is_symlink()
    assert (tmp_path / ".cfg").is_dir()


# -- every command sweeps what a killed run's last writes left at the top of --out

def _leftovers(folder: Path, names: list[str]) -> list[Path]:
    """Temporaries as a run killed while writing `names` leaves them (atomic_path's names, never renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        fd, tmp = tempfile.mkstemp(prefix=outputs.temp_name(name), suffix=Path(name).suffix, dir=folder)
        os.write(fd, b"half")
        os.close(fd)
        out.append(Path(tmp))
    return out


@pytest.mark.parametrize("command", ["depth", "reconstruct", "pose", "eval"])
def test_each_command_sweeps_its_killed_run_files_and_only_those(tmp_path, command):
    from conftest import IBIMS

    from densify.synthetic.scenes import SceneSpec, make_scene
    from pipelines.cli import main

    if command == "eval" and not IBIMS.is_file():
        pytest.skip("iBims sample not beside the checkout")
    out = tmp_path / "out"
    images = [str(p) for p in make_scene(SceneSpec(seed=2, n_views=3, width=160, height=120)).save(tmp_path / "s")]
    argv = {"depth": ["depth", *images, "--count", "256"],
            "reconstruct": ["reconstruct", *images, "--grid", "8", "6", "--set", "depth.plan.count=256"],
            "pose": ["pose", *images[:2], "--grid", "8", "6", "--set", "depth.plan.count=256"],
            "eval": ["eval", "ibims", "--data", str(IBIMS), "--limit", "1"]}[command]
    names = {"depth": ["config.yaml", "summary.json", "failures.jsonl"],
             "reconstruct": ["summary.json", "poses.json", "pairs.jsonl", "mesh.ply", "cloud.ply", "transforms.json"],
             "pose": ["pose.json"], "eval": ["eval.json", "summary.json", "failures.jsonl"]}[command]
    ours = _leftovers(out, names)
    if command == "reconstruct":
        ours += _leftovers(out / "colmap", ["cameras.txt", "images.txt", "points3D.txt"])
    if command in ("reconstruct", "pose"):
        ours += _leftovers(out / "pairs" / "view_000__view_001", ["matches.npz", "pose.json"])
    if command != "eval":  # an image folder (eval's images have other ids)
        ours += _leftovers(out / "depth" / "view_000" if command in ("reconstruct", "pose") else out / "view_000",
                           ["depth.npy"])
    foreign = _leftovers(out, ["notes.txt", "summary-1.json", "manifest.parquet"])  # another job's, or a shard's
    assert main(["-q", *argv, "--out", str(out), "--engine", "simulated"]) in (0, 1)
    assert [p.name for p in ours if p.exists()] == []
    assert all(p.exists() for p in foreign)


# -- a full disk: the run stops at once (exit 74, "No space left on device"), and a rerun resumes as if
# nothing had happened

def _depth_argv(scene: Path, out: Path) -> list[str]:
    return ["depth", str(scene), "--out", str(out), "--engine", "simulated", "--count", "256"]


def _same_outputs(a: Path, b: Path) -> None:
    import json

    dirs = sorted(d.name for d in b.iterdir() if d.is_dir())
    assert sorted(d.name for d in a.iterdir() if d.is_dir()) == dirs and dirs
    for d in dirs:
        names = sorted(f.name for f in (b / d).iterdir())
        assert sorted(f.name for f in (a / d).iterdir()) == names, d
        for n in names:
            x, y = (a / d / n).read_bytes(), (b / d / n).read_bytes()
            if n == "result.json":  # the same but for the time it took
                x, y = ({k: v for k, v in json.loads(t).items() if k != "wall_s"} for t in (x, y))
            assert x == y, f"{d}/{n}"


@pytest.fixture(scope="module")
def six_views(tmp_path_factory):
    from densify.synthetic.scenes import SceneSpec, make_scene

    root = tmp_path_factory.mktemp("six")
    make_scene(SceneSpec(seed=8, n_views=6, width=160, height=120)).save(root / "scene")
    from pipelines.cli import main

    assert main(["-q", *_depth_argv(root / "scene", root / "ref")]) == 0
    return root / "scene", root / "ref"


def test_a_full_disk_stops_depth_at_once_with_exit_74_and_the_rerun_resumes_identically(six_views, tmp_path,
                                                                                          monkeypatch, capsys):
    import errno
    from contextlib import contextmanager

    from pipelines.cli import main

    scene, ref = six_views
    per_image = sum(f.stat().st_size for f in (ref / "view_000").iterdir())
    real, used = outputs.atomic_path, [0]

    @contextmanager
    def filling(path):  # a disk with room for about two and a half images
        with real(path) as tmp:
            yield tmp
            used[0] += tmp.stat().st_size
            if used[0] > 2.5 * per_image:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs, "atomic_path", filling)
    out = tmp_path / "out"
    rc = main(_depth_argv(scene, out))
    err = capsys.readouterr().err
    assert rc == 74 and "No space left on device" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()[-1:]) == 1 and "densify depth: cannot write outputs" in err
    done = sorted(p.parent.name for p in out.glob("*/result.json"))
    assert 1 <= len(done) <= 2 and len([d for d in out.iterdir() if d.is_dir()]) <= 3  # stopped at the first
    assert not list(out.rglob(f"*{outputs.TEMP_TAG}*"))
    monkeypatch.setattr(outputs, "atomic_path", real)  # space freed
    assert main(["-q", *_depth_argv(scene, out)]) == 0
    _same_outputs(out, ref)


def test_open3d_s_silent_short_write_is_an_error(tmp_path, monkeypatch):
    """Open3D reports success when its writes fail: the PLY's length is checked against its header."""
    o3d = pytest.importorskip("open3d")
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.random.default_rng(0).random((500, 3))))
    cloud.colors = o3d.utility.Vector3dVector(np.random.default_rng(1).random((500, 3)))
    outputs.write_ply(tmp_path / "cloud.ply", cloud)
    outputs.check_ply(tmp_path / "cloud.ply")
    mesh = o3d.geometry.TriangleMesh.create_sphere()
    mesh.compute_vertex_normals()
    outputs.write_mesh(tmp_path / "mesh.ply", mesh)
    outputs.check_ply(tmp_path / "mesh.ply")
    real = o3d.io.write_point_cloud

    def short(path, pc, **kw):  # what a full disk does to it: a truncated file, and True
        real(path, pc, **kw)
        os.truncate(path, os.path.getsize(path) - 7)
        return True

    monkeypatch.setattr(o3d.io, "write_point_cloud", short)
    with pytest.raises(OSError, match="Open3D wrote") as info:
        outputs.write_ply(tmp_path / "again.ply", cloud)
    assert info.value.filename == str(tmp_path / "again.ply") and not list(tmp_path.glob(".again*"))


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB file system (tmpfs), where this process may mount one."""
    d = tmp_path / "disk"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here (needs root)")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_real_full_disk_stops_depth_with_exit_74_and_nothing_truncated_is_certified(six_views, small_disk):
    scene, ref = six_views
    out = small_disk / "out"
    p = subprocess.run([sys.executable, "-m", "pipelines", *_depth_argv(scene, out), "--count", "3072"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 74 and "No space left on device" in p.stderr, p.stderr[-2000:]
    from densify.io.layout import ImageFiles

    for res in out.glob("*/result.json"):  # what is certified is whole (numpy and Open3D writes included)
        files = ImageFiles(res.parent)
        outputs.check_ply(files.cloud)
        np.load(files.depth_npy)
        assert all((files.dir / n).stat().st_size == size for n, size in files.read_result()["files"].items())
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    p = subprocess.run([sys.executable, "-m", "pipelines", "-q", *_depth_argv(scene, out), "--count", "3072"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    ref3072 = small_disk / "ref"
    subprocess.run([sys.executable, "-m", "pipelines", "-q", *_depth_argv(scene, ref3072), "--count", "3072"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    _same_outputs(out, ref3072)
