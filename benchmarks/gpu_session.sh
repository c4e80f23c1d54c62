#!/usr/bin/env bash
# H100 runs of about 7 minutes each: the store encodings/views (extraction), temporal-corr and
# fg-seg (probes), the other four Table 1 probes (probes-rest), the lossy encodings' fidelity on
# Qwen2.5-VL-7B's shape (fidelity), at reduced sizes; temporal-corr at DAVIS-2017 val's full size,
# fg-seg and cosegmentation with each target's compute seconds and a profile of one (profile);
# int4 and int8 reads of one target against the raw read of the lossless files (reads); the capture
# stages of int8 and int4 extraction (stages); semantic-corr, semantic-seg and refexp-seg per target
# (per-target); temporal-corr's full-size run alone (temporal),
# the profile's other two (profile-rest); int8 against int4 extraction and int4's slices
# (int4-write), the same with post-proj stored (int4-write-post-proj), both in rounds of
# alternating order on 192 images, 4 with post-proj and 8 without (int4-rounds); fg-seg's solver in its two spaces at the
# post-proj shape (solver);
# semantic-corr's timed 225-target sweep of a 7B-shaped store (full-sweep); int4's fidelity on 96
# images of Qwen2.5-VL-7B's shape (fidelity-96), and on 192 and 384 (fidelity-192, fidelity-384);
# what structure int4 leaves uncoded in lossless stores of both 7B shapes (structure);
# the pca encoding beside the others, bytes and write speed, then int8 against pca in alternating
# rounds (pca-write); pca's fidelity at one step on 384 images of Qwen2.5-VL-7B's shape (pca-fidelity-STEP);
# the host's encoder pool on a part of each 7B shape, every encoding and pca with BLAS free (encoder-pool);
# pca's reads beside int4's and the raw read, on the host's cores and to the GPU (pca-reads);
# every command
# is bounded so a slow one cannot starve the rest.
# Usage: bash benchmarks/gpu_session.sh OUT_DIR [all|encodings|probes|probes-rest|fidelity|profile|profile-rest|temporal|reads|stages|per-target|int4-write|int4-write-post-proj|int4-rounds|solver|full-sweep|fidelity-96|fidelity-192|fidelity-384|structure|pca-write|pca-fidelity-STEP|encoder-pool|pca-reads]
#        (kvpipe importable, a CUDA device)
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR [all|encodings|probes|probes-rest|fidelity|profile|profile-rest|temporal|reads|stages|per-target|int4-write|int4-write-post-proj|int4-rounds|solver|full-sweep|fidelity-96|fidelity-192|fidelity-384|structure|pca-write|pca-fidelity-STEP|encoder-pool|pca-reads]}
what=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
stores=${TMPDIR:-/tmp}/kvpipe-gpu-session
bounded() { local secs=$1 name=$2; shift 2; timeout "$secs" "$@" 2>&1 | grep -v Warning > "$out/$name.log"; tail -30 "$out/$name.log"; }
kv=(python3 -m kvpipe.cli bench extract)  # arrays, not functions: timeout runs a program
sweep=(python3 -m kvpipe.benchmarks.sweep --device cuda --repeat 1)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [[ $what == all || $what == encodings ]]; then
# encodings, one process per model and view choice: lossless bf16, int8, int4 on the same images
bounded 110 enc-qwen25vl "${kv[@]}" --model qwen25vl --size 448 --images 96 --batch-size 32 --part-size 32 \
    --runs floor-hf,kvpipe,kvpipe-int8,kvpipe-int4 --json "$out/enc-qwen25vl-448.json"
bounded 100 enc-llava-ov-base "${kv[@]}" --model llava-ov --size 384 --images 48 --batch-size 8 --part-size 16 --views base \
    --runs floor-hf,kvpipe,kvpipe-int8,kvpipe-int4 --json "$out/enc-llava-ov-384-base.json"
bounded 60 enc-llava-ov-all "${kv[@]}" --model llava-ov --size 384 --images 48 --batch-size 8 --part-size 16 --views all \
    --runs kvpipe --json "$out/enc-llava-ov-384-all.json"
fi
if [[ $what == all || $what == probes ]]; then
# probe sweeps (7B shape: 27 x 27 tokens, head_dim 128), one layer x 4 KV heads (keys + values) +
# post-proj = 9 targets each; every target reads and scores the whole dataset, so the per-target
# figures carry over to the 225-target sweep
bounded 150 probe-temporal-corr "${sweep[@]}" --probe temporal-corr --out "$stores/davis" --videos 5 --images 333 \
    --layers 1 --heads 4 --hidden 1024 --json "$out/probe-temporal-corr.json"
