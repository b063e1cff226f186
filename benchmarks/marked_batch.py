"""What one DepthLM depth batch costs the driver: build time, memory held and bytes shipped (pickled, as
the Ray pool sends it), with marked images painted on read (densify's way) and drawn out up front (each
query's own copy, as before 2026-12-03).

    python -m benchmarks.marked_batch --queries 1536 --size 1000x750 [--out benchmarks/results/F.json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import sys
import time
import tracemalloc

import numpy as np

from densify.config.profiles import load_profile
from densify.io.outputs import write_json
from densify.io.cameras import Camera, prepare_image
from densify.queries.plan import plan_queries
from densify.queries.prompts import depth_batch


def measure(queries: int, size: tuple[int, int], seed: int = 0) -> dict:
    prof = load_profile("depthlm")
    w, h = size
    rng = np.random.default_rng(seed)
    prep = prepare_image(rng.integers(0, 256, (h, w, 3), np.uint8), Camera.default(w, h),
                         **prof.preprocess.image_options())
    pw, ph = prep.pixels.shape[1], prep.pixels.shape[0]
    pts = np.stack([rng.uniform(20, w - 20, queries), rng.uniform(20, h - 20, queries)], 1)  # markable
    plan = plan_queries(pts, prep.pixel_map, marker=prof.marker, dedupe=False)
    out = {"queries": len(plan), "image": [w, h], "prepared": [pw, ph]}
    for mode in ("painted_on_read", "drawn_up_front"):
        tracemalloc.start()
        t = time.perf_counter()
        b = depth_batch(prep, plan, prof, uid="img")
        held = [im.pixels for im in b.images.values()] if mode == "drawn_up_front" else None
        build_s = time.perf_counter() - t
        mb = tracemalloc.get_traced_memory()[0] / 1e6
        tracemalloc.stop()
        if held is not None:  # what was shipped: one full image per query
            b.images = {u: type(im)(u, px, im.ref) for (u, im), px in zip(b.images.items(), held)}
        t = time.perf_counter()
        shipped = len(pickle.dumps(b, protocol=5)) / 1e6
        out[mode] = {"build_s": round(build_s, 3), "held_mb": round(mb, 1), "pickled_mb": round(shipped, 1),
                     "pickle_s": round(time.perf_counter() - t, 3)}
        del b, held
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=1536)
    ap.add_argument("--size", default="1000x750", help="WxH of the source image")
    ap.add_argument("--out", help="write the result JSON here too")
    a = ap.parse_args(argv)
    w, h = (int(v) for v in a.size.lower().split("x"))
    r = {"benchmark": "benchmarks/marked_batch.py", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "command": "python -m benchmarks.marked_batch " + " ".join(argv if argv is not None else sys.argv[1:]),
         "python": platform.python_version(), **measure(a.queries, (w, h))}
    print(json.dumps(r, indent=1))
    if a.out:
        write_json(a.out, r)


if __name__ == "__main__":
    main()
