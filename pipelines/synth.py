"""`densify synth`: render a seeded synthetic room to a folder (RGB, metric depth, intrinsics, poses).

The saved images carry JSON sidecars with intrinsics and a <stem>.depth.npy ground truth, so
`densify depth --engine simulated` and `densify reconstruct` run on them directly. A folder that is not
empty is refused (a scene mixed with other files would still "reconstruct") unless --overwrite, which
replaces an earlier scene's files.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipelines import common

_SCENE_FILE = re.compile(r"^(view_\d{3}\.(png|json|depth\.npy|objects\.npy)|objects\.json|scene\.ply)$")


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="The output folder (new or empty, unless --overwrite).")
    p.add_argument("--seed", type=int, default=0, help="The scene seed (default 0): the same seed, the same scene.")
    p.add_argument("--views", type=int, default=8, help="Images to render along the camera path (default 8).")
    p.add_argument("--width", type=int, default=640, help="Image width in pixels (default 640).")
    p.add_argument("--height", type=int, default=480, help="Image height in pixels (default 480).")
    p.add_argument("--trajectory", default="arc", choices=["arc", "orbit"],
                   help="The camera path: arc (walk forward while turning, default) or orbit (circle the room).")
    p.add_argument("--overwrite", action="store_true", help="Write into a folder that is not empty, replacing an "
                                                            "earlier scene's files.")


def run(args) -> int:
    from densify.config.loading import ConfigError
    from densify.io.lock import OutputLock
    from densify.synthetic.scenes import SceneSpec, make_scene

    if args.views < 1 or args.width < 16 or args.height < 16:
        raise ConfigError(f"--views {args.views} --width {args.width} --height {args.height}: render at least one "
                          f"view of at least 16x16 pixels")
    out = Path(args.out)
    common.require_empty(out, "--out", args.overwrite)
    with OutputLock(out):
        if args.overwrite:  # an earlier scene's views must not mix with this one's
            for f in out.iterdir():
                if f.is_file() and _SCENE_FILE.match(f.name):
                    f.unlink()
        scene = make_scene(SceneSpec(seed=args.seed, n_views=args.views, width=args.width, height=args.height,
                                     trajectory=args.trajectory))
        paths = scene.save(out)
    print(f"wrote {len(paths)} views to {args.out}")
    return 0