rm -rf "$stores/davis"
bounded 70 probe-fg-seg "${sweep[@]}" --probe fg-seg --out "$stores/pascal" --layers 1 --heads 4 --hidden 1024 \
    --json "$out/probe-fg-seg.json"
rm -rf "$stores/pascal"
fi
if [[ $what == all || $what == probes-rest ]]; then
bounded 100 probe-semantic-corr "${sweep[@]}" --probe semantic-corr --out "$stores/spair" --layers 1 --heads 4 \
    --search torch --json "$out/probe-semantic-corr.json"
rm -rf "$stores/spair"
bounded 100 probe-cosegmentation "${sweep[@]}" --probe cosegmentation --out "$stores/msrc" --layers 1 --heads 4 \
    --hidden 1024 --json "$out/probe-cosegmentation.json"
rm -rf "$stores/msrc"
bounded 120 probe-semantic-seg "${sweep[@]}" --probe semantic-seg --out "$stores/imagenet-s" --layers 1 --heads 4 \
    --hidden 1024 --json "$out/probe-semantic-seg.json"
rm -rf "$stores/imagenet-s"
bounded 150 probe-refexp-seg "${sweep[@]}" --probe refexp-seg --out "$stores/refcoco" --layers 1 --heads 4 \
    --hidden 256 --json "$out/probe-refexp-seg.json"
rm -rf "$stores/refcoco"
fi
if [[ $what == all || $what == fidelity ]]; then
# the encodings on a full-size architecture's activations (random weights: not real features)
bounded 200 fidelity-qwen25vl python3 -m kvpipe.benchmarks.lossy_fidelity --model qwen25vl --init random \
    --device cuda --dtype bfloat16 --reference-dtype bfloat16 --images 16 --tasks input-agnostic \
    --out "$stores/lossy-7b" --json "$out/fidelity-qwen25vl.json"
