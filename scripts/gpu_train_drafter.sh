#!/usr/bin/env bash
# Retrain the shipped SmolLM2 drafter on the device machine (one 10-minute call).
#
# The verifier's GGUF (98 MB) does not travel in one call with the working tree (64 MiB per
# call), so it goes in three parts (`split -n 3 -d FILE gg.`), one per call, each copied to
# $PARTS by the calls before this one while the machine stays warm:
#   call 1: cp .gpu_drafter/p1/gg.00 /tmp/gguf_parts/   (carry .gpu_drafter/p1)
#   call 2: cp .gpu_drafter/p2/gg.01 /tmp/gguf_parts/   (carry .gpu_drafter/p2)
#   call 3: bash scripts/gpu_train_drafter.sh           (carry .gpu_drafter/p3 .gpu_drafter/whl)
# The gguf reader travels as a wheel (.gpu_drafter/whl). Output: $OUT/drafter.tgz, the exported
# directory and train.log as one archive (a call brings back only a limited number of files: the
# export's weights were left behind when it was written to $OUT file by file).
set -euo pipefail
PARTS=${PARTS:-/tmp/gguf_parts}
# The defaults reproduce the shipped drafter (specmesh/drafters/smollm2-135m). The later retrain
# that did not beat it (README, "The shipped SmolLM2 drafter") was
#   MINUTES=8.2 DATA_SHARE=0.55 EXTRA_ARGS="--generation-batch 3072" bash scripts/gpu_train_drafter.sh
MINUTES=${MINUTES:-7}
EXTRA_ARGS=${EXTRA_ARGS:---context-prompts 0}
mkdir -p "$PARTS/model"
cp .gpu_drafter/p3/gg.02 "$PARTS/" 2>/dev/null || true
cat "$PARTS/gg.00" "$PARTS/gg.01" "$PARTS/gg.02" > "$PARTS/model/SmolLM2-135M-Instruct.Q4_1.gguf"
md5sum "$PARTS/model/SmolLM2-135M-Instruct.Q4_1.gguf"   # a1231443440b107ff29f02bdb38c9d0a
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu_drafter/whl/*.whl .whl/*.whl 2>&1 | tail -2 || true
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.used --format=csv
WORK=$(mktemp -d)
time python3 -m specmesh.cli train-drafter \
    --verifier "$PARTS/model/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$WORK/drafter" \
    --layers 2 --minutes "$MINUTES" --device cuda --data-share "${DATA_SHARE:-0.4}" $EXTRA_ARGS 2>&1 | tee "$WORK/train.log" \
    | grep -v "━\|Converting\|Loading weights\|Writing model" | tail -40
tar -C "$WORK" -czf "$OUT/drafter.tgz" drafter train.log
