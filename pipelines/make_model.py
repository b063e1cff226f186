"""`densify make-model`: build a synthetic Qwen3-VL model folder (tokenizer with the real special-token ids,
chat template, processor configs, config.json) in the real 4B shape (for vLLM's dummy weights) or a tiny
shape with saved random weights. For tests and benchmarks; it answers nonsense.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("out", help="The output folder.")
    p.add_argument("--shape", choices=["tiny", "4b"], default="tiny",
                   help="The shape: tiny (saved random weights, CPU-sized; default) or 4b (the real shape, for vLLM's dummy "
                        "weights).")
    p.add_argument("--seed", type=int, default=0, help="The seed of the random weights (default 0).")


def run(args) -> int:
    from densify.synthetic.qwen3vl import build_model_folder

    path = build_model_folder(args.out, shape=args.shape, seed=args.seed)
    print(f"wrote a synthetic {args.shape} Qwen3-VL folder to {path}")
    return 0
