#!/usr/bin/env bash
# The exact recipe of the built-in demo model (cdv2/demo_weights): synthetic data -> VAE fit ->
# stage 1 [-> stage 2 -> stage 3] with cdv2's own trainer -> fp16 weights directory.
#
#   tools/train_demo_model.sh [OUT=/tmp/cdv2-demo-model] [STAGE1_STEPS] [STAGE2_STEPS] [STAGE3_STEPS]
#
# Shipped model: tools/train_demo_model.sh OUT 8000 1500 1500 (the defaults; docs/DEMO_MODEL.md).
# CPU: the step counts are the knob; resuming is automatic (re-run with larger counts to continue).
set -euo pipefail
OUT=${1:-/tmp/cdv2-demo-model}
S1=${2:-8000}
S2=${3:-1500}
S3=${4:-1500}
RES=64
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/cdv2/xla}  # compile once per machine
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
[ -d "$OUT/data/sketch" ] || python tools/train_demo_model.py data "$OUT/data" --images 4096 --size $RES --seed 0
# the VAE: 1000 steps at 2e-3, then 1500 more at 1e-3 (cosine each)
[ -f "$OUT/weights_vae/params.safetensors" ] || \
  python tools/train_demo_model.py init "$OUT/data" "$OUT/weights_vae" --vae-steps 1000 --batch 8 --crop 64 --lr 2e-3 --seed 0
[ -f "$OUT/weights_init/params.safetensors" ] || \
  python tools/train_demo_model.py init "$OUT/data" "$OUT/weights_init" --vae-from "$OUT/weights_vae" \
    --vae-steps 1500 --batch 8 --crop 64 --lr 1e-3 --seed 1
python -m cdv2.train --config demo_stage1 --data "$OUT/data" --workdir "$OUT/run_stage1" \
  --max-steps "$S1" --set init_from="$OUT/weights_init"
python tools/train_demo_model.py export "$OUT/run_stage1/checkpoints" "$OUT/weights_stage1"
FINAL=stage1
if [ "$S2" -gt 0 ]; then
  python -m cdv2.train --config demo_stage2 --data "$OUT/data" --workdir "$OUT/run_stage2" \
    --max-steps "$S2" --set init_from="$OUT/weights_stage1"
  python tools/train_demo_model.py export "$OUT/run_stage2/checkpoints" "$OUT/weights_stage2"
  FINAL=stage2
  if [ "$S3" -gt 0 ]; then
    python -m cdv2.train --config demo_stage3 --data "$OUT/data" --workdir "$OUT/run_stage3" \
      --max-steps "$S3" --set init_from="$OUT/weights_stage2"
    python tools/train_demo_model.py export "$OUT/run_stage3/checkpoints" "$OUT/weights_stage3"
    FINAL=stage3
  fi
fi
python tools/train_demo_model.py export "$OUT/run_$FINAL/checkpoints" "$OUT/weights_fp16" --dtype float16
echo "built-in model candidate: $OUT/weights_fp16 (copy to cdv2/demo_weights)"
