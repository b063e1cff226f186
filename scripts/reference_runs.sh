#!/usr/bin/env bash
# Outputs of the main commands on a seeded synthetic scene with the simulated engine, for
# scripts/compare_runs.py: run at two revisions, then `python scripts/compare_runs.py A B`.
#   bash scripts/reference_runs.sh OUT
set -euo pipefail
DENSIFY=${DENSIFY:-densify}  # e.g. "python -m pipelines" from a checkout
out=${1:?usage: reference_runs.sh OUT}
mkdir -p "$out"
$DENSIFY demo --out "$out/demo" >/dev/null
$DENSIFY synth --out "$out/scene" --views 4 --width 320 --height 240 >/dev/null
$DENSIFY depth "$out/scene" --out "$out/depth" --engine simulated >/dev/null
$DENSIFY reconstruct "$out/scene" --out "$out/recon" --engine simulated >/dev/null
$DENSIFY label "$out/scene" --out "$out/label" --engine simulated --count 512 >/dev/null
echo "reference runs in $out"
