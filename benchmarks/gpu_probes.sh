#!/usr/bin/env bash
# Probe sweeps of the paper's six Table 1 tasks on GPUs, stores of random features of a 7B MLM's
# shape (27 x 27 = 729 tokens per image, head_dim 128, bfloat16).
# Usage: bash benchmarks/gpu_probes.sh [--out DIR] [--gpus 1|2]
#   --gpus 1 (default): one H100 (16 cores, 64 GiB disk), one command per task, each sized to finish
#            in under 8 minutes including building its store; stores are deleted after each task.
#   --gpus 2: two GPUs of one host, the local sweep on one GPU against Ray with one actor per GPU,
#            every row checked equal, then once more with one actor SIGKILLed mid-sweep.
# Figures are written as JSON under --out (default bench-out); docs/BENCHMARKS.md says how to read them.
set -uo pipefail
out=bench-out
gpus=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "gpu_probes.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $gpus in 1|2) ;; *) echo "gpu_probes.sh: --gpus $gpus: 1 or 2" >&2; exit 2 ;; esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1
stores=${TMPDIR:-/tmp}/kvpipe-probe-stores
sweep() { python3 -m kvpipe.benchmarks.sweep --device cuda "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [[ $gpus == 1 ]]; then
  # semantic-corr, SPair-71k test: 1,000 pairs over 200 images, 28 layers x 4 KV heads, post-proj 3584
  # (225 targets; about 6.8 GiB on disk)
  sweep --probe semantic-corr --out "$stores/spair" --repeat 2 --search auto,torch --json "$out/probe-semantic-corr.json"
  rm -rf "$stores/spair"
  # temporal-corr, DAVIS-2017 val: 30 videos, 1,999 frames of 854x480; 2 layers x 4 heads, post-proj 1024
  # (17 targets; about 8.3 GiB)
  sweep --probe temporal-corr --out "$stores/davis" --layers 2 --heads 4 --hidden 1024 --repeat 1 \
      --json "$out/probe-temporal-corr.json"
  rm -rf "$stores/davis"
  # fg-seg, Pascal-5i fold 0: 1,000 episodes over 346 images; 4 layers x 4 heads, post-proj 1024
  # (33 targets; about 2 GiB on disk, estimated)
  sweep --probe fg-seg --out "$stores/pascal" --layers 4 --heads 4 --hidden 1024 --repeat 1 \
      --json "$out/probe-fg-seg.json"
  rm -rf "$stores/pascal"
  # cosegmentation, MSRC: 14 sets of 30 images (420); 2 layers x 4 heads, post-proj 1024
  # (17 targets; about 1.4 GiB, estimated; k-means runs in faiss on the CPU)
  sweep --probe cosegmentation --out "$stores/msrc" --layers 2 --heads 4 --hidden 1024 --repeat 1 \
      --json "$out/probe-cosegmentation.json"
  rm -rf "$stores/msrc"
  # semantic-seg, ImageNet-S-50 val: 752 images, 50 class queries; 8 layers x 4 heads (64 targets),
  # post-proj 1024 (not scored; about 7.3 GiB, estimated)
  sweep --probe semantic-seg --out "$stores/imagenet-s" --layers 8 --heads 4 --hidden 1024 --repeat 1 \
      --json "$out/probe-semantic-seg.json"
  rm -rf "$stores/imagenet-s"
  # refexp-seg, RefCOCO val: 1,500 images, 10,834 sentences; 2 layers x 4 heads (16 targets),
  # post-proj 256 (about 3.7 GiB, estimated)
  sweep --probe refexp-seg --out "$stores/refcoco" --layers 2 --heads 4 --hidden 256 --repeat 1 \
      --json "$out/probe-refexp-seg.json"
  rm -rf "$stores/refcoco"
else
  # local (one GPU) against Ray (one actor per GPU), semantic-seg as above: 64 targets
  sweep --probe semantic-seg --out "$stores/imagenet-s" --layers 8 --heads 4 --hidden 1024 --repeat 1 \
      --executor local,ray --json "$out/probe-ray-semantic-seg.json"
  # the same with one actor SIGKILLed 30 s after the actors start
  sweep --probe semantic-seg --out "$stores/imagenet-s" --layers 8 --heads 4 --hidden 1024 --repeat 1 \
      --executor local,ray --kill-one-after 30 --no-raw-read --json "$out/probe-ray-kill-semantic-seg.json"
  # temporal-corr (17 targets over 1,999 frames) local against Ray
  sweep --probe temporal-corr --out "$stores/davis" --layers 2 --heads 4 --hidden 1024 --repeat 1 \
      --executor local,ray --json "$out/probe-ray-temporal-corr.json"
  rm -rf "$stores/imagenet-s" "$stores/davis"
fi
