"""GPU-host compatibility, put on PYTHONPATH by benchmarks/gpu_session.sh only where it is needed.

vLLM 0.26's Pixtral/LLaVA code imports `PixtralRotaryEmbedding` from transformers' Pixtral module, which
transformers 5.17 (the GPU host's) names `PixtralVisionRotaryEmbedding`; vLLM then cannot even inspect a
LLaVA checkpoint (benchmarks/results/gpu-tests-H200-20261203.txt). This adds the old name once the module
is imported, in every process started with this PYTHONPATH (vLLM inspects models in a subprocess). Untested
on a GPU so far: whether the renamed class still takes vLLM's arguments is what the next GPU run shows.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_MODULE = "transformers.models.pixtral.modeling_pixtral"


class _AddOldName(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if not hasattr(module, "PixtralRotaryEmbedding") and hasattr(module, "PixtralVisionRotaryEmbedding"):
                module.PixtralRotaryEmbedding = module.PixtralVisionRotaryEmbedding

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AddOldName())

# this file shadows any other sitecustomize on the path: run that one too
_here = os.path.dirname(os.path.abspath(__file__))
_other = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _other is not None and _other.loader is not None:
    _other.loader.exec_module(importlib.util.module_from_spec(_other))
