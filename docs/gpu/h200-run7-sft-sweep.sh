#!/bin/bash
# Session 15: the 60-minute recipe (runs/scripts/v14.sh) and SFT variants of it, trained side by side on one GPU.
# Every variant shares the data, the encoder caches and the pre-training + alignment stages (seed 0), then runs its
# own SFT (launched with setsid, so they outlive this command) and is evaluated on the test and validation splits.
# env: DEVICE (cuda), TRAIN (8000), HELD (100), SMALL (1: tiny steps, for a dry run here), DEADLINE (s), COLLECT
# (1: only wait for running variants and report), W (work dir), PY (python).
T0=$(date +%s)
DEVICE=${DEVICE:-cuda}; TRAIN=${TRAIN:-8000}; HELD=${HELD:-100}; DEADLINE=${DEADLINE:-540}
W=${W:-/tmp/sweep}; OUT=${OUT:-$W/out}; PY=${PY:-python3}; ROOT=$PWD
mkdir -p "$W" "$OUT"
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1 PATH=$ROOT/.gpu/esp/bin:$PATH
if [ "$DEVICE" = cuda ]; then
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$ROOT/.gpu:$ROOT
else
  export PYTHONPATH=$ROOT
fi
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

FLAGS="--pretrain-steps 400 --align-steps 600 --batch-size 16 --trait-weight 0.5 --loss-average example --asr-weight 3
 --encoder-layers 2 --encoder-lr-scale 0.1 --records-per-clip 2 --length-buckets 16 --ctc-sounds 1 --encoder-bf16 1
 --encoder-until-step 2000 --frozen-records-per-clip 1 --grad-clip group --sft-steps 5700 --sft-decay-steps 4500
 --qa-balance 1.0 --qa-balance-from-step 4700"
[ "${SMALL:-0}" = 1 ] && FLAGS="--pretrain-steps 3 --align-steps 3 --batch-size 4 --trait-weight 0.5
 --loss-average example --asr-weight 3 --encoder-layers 2 --records-per-clip 2 --length-buckets 2 --ctc-sounds 1
 --encoder-bf16 1 --encoder-until-step 4 --frozen-records-per-clip 1 --grad-clip group --sft-steps 10
 --sft-decay-steps 8 --qa-balance 1.0 --qa-balance-from-step 7"
FLAGS=$(echo $FLAGS)  # one line: it goes into the bash -c below
EVAL_LIMIT=""; [ "${SMALL:-0}" = 1 ] && EVAL_LIMIT="--limit 4"
# name → SFT flags (after the shared stages; the same CPU cost as the recipe: 50.5 min from nothing on 2 cores)
VARIANTS=(
  "v14|"
  "seed1|--seed 1"
  "seed2|--seed 2"
  "lr3e-3|--lr 3e-3"
  "lr1e-3|--lr 1e-3"
  "asr2|--asr-weight 2"
  "trait1|--trait-weight 1.0"
  "balance3700|--qa-balance-from-step 3700"
)

