#!/usr/bin/env bash
# `make demo`: the whole loop on the embedded default model, offline, in a few minutes on 2 CPU cores.
#   1. write two small tasks (sentiment, topics) with held-out test rows
#   2. train them in sequence (LoRA; the second run re-scores the first task: --eval-on-history)
#   3. show each adapter answering its own task, the registry, the accuracy matrix and a report
#   4. ask questions of both tasks with no task id: the router picks the adapter and shows why
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-demo-out}
REG="$OUT/registry"
# DEMO_BASE_MODEL: another base (a Hugging Face id or folder) instead of the default SmolLM2-135M-Instruct
BASE_ARGS=()
[ -n "${DEMO_BASE_MODEL:-}" ] && BASE_ARGS=(--base-model "$DEMO_BASE_MODEL")
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cladapt() { "$PY" -m cladapt "$@"; }
start=$(date +%s)

rm -rf "$OUT"
"$PY" scripts/demo_data.py "$OUT/data" --train 160 --test 40
cladapt registry init "$REG"

echo "== task 1: sentiment"
cladapt train --registry "$REG" --task sentiment --config demo "${BASE_ARGS[@]}" \
    --data "$OUT/data/sentiment_train.jsonl" --eval-data "$OUT/data/sentiment_test.jsonl"
echo "== task 2: topics (then re-score sentiment)"
cladapt train --registry "$REG" --task topics --config demo "${BASE_ARGS[@]}" \
    --data "$OUT/data/topics_train.jsonl" --eval-data "$OUT/data/topics_test.jsonl" --eval-on-history

echo "== each adapter on its own task"
cladapt generate --registry "$REG" --adapter sentiment --max-new-tokens 8 \
    "What is the sentiment of the following review? Answer with one word: positive or negative.
The kettle broke after two days."
cladapt generate --registry "$REG" --adapter topics --max-new-tokens 8 \
    "What is the topic of the following headline? Answer with one word: sports, business, science or world.
Astronomers spot a new exoplanet around a nearby star"

echo "== registry"
cladapt list --registry "$REG"
cladapt registry verify "$REG"
echo "== accuracy matrix"
cladapt history --registry "$REG"
cladapt report --registry "$REG" --out "$OUT/report"

echo "== no task id: the router picks the adapter per question (task prototypes from the training signatures)"
cladapt generate --registry "$REG" --router lda --max-new-tokens 8 \
    "What is the sentiment of the following review? Answer with one word: positive or negative.
The battery died within a week and support never answered." \
    "What is the topic of the following headline? Answer with one word: sports, business, science or world.
Champions league final ends in a penalty shoot-out"
echo "demo finished in $(( $(date +%s) - start )) s; report: $OUT/report/index.html"