fi
if [[ $what == fidelity-96 || $what == fidelity-192 || $what == fidelity-384 ]]; then
# int4 against lossless bf16 on 96, 192 or 384 images (16, 32, 64 synthetic videos of 6 frames) of the
# full-size architecture: every deterministic probe over all 225 targets (cosegmentation's k-means
# spread is measured on the CPU); 192 images take about 3 minutes on an H100, 384 about 5.5
n=${what#fidelity-}
bounded 560 "$what" python3 -m kvpipe.benchmarks.lossy_fidelity --model qwen25vl --init random \
    --device cuda --dtype bfloat16 --reference-dtype bfloat16 --option n_videos=$((n / 6)) --batch-size 16 \
    --part-size 16 --encodings int4 --tasks temporal-corr,fg-seg,semantic-seg,refexp-seg,semantic-corr \
    --out "$stores/lossy-$n" --json "$out/$what.json"
rm -rf "$stores/lossy-$n"
fi
if [[ $what == pca-write ]]; then
bounded 150 pca-qwen25vl "${kv[@]}" --model qwen25vl --size 448 --images 96 --batch-size 32 --part-size 32 \
    --runs floor-hf,kvpipe,kvpipe-int8,kvpipe-int4,kvpipe-pca --json "$out/pca-qwen25vl-448.json"
bounded 150 pca-llava-ov-base "${kv[@]}" --model llava-ov --size 384 --images 48 --batch-size 8 --part-size 16 \
    --views base --runs floor-hf,kvpipe,kvpipe-int8,kvpipe-int4,kvpipe-pca --json "$out/pca-llava-ov-384-base.json"
bounded 200 pca-rounds "${kv[@]}" --model qwen25vl --size 448 --images 192 --batch-size 32 --part-size 32 \
    --runs kvpipe-int8,kvpipe-pca --rounds 4 --json "$out/pca-rounds.json"
fi
if [[ $what == pca-fidelity-* ]]; then
# pca at one step (pca-fidelity-0.35: the default, int4's error; 0.42: 1.4 x it) against lossless bf16 on 384
# images; the stores stay, so the next step's run (--resume) reuses the lossless one
step=${what#pca-fidelity-}
bounded 570 "$what" python3 -m kvpipe.benchmarks.lossy_fidelity --model qwen25vl --init random \
    --device cuda --dtype bfloat16 --reference-dtype bfloat16 --option n_videos=64 --batch-size 16 \
    --part-size 16 --encodings pca@$step --tasks temporal-corr,fg-seg,semantic-seg,refexp-seg,semantic-corr \
    --out "$stores/pca-384" --resume --json "$out/$what.json"
fi
if [[ $what == encoder-pool ]]; then
# the host's encoder pool (16 cores) on one part of a lossless store of each 7B shape: every encoding's
# images/s, pca's with numpy's BLAS on one thread against BLAS free
bounded 150 pool-extract-qwen25vl python3 -m kvpipe.cli extract --model qwen25vl --init random --dataset synthetic \
    --limit 32 --part-size 32 --image-size 448x448 --dtype bfloat16 --out "$stores/pool-qwen25vl"
bounded 100 encoder-pool-qwen25vl python3 -m kvpipe.benchmarks.encoder_pool "$stores/pool-qwen25vl" --rounds 5 \
    --json "$out/encoder-pool-qwen25vl.json"
rm -rf "$stores/pool-qwen25vl"
bounded 150 pool-extract-llava-ov python3 -m kvpipe.cli extract --model llava-ov --init random --dataset synthetic \
    --limit 16 --part-size 16 --image-size 384x384 --views base --dtype bfloat16 --out "$stores/pool-llava-ov"
bounded 100 encoder-pool-llava-ov python3 -m kvpipe.benchmarks.encoder_pool "$stores/pool-llava-ov" --rounds 5 \
    --json "$out/encoder-pool-llava-ov.json"
rm -rf "$stores/pool-llava-ov"
fi
if [[ $what == int4-write ]]; then
# int8 against int4 extraction alone, same process and images (the encodings mode has them too)
bounded 110 int4-write "${kv[@]}" --model qwen25vl --size 448 --images 96 --batch-size 32 --part-size 32 \
    --runs kvpipe-int8,kvpipe-int4 --json "$out/int4-write.json"
bounded 60 int4-slices python3 -m kvpipe.benchmarks.int4_slices --device cuda --tokens 8192 --repeats 5 \
    --json "$out/int4-slices.json"
fi
if [[ $what == int4-write-post-proj ]]; then
bounded 110 int4-write-post-proj "${kv[@]}" --model qwen25vl --size 448 --images 96 --batch-size 32 --part-size 32 \
    --kinds keys,values,post_proj --runs kvpipe-int8,kvpipe-int4 --json "$out/int4-write-post-proj.json"
fi
if [[ $what == int4-rounds ]]; then
bounded 240 int4-rounds-post-proj "${kv[@]}" --model qwen25vl --size 448 --images 192 --batch-size 32 --part-size 32 \
    --kinds keys,values,post_proj --runs kvpipe-int8,kvpipe-int4 --rounds 4 --json "$out/int4-rounds-post-proj.json"
bounded 300 int4-rounds "${kv[@]}" --model qwen25vl --size 448 --images 192 --batch-size 32 --part-size 32 \
    --runs kvpipe-int8,kvpipe-int4 --rounds 8 --json "$out/int4-rounds.json"
fi
if [[ $what == solver ]]; then
# fg-seg's Newton steps in the feature space against the support tokens' space: 1,000 episodes of
# 5 x 48 tokens x 3,584 (the post-proj target of small images), fg-seg's batches
bounded 150 solver python3 -m kvpipe.benchmarks.linear_probes --devices cuda --episodes 1000 --tokens 48 \
    --dim 3584 --spaces tokens,features --repeat 3 --json "$out/solver.json"
fi
if [[ $what == all || $what == profile || $what == temporal ]]; then
# 1,999 frames of 854 x 480 in 30 videos (2 heads, post-proj 128: 5 targets, about 1.5 GiB), then
# the two probes above 3 minutes per 225 targets; each prints the first target's compute, the
# median of the rest, and the busiest device operations of the second target
bounded 220 profile-temporal-corr "${sweep[@]}" --probe temporal-corr --out "$stores/davis-full" --layers 1 \
    --heads 2 --hidden 128 --no-raw-read --profile --host-decode --json "$out/profile-temporal-corr.json"
rm -rf "$stores/davis-full"
fi
if [[ $what == all || $what == profile || $what == profile-rest ]]; then
bounded 90 profile-fg-seg "${sweep[@]}" --probe fg-seg --out "$stores/pascal" --layers 1 --heads 2 --hidden 128 \
    --no-raw-read --profile --json "$out/profile-fg-seg.json"
rm -rf "$stores/pascal"
bounded 90 profile-cosegmentation "${sweep[@]}" --probe cosegmentation --out "$stores/msrc" --layers 1 --heads 2 \
    --hidden 128 --no-raw-read --profile --json "$out/profile-cosegmentation.json"
fi
if [[ $what == all || $what == per-target ]]; then
# the other three Table 1 probes at their datasets' full shape, 5 targets each (1 layer x 2 heads
# + post-proj 128): each target's compute (first, then the median of the rest) for the 225-target sum
for p in semantic-corr semantic-seg refexp-seg; do
bounded 110 per-target-$p "${sweep[@]}" --probe $p --out "$stores/$p" --layers 1 --heads 2 --hidden 128 \
    --no-raw-read --search torch --json "$out/per-target-$p.json"
rm -rf "$stores/$p"
done
fi
if [[ $what == full-sweep ]]; then
# a timed 225-target sweep (7B shape: 28 layers x 4 KV heads, post-proj 3,584; 6.8 GiB) against the
# projection the per-target modes print
bounded 300 full-sweep-semantic-corr "${sweep[@]}" --probe semantic-corr --out "$stores/spair-7b" --search torch \
    --no-raw-read --json "$out/full-sweep-semantic-corr.json"
rm -rf "$stores/spair-7b"
fi
if [[ $what == all || $what == stages ]]; then
# where int4 extraction's time goes against int8's: the capture stages of each, same model and images
for dtype in int8 int4; do
bounded 150 stages-$dtype python3 -m kvpipe.benchmarks.capture_stages --model qwen25vl --image-size 448 --images 64 \
    --batch-size 16 --store-dtype $dtype --json "$out/stages-$dtype.json"
done
fi
if [[ $what == all || $what == reads ]]; then
# one (layer, head, kind) read per encoding against the raw read of the lossless files, on this host's cores
# (cold: the target's files evicted from the page cache; reads-all: the whole cache emptied)
bounded 120 reads python3 -m kvpipe.benchmarks.encoded_reads --out "$stores/reads" --images 192 --repeats 5 \
    --device cuda --json "$out/reads.json"
bounded 100 reads-all python3 -m kvpipe.benchmarks.encoded_reads --out "$stores/reads" --images 192 --repeats 5 \
    --cold-mode all --json "$out/reads-all.json"
rm -rf "$stores/reads"
bounded 200 reads-768 python3 -m kvpipe.benchmarks.encoded_reads --out "$stores/reads" --images 768 --repeats 5 \
    --json "$out/reads-768.json"
rm -rf "$stores/reads"
fi
if [[ $what == pca-reads ]]; then
# pca's reads beside int4's and the raw read of the lossless files, on this host's cores and to the GPU
bounded 150 pca-reads python3 -m kvpipe.benchmarks.encoded_reads --out "$stores/reads" --images 192 --repeats 5 \
    --encodings int4,pca --device cuda --json "$out/pca-reads.json"
bounded 100 pca-reads-all python3 -m kvpipe.benchmarks.encoded_reads --out "$stores/reads" --images 192 --repeats 5 \
    --encodings int4,pca --cold-mode all --json "$out/pca-reads-all.json"
rm -rf "$stores/reads"
fi
if [[ $what == structure ]]; then
# the bits per value coders would need at int4's error (benchmarks/kv_structure.py), on lossless bf16
# stores of Qwen2.5-VL-7B 448 (96 images) and LLaVA-OV-7B 384, base view (48 images), random weights
for spec in "qwen25vl 448x448 16 base" "llava-ov 384x384 8 base"; do
    read -r model size videos views <<< "$spec"
    bounded 240 "extract-$model" python3 -m kvpipe.cli extract --model "$model" --init random --dataset synthetic \
        --option n_videos="$videos" --image-size "$size" --views "$views" --dtype bfloat16 --store-dtype bfloat16 \
        --device cuda --batch-size 16 --part-size 16 --out "$stores/structure-$model"
    bounded 240 "structure-$model" python3 -m kvpipe.benchmarks.kv_structure "$stores/structure-$model" \
        --workers 14 --json "$out/structure-$model.json"
    rm -rf "$stores/structure-$model"
done
fi
rm -rf "$stores"
