"""`densify make-model`: build a synthetic model folder (tokenizer with the real special-token ids, chat
template, processor configs, config.json) of one of two families: Qwen3-VL (VLM3's architecture; `tiny`,
`4b`) or Pixtral-12B in the LLaVA layout (DepthLM's released checkpoint; `pixtral-tiny`, `pixtral-12b`).
The tiny shapes have saved random weights and run on a CPU; the real shapes are for vLLM's dummy weights.
For tests and benchmarks; it answers nonsense.
"""

from __future__ import annotations



def add_arguments(p) -> None:
    from densify.synthetic.models import SHAPES

    p.add_argument("out", help="The output folder.")
    p.add_argument("--shape", choices=list(SHAPES), default="tiny",
                   help="The shape: tiny (Qwen3-VL, saved random weights, CPU-sized; default), 4b (the real "
                        "Qwen3-VL-4B shape, for vLLM's dummy weights), pixtral-tiny (Pixtral/LLaVA, saved random "
                        "weights, CPU-sized) or pixtral-12b (the real Pixtral-12B shape, for vLLM's dummy weights).")
    p.add_argument("--seed", type=int, default=0, help="The seed of the random weights (default 0).")


def run(args) -> int:
    from densify.synthetic.models import FAMILY_NAMES, SHAPES as TABLE, build_model_folder

    path = build_model_folder(args.out, shape=args.shape, seed=args.seed)
    print(f"wrote a synthetic {args.shape} {FAMILY_NAMES[TABLE[args.shape]['family']]} folder to {path}")
    return 0
