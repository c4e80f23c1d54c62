#!/usr/bin/env bash
# Extraction benchmarks on one GPU: full-size architectures with random weights.
# Usage: bash benchmarks/gpu_extract.sh [--out DIR] [--models qwen|llava|llava-values|families|encodings|all]
#   (kvpipe importable, a CUDA device; defaults: --out bench-out --models all)
# Each line is one process: floor, kvpipe (lossless bf16 and int8) and the naive loop share the
# model, the images and the batch size.
set -uo pipefail
out=bench-out
which=all
while [[ $# -gt 0 ]]; do
  case $1 in
    --out|--dir) out=$2; shift 2 ;;
    --models) which=$2; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "gpu_extract.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $which in qwen|llava|llava-values|families|encodings|all) ;; *) echo "gpu_extract.sh: --models $which: one of qwen, llava, llava-values, families, encodings, all" >&2; exit 2 ;; esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
kv() { python3 -m kvpipe.cli bench extract "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [[ $which == llava || $which == all ]]; then
  # LLaVA-OneVision 7B at 384x384 (base view + 1 crop, 1485 tokens), all layers/heads, keys + values
  kv --model llava-ov --size 384 --images 512 --batch-size 8 --part-size 16 --naive-images 24 \
     --runs floor-hf,floor-kvpipe,kvpipe,kvpipe-lz4bit,kvpipe-int8,naive --json "$out/llava-ov-384-b8.json"
fi
if [[ $which == qwen || $which == all ]]; then
  # Qwen2.5-VL 7B at 448x448 (256 image tokens), all layers/heads, keys + values
  kv --model qwen25vl --size 448 --images 512 --batch-size 32 --part-size 64 --naive-images 16 \
     --runs floor-hf,floor-kvpipe,kvpipe,kvpipe-int8,naive --json "$out/qwen25vl-448-b32.json"
fi
if [[ $which == llava-values || $which == all ]]; then
  # values only (half the bytes)
  kv --model llava-ov --size 384 --images 128 --batch-size 8 --part-size 16 --kinds values --runs kvpipe \
     --json "$out/llava-ov-384-b8-values.json"
fi
if [[ $which == families ]]; then
  # The newer families at 448x448, full-size architectures, all layers/heads, keys + values
  for m in qwen3vl internvl3 gemma3 llava15 smolvlm2; do
    kv --model $m --size 448 --images 128 --batch-size 16 --part-size 32 --naive-images 8 \
       --runs floor-hf,floor-kvpipe,kvpipe,naive --json "$out/$m-448-b16.json" || echo "$m: failed"
  done
fi
if [[ $which == encodings ]]; then
  # the store encodings and views, each run one process writing JSON (96-128 images: a minute or
  # two each on an H100): lossless bf16, int8, int4; LLaVA-OV with every view and the base view only
  for enc in bfloat16 int8 int4; do
    kv --model qwen25vl --size 448 --images 128 --batch-size 32 --part-size 64 --runs kvpipe \
       --store-dtype $enc --json "$out/enc-qwen25vl-448-$enc.json"
    for views in all base; do
      kv --model llava-ov --size 384 --images 96 --batch-size 8 --part-size 16 --runs kvpipe \
         --store-dtype $enc --views $views --json "$out/enc-llava-ov-384-$enc-$views.json"
    done
  done
fi

