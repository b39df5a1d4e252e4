#!/usr/bin/env bash
# The exact recipe of the built-in demo model (cdv2/demo_weights): synthetic data -> VAE fit ->
# stage 1 [-> stage 2 -> stage 3] with cdv2's own trainer -> fp16 weights directory.
#
#   tools/train_demo_model.sh [OUT=/tmp/cdv2-demo-model] [STAGE1_STEPS] [STAGE2_STEPS] [STAGE3_STEPS]
#
# Shipped model: OUT=/work/demo_train, STAGE1_STEPS as recorded in cdv2/demo_weights/manifest.json
# ("source": the checkpoint step), stages 2/3 with 0 steps (see docs/DEMO_MODEL.md for why). CPU: the
# step counts are the knob; resuming is automatic (re-run with larger counts to continue).
set -euo pipefail
OUT=${1:-/tmp/cdv2-demo-model}
S1=${2:-1500}
S2=${3:-0}
S3=${4:-0}
RES=64
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/cdv2/xla}  # compile once per machine
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
[ -d "$OUT/data/sketch" ] || python tools/train_demo_model.py data "$OUT/data" --images 4096 --size $RES --seed 0
[ -f "$OUT/weights_init/params.safetensors" ] || \
  python tools/train_demo_model.py init "$OUT/data" "$OUT/weights_init" --vae-steps 500 --batch 8 --crop 64 --lr 2e-3 --seed 0
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
