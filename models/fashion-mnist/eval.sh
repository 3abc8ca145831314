#!/bin/sh
# Evaluation through ditpipe's real services: `ditpipe up` (nats-server plus separate scheduler,
# denoiser and decoder processes), generation over gRPC (eval_generate.ts), then scoring with the
# separately trained classifier (eval.py). PER_CLASS images per class and configuration; sets
# already generated at that size are kept, so an interrupted run can simply be started again.
#   PER_CLASS=1000 sh models/fashion-mnist/eval.sh
# This DiT is compute-bound on onnxruntime (about 1,800 rows/s per core here with graph revision 2,
# BENCHMARKS.md §5), so one denoiser with both cores and 256-row passes is the fastest layout
# measured on this 2-core machine.
set -e
cd "$(dirname "$0")/../.."
PER_CLASS=${PER_CLASS:-1000}
CONFIGS=${CONFIGS:-ddim50-cfg1,ddim50-cfg1.5,ddim50-cfg4,ddpm250-cfg1,ddpm250-cfg1.5,ddpm250-cfg4}
OUT=${OUT:-models/fashion-mnist/runs/eval}
PORT=${PORT:-50091}
THREADS=${THREADS:-2}
export DITPIPE_MAX_BATCH_ROWS=${DITPIPE_MAX_BATCH_ROWS:-256}
mkdir -p "$OUT"
node bin/ditpipe.js up --denoisers 1 --decoders 1 --grpc-port "$PORT" --nats-port 0 --metrics-port -1 --http-port -1 --threads "$THREADS" > "$OUT/up.log" 2>&1 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
i=0
until grep -q "Ctrl-C to stop" "$OUT/up.log"; do
  i=$((i + 1)); [ $i -gt 180 ] && { echo "ditpipe up did not start; see $OUT/up.log" >&2; exit 1; }
  sleep 1
done
date
node --import tsx models/fashion-mnist/eval_generate.ts --server 127.0.0.1:"$PORT" --per-class "$PER_CLASS" --configs "$CONFIGS" --out "$OUT"
date
SETS=""
for c in $(echo "$CONFIGS" | tr ',' ' '); do SETS="$SETS $OUT/$c.safetensors"; done
/usr/bin/python3 models/fashion-mnist/eval.py $SETS
