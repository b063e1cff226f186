#!/usr/bin/env bash
# GPU session job: the gpu tests and the engine benchmark, logs and JSON into $OUT.
#
# On the GPU host, from the repository root, after staging vLLM (../shared/gpu/README.md):
#   bash benchmarks/gpu_session.sh [tests|bench|all] [benchmark phases, default base,depthlm,hf,cascade,fp8] [engine_bench args]
#   (depthlm: DepthLM as released, the exact marker on the Pixtral-12B shape, dummy weights; its folder is built once per host)
#   bash benchmarks/gpu_session.sh scaling [scaling_bench args, e.g. --gpus 1,2 --engines-per-gpu 2]
#   bash benchmarks/gpu_session.sh pipeline [pipeline_bench args, e.g. --images 12 --cpu-workers 4]
#   bash benchmarks/gpu_session.sh depth [depth_bench args, e.g. --images 12 --one 1]: `densify depth` itself
#   bash benchmarks/gpu_session.sh depth --answer "Depth: 2.50 m" --images 8 --one 1: the same with forced answers,
#     as a real checkpoint runs: a 4B-shaped folder whose real weights answer that text to every prompt
#     (/tmp/densify-m4b-answer, built once per host on the GPU, ~10 GB: a minute or two the first time;
#     `... depth --answer TEXT --images 0 --one 0` only builds it), the text declared as the answer format,
#     forcing auto and audited, no structured decoding; result depth_bench-gpu-forced-<date>.json
#   PIXTRAL_TRANSFORMERS=1 PYTEST_K=depthlm bash benchmarks/gpu_session.sh tests (then ... bench depthlm): DepthLM's
#     Pixtral through vLLM on this host, with .whl-tf/ carried (transformers 5.16.1; see below)
# After `bench`, /tmp/densify-best-options.json holds the engine options (beyond engine_bench's base) of the
# fastest valid bf16 Ray-pool row at 12 tokens, for the next call: --engine-options "$(cat /tmp/densify-best-options.json)".
# e.g. the last staging call and the tests together:
#   bash .gpu-stage/p5/recv.sh && bash benchmarks/gpu_session.sh tests
# Writes $OUT/gpu-tests.log, $OUT/bench.log, $OUT/engine_bench-*.json, $OUT/env.txt (at most 8 files come
# back from the host). PYTEST_K=EXPR selects tests (pytest -k). Exit status: that of the last step that failed, else 0.
set -uo pipefail
what=${1:-all}
if [ "$what" = scaling ] || [ "$what" = pipeline ] || [ "$what" = depth ]; then shift; extra=("$@"); else phases=${2:-base,depthlm,hf,cascade,fp8}; extra=("${@:3}"); fi
OUT=${OUT:-/tmp/densify-gpu-out}
mkdir -p "$OUT"
if [ -f /tmp/gpu-env.sh ]; then
  # shellcheck disable=SC1091
  source /tmp/gpu-env.sh
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Extra wheels carried in .whl/ (git-ignored): vLLM's api_server (the `vllm serve` test) imports
# model_hosting_container_standards, which the stage lacks; py-spy for engine_bench --pyspy. Made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#     model-hosting-container-standards jmespath supervisor py-spy
# The host's own OpenCV lacks the contrib modules (cv2.ximgproc) that the edge-aware densifier and the
# adaptive plan need (`pipeline` dense maps, `densify depth` defaults): carry
# opencv-contrib-python-headless==4.10.0.84 (56 MB) in .whl-cv/, in a call of its own (64 MiB per transfer);
# carried folders stay on the host for later calls. The host has no Open3D: pipeline_bench writes no cloud.ply there.
# .whl-cv/ holds the OpenCV wheel alone (it fills a transfer by itself); each folder is installed once per host.
for w in .whl .whl-cv; do
  if ls "$w"/*.whl >/dev/null 2>&1 && [ ! -f "/tmp/site/.installed-$w" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$w"/*.whl >/dev/null 2>&1 \
      && touch "/tmp/site/.installed-$w"
  fi
done
# DepthLM's Pixtral on this host: the staged vLLM 0.26.0's Pixtral code imports two helpers that the host's
# transformers 5.17 dropped (`python -m benchmarks.transformers_names` lists such names; 5.16.1 has them all).
# Carry transformers 5.16.1 in .whl-tf/ (pip download --no-deps transformers==5.16.1 -d .whl-tf; 12 MB, the same
# requirements as 5.17) and set PIXTRAL_TRANSFORMERS=1: installed once into /tmp/site-tf, first on the path of
# that call only, so the other calls keep the host's transformers.
if ls .whl-tf/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site-tf/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-tf .whl-tf/*.whl >/dev/null 2>&1 \
    && touch /tmp/site-tf/.installed
fi
if [ "${PIXTRAL_TRANSFORMERS:-0}" = 1 ]; then
  [ -f /tmp/site-tf/.installed ] || { echo "PIXTRAL_TRANSFORMERS=1: carry .whl-tf/ (transformers 5.16.1) first"; exit 2; }
  export PYTHONPATH="$PWD:/tmp/site-tf:${PYTHONPATH#"$PWD:"}"
fi
export PATH="/tmp/site/bin:$PATH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false
rc=0
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  python3 - <<'EOF'
import importlib
for m in ("torch", "transformers", "vllm", "tokenizers", "pynvml"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(m, "MISSING", type(exc).__name__, exc)
EOF
  # names vLLM's multimodal model files import that this transformers lacks (DepthLM's Pixtral, Qwen3-VL)
  python3 -m benchmarks.transformers_names --only pixtral,llava,qwen3_vl --brief 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$what" = tests ] || [ "$what" = all ]; then
  kargs=()
  [ -n "${PYTEST_K:-}" ] && kargs=(-k "$PYTEST_K")
  python3 -m pytest -m gpu -v -s -rA -p no:cacheprovider "${kargs[@]}" tests/test_engine_vllm.py tests/test_forcing_gpu.py 2>&1 \
    | grep --line-buffered -v "jit_monitor\|Capturing CUDA graphs" | tee "$OUT/gpu-tests.log"
  r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
fi
# one 4B-shaped model folder per host (dummy weights), shared by the benchmarks of a session
MODEL=/tmp/densify-m4b
if [ "$what" != tests ] && [ ! -f "$MODEL/config.json" ]; then
  python3 -c "from densify.synthetic.models import build_model_folder as b; b('$MODEL', shape='4b')" || rc=1
fi
# depth --answer TEXT: a 4B-shaped folder with real weights whose greedy answer is TEXT, once per host (per TEXT)
answer=
if [ "$what" = depth ]; then
  for ((i = 0; i < ${#extra[@]}; i++)); do
    case "${extra[$i]}" in
      --answer) answer=${extra[$((i + 1))]:-} ;;
      --answer=*) answer=${extra[$i]#--answer=} ;;
    esac
  done
fi
if [ -n "$answer" ]; then
  MODEL=/tmp/densify-m4b-answer
  if ! ANSWER="$answer" python3 -c "import os, sys; from densify.synthetic.models import fixed_answer_of as f; sys.exit(f('$MODEL') != os.environ['ANSWER'])" 2>/dev/null; then
    rm -rf "$MODEL"
    python3 -m densify.synthetic.models "$MODEL" --shape 4b --answer "$answer" || rc=1
  fi
fi
if [ "$what" = scaling ]; then
  python3 -m benchmarks.scaling_bench --out "$OUT" --model "$MODEL" "${extra[@]}" 2>&1 \
    | grep --line-buffered -v "jit_monitor\|Capturing CUDA graphs" | tee "$OUT/scaling.log"
  r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
fi
if [ "$what" = pipeline ]; then
  python3 -m benchmarks.pipeline_bench --out "$OUT" --model "$MODEL" "${extra[@]}" 2>&1 \
    | grep --line-buffered -v "jit_monitor\|Capturing CUDA graphs" | tee "$OUT/pipeline.log"
  r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
fi
if [ "$what" = depth ]; then
  python3 -m benchmarks.depth_bench --out "$OUT" --model "$MODEL" "${extra[@]}" 2>&1 \
    | grep --line-buffered -v "jit_monitor\|Capturing CUDA graphs" | tee "$OUT/depth.log"
  r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
fi
# and one Pixtral-12B-shaped folder (DepthLM's released architecture, dummy weights) for the depthlm phase
PIXTRAL=/tmp/densify-pixtral12b
if [ "$what" != tests ] && [[ ",${phases:-}," == *",depthlm,"* ]] && [ ! -f "$PIXTRAL/config.json" ]; then
  python3 -c "from densify.synthetic.models import build_model_folder as b; b('$PIXTRAL', shape='pixtral-12b')" || rc=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  dargs=()
  [ -f "$PIXTRAL/config.json" ] && dargs=(--depthlm-model "$PIXTRAL")
  python3 -m benchmarks.engine_bench --out "$OUT" --phases "$phases" --model "$MODEL" "${dargs[@]}" "${extra[@]}" 2>&1 \
    | grep --line-buffered -v "jit_monitor\|Capturing CUDA graphs" | tee "$OUT/bench.log"
  r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
  python3 -m benchmarks.engine_bench --best "$OUT"/engine_bench-*.json > /tmp/densify-best-options.json
  echo "best bf16 pool options: $(cat /tmp/densify-best-options.json)"
fi
exit $rc
