#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a CUDA GPU (e.g. the `device` tool's H200, whose image has
# torch, transformers, tokenizers, safetensors, triton and pytest; lmforge runs from this checkout, uninstalled):
#   1. the tests marked `cuda` (tests/test_cuda.py): model parity with transformers on the GPU, generation, the
#      compiled (CUDA graphs) decode step, quantized layers, the scheduler, bf16 training and resume;
#   2. benchmarks/cuda_bench.py: forward, greedy decoding and a bf16 training step against transformers, beside
#      the GPU's measured peaks.
# Output lands in $OUT (the device tool's folder that comes back) or ./device-out. At most 9.5 minutes (the
# tool's limit per command is 10): 4 for the tests, 5.5 for the benchmark, which writes its JSON after each part.
#   bash benchmarks/device_check.sh         (BENCH_ARGS="--device cpu --small" checks the script on a CPU)
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export LMFORGE_CACHE=${LMFORGE_CACHE:-/tmp/lmforge-cache} TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
PY=${PYTHON:-python3}
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" 2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$OUT/env.txt"
timeout 240 $PY -m pytest -q -rs -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log"
tests=$?
timeout 330 $PY benchmarks/cuda_bench.py --out "$OUT/cuda.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/cuda_bench.log"
bench=$?
echo "device_check: tests exit $tests, benchmark exit $bench" | tee -a "$OUT/env.txt"
exit $((tests != 0 || bench != 0))
