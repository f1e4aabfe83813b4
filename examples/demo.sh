#!/usr/bin/env bash
# The main job on the shipped example: look at the adapter, validate it, normalize it into the stacked
# layout, and prove the result through the Triton kernels against PEFT's semantics.
set -euo pipefail
cd "$(dirname "$0")/.."
LC=.venv/bin/lora-convert
EX=examples/tiny-deepseek-v3
OUT=demo-out

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "lora-convert inspect $EX/adapter"
$LC inspect "$EX/adapter"

if $LC validate --help >/dev/null 2>&1; then
  step "lora-convert validate $EX/adapter --base $EX/base --engine sglang   (engine findings expected)"
  $LC validate "$EX/adapter" --base "$EX/base" --engine sglang || echo "(validate exit code $?: the findings above are what SGLang would get wrong)"
fi

step "lora-convert normalize $EX/adapter --base $EX/base --dry-run"
$LC normalize "$EX/adapter" --base "$EX/base" --dry-run

step "lora-convert normalize $EX/adapter --base $EX/base -o $OUT/stacked --force"
$LC normalize "$EX/adapter" --base "$EX/base" -o "$OUT/stacked" --force

step "lora-convert smoke $OUT/stacked --original $EX/adapter --base $EX/base"
$LC smoke "$OUT/stacked" --original "$EX/adapter" --base "$EX/base"

step "lora-convert normalize $EX/adapter --base $EX/base --layout sglang -o $OUT/sglang --force   (what SGLang 0.5.23 loads as-is)"
$LC normalize "$EX/adapter" --base "$EX/base" --layout sglang -o "$OUT/sglang" --force
$LC validate "$OUT/sglang" --base "$EX/base" --engine sglang --no-smoke

step "done: the stacked adapter is in $OUT/stacked (adapter_model.safetensors, adapter_config.json, lora_layout.json)"
