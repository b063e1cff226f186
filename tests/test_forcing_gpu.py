"""Forced answers through the vllm engine on a GPU (skipped without CUDA or vLLM): the tiny Qwen3-VL made to
answer a fixed text (tests/test_forcing.py) gives the same answers forced and free, and stops after the number.

    bash benchmarks/gpu_session.sh tests    (runs this file with tests/test_engine_vllm.py)
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm")

from test_forcing import _profile, chain, check_forced_is_free  # noqa: E402,F401 - the chain model fixture

from densify.config.answer_format import NUMBER  # noqa: E402
from densify.engines import create_engine  # noqa: E402

pytestmark = pytest.mark.gpu


def test_vllm_forced_answers_are_the_free_ones(chain, tmp_path):  # noqa: F811
    folder, answer = chain
    number = NUMBER.search(answer).group()
    prof = _profile(tmp_path, answer)
    eng = create_engine("vllm", profile=prof, model=str(folder), gpu_memory_utilization=0.25, max_model_len=4096,
                        max_num_seqs=64, max_num_batched_tokens=8192, enforce_eager=True)
    try:
        check_forced_is_free(eng, prof, answer, number)
    finally:
        eng.close()
