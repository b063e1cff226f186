"""`densify make-model`: build a synthetic Qwen3-VL model folder (tokenizer with the real special-token ids,
chat template, processor configs, config.json) in the real 4B shape (for vLLM's dummy weights) or a tiny
shape with saved random weights. For tests and benchmarks; it answers nonsense. A folder that is not empty
is refused unless --overwrite (which replaces the model files, weights included).
"""

from __future__ import annotations

from pathlib import Path

from pipelines import common


def add_arguments(p) -> None:
    p.add_argument("out", help="The output folder (new or empty, unless --overwrite).")
    p.add_argument("--shape", choices=["tiny", "4b"], default="tiny",
                   help="The shape: tiny (saved random weights, CPU-sized; default) or 4b (the real shape, for vLLM's dummy "
                        "weights).")
    p.add_argument("--seed", type=int, default=0, help="The seed of the random weights (default 0).")
    p.add_argument("--overwrite", action="store_true", help="Write into a folder that is not empty, replacing "
                                                            "the model files there.")


def run(args) -> int:
    from densify.io.lock import OutputLock
    from densify.synthetic.qwen3vl import build_model_folder

    out = Path(args.out)
    common.require_empty(out, "make-model OUT", args.overwrite)
    with OutputLock(out, what="make-model OUT"):
        if args.overwrite:  # weights of another shape must not stay beside this config
            for f in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
                f.unlink()
        path = build_model_folder(out, shape=args.shape, seed=args.seed)
    print(f"wrote a synthetic {args.shape} Qwen3-VL folder to {path}")
    return 0
