#!/bin/sh
# Full training run of the Fashion-MNIST latent DiT on CPU (see README.md).
# Usage: DIT_UNTIL=HH:MM nohup nice -n 19 sh models/fashion-mnist/run.sh > models/fashion-mnist/runs/train.log 2>&1 &
# Set RESUME=1 to continue every stage from its last checkpoint in runs/ (a stage whose budget is
# already spent just re-exports). DIT_UNTIL (HH:MM, local clock) stops the DiT at that time so the
# whole run meets a deadline; the other stages are capped by --max-minutes of total (resumed) time.
# Steps actually reached are recorded in vae.json / dit.json / classifier.json.
set -e
cd "$(dirname "$0")"
PY=/usr/bin/python3
R=${RESUME:+--resume}
DIT_UNTIL=${DIT_UNTIL:-}
U=${DIT_UNTIL:+--until $DIT_UNTIL}
date
$PY train.py vae --seed 0 --steps 4000 --batch 64 --lr 5e-4 --kl-weight 1e-6 \
  --vae-channels 32 64 64 --vae-layers 1 --vae-groups 32 --max-minutes 22 $R
date
$PY train.py encode --seed 0 --batch 500 --max-minutes 6
date
# One thread: on a shared 2-core machine two OpenMP threads ran 14× slower than one.
$PY train.py dit --seed 0 --steps 40000 --batch 64 --lr 1e-4 --hidden 128 --depth 4 --heads 4 \
  --ema-decay 0.998 --fp16 --threads 1 $U $R
date
$PY train.py classifier --seed 0 --steps 3000 --batch 128 --lr 1e-3 --max-minutes 12 --threads 1 $R
date
echo "ALL STAGES DONE"
