#!/usr/bin/env bash
# GPU check for issue #16, for a machine with a CUDA device (e.g. the device tool's H200). Under 8 minutes:
#   1. installs qwenkit (and wheels carried in .whl/, for packages the machine lacks) without touching its torch,
#   2. runs the CUDA tests (tests/test_cuda.py),
#   3. runs `qwenkit bench --device cuda` for bf16, fp16, int8 and int4 on a full-size synthetic 1.8B,
#   4. prints one summary table (also written to $OUT/gpu_check.md when OUT is set).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out=${OUT:-/tmp/qwenkit-gpu}; mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.txt"
tests_rc=${PIPESTATUS[0]}

ckpt=/tmp/qwenkit-ckpt/1.8b
[ -f $ckpt/config.json ] || timeout 120 python3 -m qwenkit make-checkpoint $ckpt --preset 1.8b >/dev/null
table="| precision | generate 2048 tok/s | peak GPU GB encoding 2048 | peak GPU GB generating 8192 |\n|---|---|---|---|"
for p in bf16 fp16 int8 int4; do
  case $p in bf16) args="--dtype bfloat16";; fp16) args="--dtype float16";; *) args="--dtype bfloat16 --quantize $p";; esac
  timeout 150 python3 -m qwenkit bench -m $ckpt --device cuda $args --gen 2048 --runs 1 --json "$out/bench-$p.json" \
    > "$out/bench-$p.txt" 2>&1 || echo "bench $p failed: $(tail -3 "$out/bench-$p.txt")"
  if [ -f "$out/bench-$p.json" ]; then
    row=$(python3 -c "import json; d=json.load(open('$out/bench-$p.json')); print(f\"| $p | {d['decode_median']:.1f} | {d['peak_encode_gb']:.2f} | {d['peak_generate_gb']:.2f} |\")")
    table="$table\n$row"
  fi
done
printf "\nModel card (A100): BF16 54 tok/s, Int4 71 tok/s; peak BF16 4.23 GB encoding 2048, 6.48 GB generating 8192\n" | tee "$out/gpu_check.md"
printf "$table\n" | tee -a "$out/gpu_check.md"
exit $tests_rc
