#!/usr/bin/env bash
# The CUDA checks in one go, for a machine with a GPU (about 5 minutes on one GPU):
#   1. the CUDA tests (training on the GPU equals the CPU, GPU checkpoints load on the CPU and back, bf16 autocast),
#   2. the torch.compile test with inductor as well as aot_eager (CPU tensors; the compile time is printed),
#   3. the QAT step time against the float step, torch.ao QAT and Brevitas on CUDA, eager and (with
#      GPU_CHECK_COMPILE=1) torch.compile'd with inductor.
# Run from anywhere: benchmarks/gpu_check.sh [OUT_DIR]   (PYTHON=... picks the interpreter; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-bench-out/gpu}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
  | tee "$OUT/device.txt"
"$PY" -m pytest -q -rs tests/test_devices.py 2>&1 | tee "$OUT/tests_devices.txt"
FXQUANT_TEST_INDUCTOR=1 timeout 150 "$PY" -m pytest -q -s tests/test_torch_compile.py 2>&1 \
  | grep -v "^W[0-9]" | tee "$OUT/tests_compile.txt" || echo "compile test failed or ran past 150 s" | tee -a "$OUT/tests_compile.txt"
COMPILE=()
if [[ "${GPU_CHECK_COMPILE:-0}" == "1" ]]; then COMPILE=(--compile inductor); fi
"$PY" benchmarks/bench_step_time.py --device cuda --batch 256 --steps 30 --warmup 5 "${COMPILE[@]}" --out-dir "$OUT" \
  2>&1 | grep -v "^W[0-9]" | tee "$OUT/step_time.txt"
echo "results under $OUT"
