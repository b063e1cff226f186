"""Where the time of one image's 3072 queries goes (frontend rendering vs engine); a diagnostic for
engine_bench. python -m benchmarks.engine_probe OUT_DIR [engine options as JSON]"""
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import engine_bench as eb
from densify.config.profiles import load_profile
from densify.engines import create_engine
from densify.synthetic.models import build_model_folder


def main():
    out = Path(sys.argv[1]); extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    prof = load_profile("vlm3-depth")
    model = str(build_model_folder(Path(tempfile.mkdtemp()) / "m4b", shape="4b"))
    eng = create_engine("vllm", profile=prof, model=model, **dict(eb.BASE_OPTS, **extra))
    eng.generate(eb.image_batch(prof, 1, 512))
    b = eb.image_batch(prof, 2)
    t0 = time.perf_counter(); prompts = eng.prompts(b); t1 = time.perf_counter()
    pr = cProfile.Profile(); pr.enable()
    eng.llm.enqueue(prompts, eng.sampling_params(b.sampling), use_tqdm=False)
    pr.disable(); t2 = time.perf_counter()
    n = 0
    while eng.llm.llm_engine.has_unfinished_requests():
        n += sum(o.finished for o in eng.llm.llm_engine.step())
    t3 = time.perf_counter()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(35)
    (out / "enqueue_profile.txt").write_text(s.getvalue())
    print(f"PROBE {extra}: render {t1-t0:.2f}s enqueue {t2-t1:.2f}s drain {t3-t2:.2f}s total {t3-t0:.2f}s -> {3072/(t3-t0):.1f} q/s")
    b = eb.image_batch(prof, 3)
    t = time.perf_counter(); eng.generate(b); w = time.perf_counter() - t
    print(f"PROBE {extra}: generate 3072 in {w:.2f}s = {3072/w:.1f} q/s")
    eng.close()


if __name__ == "__main__":
    main()
