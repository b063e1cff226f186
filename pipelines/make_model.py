"""`densify make-model`: build a synthetic model folder (tokenizer with the real special-token ids, chat
template, processor configs, config.json) of one of two families: Qwen3-VL (VLM3's architecture; `tiny`,
`4b`) or Pixtral-12B in the LLaVA layout (DepthLM's released checkpoint; `pixtral-tiny`, `pixtral-12b`).
The tiny shapes have saved random weights and run on a CPU; the real shapes are for vLLM's dummy weights.
For tests and benchmarks; it answers nonsense, or with --answer TEXT that text to every prompt (real weights,
any shape: forced answers compared with free ones at the model's full cost). A folder that is not empty is refused unless --overwrite
(which replaces the model files, weights included).
"""

from __future__ import annotations

from pathlib import Path

from pipelines import common


def add_arguments(p) -> None:
    from densify.synthetic.models import SHAPES

    p.add_argument("out", help="The output folder (new or empty, unless --overwrite).")
    p.add_argument("--shape", choices=list(SHAPES), default="tiny",
                   help="The shape: tiny (Qwen3-VL, saved random weights, CPU-sized; default), 4b (the real "
                        "Qwen3-VL-4B shape, for vLLM's dummy weights), pixtral-tiny (Pixtral/LLaVA, saved random "
                        "weights, CPU-sized) or pixtral-12b (the real Pixtral-12B shape, for vLLM's dummy weights).")
    p.add_argument("--seed", type=int, default=0, help="The seed of the random weights (default 0).")
    p.add_argument("--answer", metavar="TEXT",
                   help="Save real weights whose greedy answer to every prompt is TEXT, e.g. 'Depth: 2.5 m' (no "
                        "token may repeat before different successors; a real shape is made on CUDA when available).")
    p.add_argument("--overwrite", action="store_true", help="Write into a folder that is not empty, replacing "
                                                            "the model files there.")


def run(args) -> int:
    from densify.config.loading import ConfigError
    from densify.io.lock import OutputLock
    from densify.synthetic.models import FAMILY_NAMES, SHAPES as TABLE, build_model_folder

    out = Path(args.out)
    common.require_empty(out, "make-model OUT", args.overwrite)
    with OutputLock(out, what="make-model OUT"):
        if args.overwrite:  # weights of another shape must not stay beside this config
            for f in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
                f.unlink()
        try:
            path = build_model_folder(out, shape=args.shape, seed=args.seed, answer=args.answer)
        except ValueError as exc:  # the answer is checked before anything is written
            raise ConfigError(f"make-model --answer: {exc}") from None
    said = f" answering {args.answer!r}" if args.answer is not None else ""
    print(f"wrote a synthetic {args.shape} {FAMILY_NAMES[TABLE[args.shape]['family']]} folder{said} to {path}")
    return 0
