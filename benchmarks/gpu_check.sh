#!/usr/bin/env bash
# One prepared run of the kernel checks on a CUDA machine (about 5 minutes on an H200):
#   1. the `gpu`-marked kernel tests (bf16/fp16 against the torch references, patched tiny models),
#   2. benchmarks/kernel_bench.py at Llama-3-8B shapes and the ~1B training step.
# Works from a plain checkout (no `pip install -e .`): kernels/ and unitrain/ are linked onto the path as
# unitrain_kernels and unitrain (the bare checkout root would expose kernels/ as HF's `kernels`).
# Liger-Kernel columns need `liger_kernel` importable; on a machine without a registry, carry its wheel:
#   pip download --no-deps liger-kernel==0.8.5 -d .whl   (then pass .whl in the run's `carry`)
# Results: benchmarks/results/kernels_<gpu>.md, copied to $OUT when that is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

shim=$(mktemp -d)  # the checkout's packages under their import names; the checkout root stays off the path
ln -s "$PWD/kernels" "$shim/unitrain_kernels"
ln -s "$PWD/unitrain" "$shim/unitrain"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$shim/site" .whl/*.whl && extra="$shim/site:"
fi
export PYTHONPATH="${extra:-}$shim${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

status=0
$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_ops.py tests/test_kernels_patch.py \
  || status=1
$PY benchmarks/kernel_bench.py "$@" || status=1
if [ -n "${OUT:-}" ]; then cp benchmarks/results/kernels_*.md "$OUT"/ 2>/dev/null || true; fi
exit $status
