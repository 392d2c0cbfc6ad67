#!/usr/bin/env bash
# `train` on two torchrun nodes of one process each, joined by c10d rendezvous on this machine's
# loopback, against one process on the same global batch: the per-step losses must agree within
# 1e-5 (relative). Trains a small attention decoder on tiny synthetic data (22 train images) made
# here. Everything it started is torn down on exit, and it checks that no process is left.
#
#   examples/cluster/torchrun-loopback.sh
#
# On real hosts run the node command on each machine with HEAD_IP for 127.0.0.1: see
# docs/scaling.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
. examples/cluster/procs.sh

PORT=${PORT:-$(free_port)}
WORK=$(mktemp -d /tmp/torchloop-XXXXXX)
export TMPDIR=$WORK OMP_NUM_THREADS=1

NODES=()
trap teardown EXIT

echo "tiny data and its features in $WORK"
"$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path

from captioning.data import load_flickr8k
from captioning.models.encoders import build_encoder
from captioning.runtime.features import FeatureCache, extract
from tests.synthetic import make_tiny_flickr

work = Path(sys.argv[1])
data = make_tiny_flickr(work / "flickr", sizes={"train": 22, "dev": 4, "test": 1})
ds = load_flickr8k(data)
enc = build_encoder("resnet50", "fp32")
names = ds.splits["train"] + ds.splits["dev"]
cache = FeatureCache.for_encoder(enc, work / "cache")
extract(enc, [(n, ds.image_path(n)) for n in names], cache, progress=False)
EOF

TRAIN=(train --encoder resnet50 --decoder attention --data "$WORK/flickr" --cache "$WORK/cache"
  --epochs 6 --patience 6 --batch-images 7 --lr 0.1 --precision fp32
  --set=embed_dim=32 --set=hidden_dim=64 --set=attn_dim=32 --set=dropout=0.0)

echo "one process"
"$PY" -m captioning "${TRAIN[@]}" --out "$WORK/one" >"$WORK/one.log" 2>&1

echo "two nodes: torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d" \
  "--rdzv-endpoint 127.0.0.1:$PORT ... -m captioning train ... --out $WORK/two"
for n in 0 1; do
  NODES+=("$(start "$WORK/node$n.log" "$BIN/torchrun" --nnodes 2 --nproc-per-node 1 \
    --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$PORT" --rdzv-id loopback \
    --local-addr 127.0.0.1 -m captioning "${TRAIN[@]}" --out "$WORK/two")")
  sleep 0.5 # node 0 hosts the rendezvous store
done
for pid in "${NODES[@]}"; do # they run in sessions of their own: poll, not `wait`
  while [ -n "$(ps -o stat= -p "$pid" | grep -v '^Z')" ]; do sleep 0.5; done
done
if grep -q "FAILED" "$WORK"/node*.log || ! grep -q '"best_epoch"' "$WORK"/node*.log; then
  tail -20 "$WORK"/node*.log >&2
  exit 1
fi

"$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path

from captioning.training.checkpoint import read_state

work = Path(sys.argv[1])
(m1, _), (m2, _) = read_state(work / "one"), read_state(work / "two")
one, two = m1["step_losses"], m2["step_losses"]
assert m2["world_size"] == 2 and [s[:2] for s in one] == [s[:2] for s in two]
print("epoch step  one process  two nodes")
for a, b in zip(one, two):
    print(f"{a[0]:5} {a[1]:4}  {a[2]:11.7f}  {b[2]:9.7f}")
worst = max(abs(a[2] - b[2]) / abs(a[2]) for a, b in zip(one, two))
print(f"max relative difference over {len(one)} steps: {worst:.1e}")
assert worst <= 1e-5
assert (work / "two" / "decoder.safetensors").is_file()
EOF
