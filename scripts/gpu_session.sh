#!/usr/bin/env bash
# The GPU figures of README "GPU", measured in one prepared run on a lent GPU machine (the workplace's `device`
# tool: 15 minutes of device time a session, nothing downloadable there, Python 3.12 with CUDA torch,
# transformers and huggingface_hub already installed).
#
#   bash scripts/gpu_session.sh wheels     # here: the missing packages as wheels in .whl/ (git-ignored), at the
#                                          # versions of constraints.txt (torchao too, for FIREGEN_FP8)
#   bash scripts/gpu_session.sh run [BUDGET_S]
#                                          # there (carry .whl; the device call's timeout_s about BUDGET_S + 50):
#                                          # install them aside, then `python -m bench.gpu` for the speed options
#                                          # still unmeasured; figures in $OUT/gpu.json, rewritten after each step
set -euo pipefail
cd "$(dirname "$0")/.."

# What bench.gpu imports beyond that machine's packages: diffusers' own needs are there already (it takes the
# standard library's importlib.metadata), and bench.gpu never imports generation.settings (pydantic). Checked by a
# rehearsal on this CPU in a venv holding only that machine's packages, at its transformers and huggingface_hub.
PINNED=(diffusers torchao)
# The bare baseline was measured before (README); channels-last and fused QKV run (25 s each): they are the product's
# SDXL, which every later step (batching, the compile cache, FP8, SDXL beside Wan) builds on (a review: skipped,
# those ran on the bare bf16 UNet, 3.8 s an image where the product's takes 2.5). The step cache's figures are left
# out: which steps it reuses depends on the data, and random weights say nothing of a trained Wan's (60 s the budget
# gives to FP8 instead, which comes last and starts only if its 150 s are left).
SKIP=sdxl_baseline,wan_cache

case "${1:-}" in
wheels)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
  specs=()
  for name in "${PINNED[@]}"; do
    pin=$(grep -i "^${name}==" constraints.txt) || {
      echo "$name is not in constraints.txt" >&2
      exit 2
    }
    specs+=("$pin")
  done
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${specs[@]}"
  du -sh .whl
  ;;
run)
  budget=${2:-540} # 15 minutes of device time: ~2 to start the machine, ~1 to install, 10 at most per command
  out=${OUT:-out/bench}
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  # As the Dockerfile sets it: the reserved peaks then are the image's.
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  python3 -c 'import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)' |
    tee -a "$out/gpu.txt"
  python3 -m bench.gpu --out "$out/gpu.json" --budget "$budget" --compile-modes= --skip "$SKIP" 2>&1 |
    tee "$out/gpu.log"
  ;;
*)
  sed -n '2,10p' "$0" >&2
  exit 2
  ;;
esac
