#!/bin/sh
# Full training run of the Fashion-MNIST latent DiT on CPU (see README.md).
# Usage: DIT_UNTIL=HH:MM setsid nohup nice -n 19 sh models/fashion-mnist/run.sh > models/fashion-mnist/runs/train.log 2>&1 &
# RESUME=1 continues every stage from its last checkpoint in runs/ (a stage whose budget is already
# spent just re-exports). DIT_UNTIL (HH:MM, local clock; after midnight means tomorrow) stops the DiT
# at that time so the whole run meets a deadline; the other stages are capped by --steps and
# --max-minutes of total (resumed) time. STAGES picks stages (default all, in this order); the
# evaluation classifier is independent of the others, so a retrain of the generator skips it.
# DIT_ARGS is appended to the DiT's flags (a later flag wins), e.g. to continue the committed DiT:
#   STAGES="encode dit" DIT_UNTIL=07:15 DIT_ARGS="--warm-start --lr 2e-4 --cosine --steps 60000" ...
# Steps actually reached are recorded in vae.json / dit.json / classifier.json.
set -e
cd "$(dirname "$0")"
PY=/usr/bin/python3
R=${RESUME:+--resume}
DIT_UNTIL=${DIT_UNTIL:-}
U=${DIT_UNTIL:+--until $DIT_UNTIL}
STAGES=${STAGES:-classifier vae encode dit}
for stage in $STAGES; do
  date
  case $stage in
  classifier)
    $PY train.py classifier --seed 0 --steps 3000 --batch 128 --lr 1e-3 --max-minutes 12 --threads 1 $R ;;
  vae)
    # Batch 32 with a cosine decay: on 2 cores a step costs 0.44 s, so more, smaller steps converge
    # further in the same time than batch 64.
    $PY train.py vae --seed 0 --steps 5600 --batch 32 --lr 5e-4 --cosine --warmup 100 --kl-weight 1e-6 \
      --vae-channels 32 64 64 --vae-layers 1 --vae-groups 32 --threads 2 --max-minutes 55 $R ;;
  encode)
    $PY train.py encode --seed 0 --batch 500 --max-minutes 6 --threads 2 ;;
  dit)
    $PY train.py dit --seed 0 --steps 60000 --batch 64 --lr 1e-4 --hidden 128 --depth 4 --heads 4 \
      --ema-decay 0.998 --fp16 --threads ${DIT_THREADS:-1} $U $R ${DIT_ARGS:-} ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
date
echo "ALL STAGES DONE"
