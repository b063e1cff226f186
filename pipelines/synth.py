"""`densify synth`: render a seeded synthetic room to a folder (RGB, metric depth, intrinsics, poses).

The saved images carry JSON sidecars with intrinsics and a <stem>.depth.npy ground truth, so
`densify depth --engine simulated` and `densify reconstruct` run on them directly.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="The output folder.")
    p.add_argument("--seed", type=int, default=0, help="The scene seed (default 0): the same seed, the same scene.")
    p.add_argument("--views", type=int, default=8, help="Images to render along the camera path (default 8).")
    p.add_argument("--width", type=int, default=640, help="Image width in pixels (default 640).")
    p.add_argument("--height", type=int, default=480, help="Image height in pixels (default 480).")
    p.add_argument("--trajectory", default="arc", choices=["arc", "orbit"],
                   help="The camera path: arc (walk forward while turning, default) or orbit (circle the room).")


def run(args) -> int:
    from densify.synthetic.scenes import SceneSpec, make_scene

    scene = make_scene(SceneSpec(seed=args.seed, n_views=args.views, width=args.width, height=args.height,
                                 trajectory=args.trajectory))
    paths = scene.save(args.out)
    print(f"wrote {len(paths)} views to {args.out}")
    return 0