summary() {  # every finished evaluation into one JSON + markdown table ($OUT/summary.*)
  $PY - "$W" "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
w, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = {}
for d in sorted(p for p in w.iterdir() if p.is_dir() and (p / "train_config.json").is_file() and p.name not in ("base", "smoke")):
    row = {"status": (d / "STATUS").read_text().strip() if (d / "STATUS").is_file() else "running"}
    log = d / "train_log.jsonl"
    if log.is_file():
        row["last_step"] = json.loads(log.read_text().splitlines()[-1]).get("step")
    for split in ("test", "val"):
        report = d / f"eval-{split}" / "report.json"
        if report.is_file():
            r = json.loads(report.read_text())
            row[split] = {k: r.get(k) for k in ("asr_wer", "qa_accuracy", "qa_accuracy_scored", "caption_fact_recall",
                                                "intervals_95", "qa_accuracy_by_kind")}
            row[split]["speech_expert_share"] = r["routing"]["speech_expert_share_of_nonspeech"]
    rows[d.name] = row
(out / "summary.json").write_text(json.dumps(rows, indent=1))
lines = ["| variant | status | test WER | test MC (scored) | test caption | val WER | val MC (scored) | val caption |",
         "|---|---|---|---|---|---|---|---|"]
pct = lambda v: "–" if v is None else f"{100 * v:.1f}"
for name, row in rows.items():
    cells = [name, f"{row['status']} {row.get('last_step', '')}"]
    for split in ("test", "val"):
        s = row.get(split, {})
        cells += [pct(s.get("asr_wer")), f"{pct(s.get('qa_accuracy'))} ({pct(s.get('qa_accuracy_scored'))})",
                  pct(s.get("caption_fact_recall"))]
    lines.append("| " + " | ".join(cells) + " |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
}

wait_and_report() {
  while [ $(( $(date +%s) - T0 )) -lt "$DEADLINE" ]; do
    running=0
    for v in "${VARIANTS[@]}"; do [ -f "$W/${v%%|*}/STATUS" ] || running=1; done
    snapshot > /dev/null  # $OUT stays current: a call cut off at its limit still brings it back
    [ $running = 0 ] && break
    sleep 20
  done
  el "report"; snapshot
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv 2>/dev/null
}

snapshot() {
  summary
  tar czf "$OUT/logs.tgz" -C "$W" --exclude='*.pt' --exclude='*.safetensors' --exclude=data --exclude=smoke-data \
    --exclude=out . 2>/dev/null
}

if [ "${COLLECT:-0}" = 1 ]; then wait_and_report; exit 0; fi

nvidia-smi -L 2>/dev/null; nproc; espeak-ng --version || exit 1
$PY -c "import torch, transformers, whisper; print(torch.__version__, transformers.__version__)" || exit 1
# 1. data (and a tiny smoke set), the smoke run on the device: every stage, the encoder switch, export, evaluation
$PY -m model.data --out "$W/smoke-data" --train 24 --val 4 --test 4 --records --questions 3 --workers 8 \
  > "$W/smoke-data.log" 2>&1 || { tail -20 "$W/smoke-data.log"; exit 1; }
$PY -m model.data --out "$W/data" --train "$TRAIN" --val "$HELD" --test "$HELD" --records --questions 3 --workers 16 \
  > "$W/data.log" 2>&1 &
DATA_PID=$!
el "smoke"
$PY .gpu/train_gpu.py --data "$W/smoke-data" --out "$W/smoke" --device "$DEVICE" --pretrain-steps 2 --align-steps 2 \
  --batch-size 4 --trait-weight 0.5 --loss-average example --encoder-layers 2 --records-per-clip 2 --ctc-sounds 1 \
  --encoder-bf16 1 --encoder-until-step 2 --frozen-records-per-clip 1 --grad-clip group --sft-steps 4 \
  --qa-balance 1.0 --qa-balance-from-step 3 --export "$W/smoke/export" > "$W/smoke.log" 2>&1 \
  && $PY -m model.evaluate --model "$W/smoke/export" --data "$W/smoke-data" --split test --out "$W/smoke/eval" \
  --no-baseline --mc-scoring --device "$DEVICE" >> "$W/smoke.log" 2>&1 || { tail -30 "$W/smoke.log"; exit 1; }
el "smoke passed"
wait $DATA_PID || { tail -20 "$W/data.log"; exit 1; }
el "data: $(tail -1 "$W/data.log")"
# 2. shared stages: encoder caches, pre-training, alignment (SFT 0 steps)
$PY .gpu/train_gpu.py $FLAGS --data "$W/data" --out "$W/base" --device "$DEVICE" --sft-steps 0 > "$W/shared.log" 2>&1 \
  || { tail -30 "$W/shared.log"; exit 1; }
el "shared stages done"; grep -a "done in" "$W/shared.log"
# 3. the variants, side by side
CORES=$(nproc); THREADS=$(( CORES / ${#VARIANTS[@]} )); [ "$THREADS" -lt 1 ] && THREADS=1
for v in "${VARIANTS[@]}"; do
  name=${v%%|*}; extra=${v#*|}; d=$W/$name
  mkdir -p "$d"; cp -r "$W/base/tokenizer" "$W/base/resume.pt" "$d/"
  for f in "$W"/base/encoder_*.pt; do ln -sf "$f" "$d/"; done
  setsid nohup bash -c "
    start=\$(date +%s)
    OMP_NUM_THREADS=$THREADS $PY .gpu/train_gpu.py $FLAGS $extra --data '$W/data' --out '$d' --device $DEVICE \
      --export '$d/export' > '$d/train.log' 2>&1 || { echo train-failed > '$d/STATUS'; exit 1; }
    echo \"train_s \$(( \$(date +%s) - start ))\" > '$d/TIMES'
    for s in test val; do
      OMP_NUM_THREADS=$THREADS $PY -m model.evaluate --model '$d/export' --data '$W/data' --split \$s $EVAL_LIMIT \
        --out '$d/eval-'\$s --no-baseline --mc-scoring --device $DEVICE > '$d/eval-'\$s.log 2>&1 \
        || { echo eval-failed > '$d/STATUS'; exit 1; }
    done
    echo \"total_s \$(( \$(date +%s) - start ))\" >> '$d/TIMES'
    echo done > '$d/STATUS'" > "$d/launch.log" 2>&1 < /dev/null &
done
el "launched ${#VARIANTS[@]} variants, $THREADS threads each"
wait_and_report
