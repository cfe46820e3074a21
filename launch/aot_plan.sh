#!/usr/bin/env bash
# Reproduces docs/tpu_plan.md: AOT-compiles SGT-BAGEL-7B's train step (configs/sgt_bagel_7b.py)
# for each row below on this machine (libtpu needed, no TPU), writing OUT/<row>.json, then prints
# the markdown table.
#
#   launch/aot_plan.sh [OUT_DIR] [ROW_NAME_REGEX]      (defaults: /tmp/tpu_plan, every row)
#
# One row = name | topology | extra flags for python -m sgt_jax.aot; AOT_FLAGS adds flags to every
# row (e.g. AOT_FLAGS=--components=no skips the per-phase attribution of rows that do not fit). Rows that do not fit in HBM
# fail fast (~1 min); rows that fit take 5-20 min each on 2 cores (TPU codegen of the VAE's
# 1024 px convolutions dominates; cached per shape in ~/.cache/sgt_jax_aot).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-/tmp/tpu_plan}
FILTER=${2:-.}
mkdir -p "$OUT"
export JAX_PLATFORMS=cpu

C=--config=configs/sgt_bagel_7b.py
# the plan's batch: 64 rows of 16k, 6 VAE images per row (the preset ships the paper's 16 rows, 4)
PLAN="--config.data.rows_per_batch=64 --config.data.vae_images_per_row=6"
FSDP_V5P="--config.train.grad_accum=2"                               # 32 chips: 2 rows/chip -> 1 per micro-batch
TP_V5P="--config.mesh.tensor=4 --config.train.grad_accum=8"          # fsdp 8 x tensor 4
FSDP_V6E="--config.train.grad_accum=1"                               # 64 chips: 1 row/chip
TP_V6E="--config.mesh.tensor=4 --config.train.grad_accum=4"          # fsdp 16 x tensor 4
ROWS8K="--config.data.rows_per_batch=128 --config.data.tokens_per_row=8192 --config.data.gen_tokens_per_row=5120 --config.data.vit_patches_per_row=3072 --config.data.vae_images_per_row=3 --config.data.max_tokens_per_sample=8192"

RUNS=(
  "v5p128_fsdp_full|v5p-128|--config.train.grad_accum=1"
  "v5p64_fsdp_full|v5p-64|$FSDP_V5P"
  "v5p64_fsdp_qkv|v5p-64|$FSDP_V5P --config.model.llm.remat_policy=save_qkv_proj"
  "v5p64_fsdp_minimal|v5p-64|$FSDP_V5P --config.model.llm.remat_policy=minimal"
  "v5p64_tp4_full|v5p-64|$TP_V5P"
  "v5p64_tp4_qkv|v5p-64|$TP_V5P --config.model.llm.remat_policy=save_qkv_proj"
  "v6e64_fsdp_full|v6e-64|$FSDP_V6E"
  "v6e64_tp4_full|v6e-64|$TP_V6E"
  "v5p64_fsdp_full_flash|v5p-64|$FSDP_V5P --config.model.llm.attention_impl=flash"
  "v5p64_fsdp_full_flash_accum1|v5p-64|--config.train.grad_accum=1 --config.model.llm.attention_impl=flash"
  "v6e64_fsdp_full_flash|v6e-64|$FSDP_V6E --config.model.llm.attention_impl=flash"
  "v5p64_fsdp_minimal_flash|v5p-64|$FSDP_V5P --config.model.llm.remat_policy=minimal --config.model.llm.attention_impl=flash"
  "v5p64_fsdp_qkv_flash|v5p-64|$FSDP_V5P --config.model.llm.remat_policy=save_qkv_proj --config.model.llm.attention_impl=flash"
  "v5p32_fsdp_full_flash|v5p-32|--config.train.grad_accum=4 --config.model.llm.attention_impl=flash"
  "v5p32_fsdp_full_8k|v5p-32|$ROWS8K --config.train.grad_accum=8"
  "v5p64_fsdp_full_8k|v5p-64|$ROWS8K --config.train.grad_accum=4"
  "v6e64_fsdp_full_8k|v6e-64|$ROWS8K --config.train.grad_accum=2"
)

for row in "${RUNS[@]}"; do
  IFS='|' read -r name topo flags <<<"$row"
  [[ $name =~ $FILTER ]] || continue
  # the preset ships attention_impl=auto (flash on TPU): the rows without _flash are the dense ones
  [[ $flags == *attention_impl* ]] || flags="$flags --config.model.llm.attention_impl=dense"
  [[ -f $OUT/$name.json ]] && { echo "== $name: $OUT/$name.json exists, skipped"; continue; }
  echo "== $name: python -m sgt_jax.aot $C --topology $topo $PLAN $flags"
  # shellcheck disable=SC2086  # $flags is a list of flags
  python -m sgt_jax.aot "$C" --topology "$topo" $PLAN $flags ${AOT_FLAGS:-} --out "$OUT/$name.json" 2>"$OUT/$name.err" \
    | tee "$OUT/$name.log" || true
done
mapfile -t reports < <(ls "$OUT"/*.json 2>/dev/null)
((${#reports[@]})) || exit 0
table=()
for r in "${reports[@]}"; do table+=(--table "$r"); done
python -m sgt_jax.aot "${table[@]}"
