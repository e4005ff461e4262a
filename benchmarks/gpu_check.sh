#!/usr/bin/env bash
# The GPU checks in one run (the device machine: a CUDA image with torch and triton, no network, no install):
# the Triton kernels' tests on the GPU, then the decode-attention benchmark. Results land in $OUT (or ./gpu-out).
# Run from the repository root: bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
# the installed layout (kvpass.lowering, kvpass.plugins) without installing
ln -sfn ../lowering kvpass/lowering
ln -sfn ../plugins kvpass/plugins
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -n 8 tests/lowering/test_triton_attention.py \
    tests/lowering/test_triton_form.py 2>&1 | tail -40 | tee "$OUT/tests.log"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_decode_attention.py --json "$OUT/bench.json" \
    --out "$OUT/section.md" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^|'
rm -f kvpass/lowering kvpass/plugins
