#!/usr/bin/env bash
# A Ray cluster of two nodes on this machine's loopback: a head and a worker node, one CPU each,
# with token authentication. `batch --address` captions PHOTOS on it, the rows are checked
# against a local `batch` run of the same input, and a re-run must add nothing. Everything it
# started is torn down on exit, and it checks that no process is left.
#
#   examples/cluster/ray-loopback.sh PHOTOS [MODEL]      (MODEL: default resnet50-inject)
#
# On real hosts run the same `ray start` lines on each machine with HEAD_IP for 127.0.0.1 and
# the head's token on every machine: see docs/scaling.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
. examples/cluster/procs.sh

PHOTOS=$(realpath "${1:?usage: $0 PHOTOS [MODEL]}")
MODEL=${2:-resnet50-inject}
PORT=${PORT:-$(free_port)}
WORK=$(mktemp -d /tmp/rayloop-XXXXXX) # short: Ray's socket paths have a length limit
SAME=(--runtime torch --precision fp32) # the same runtime on every node and on the local run

# The cluster's token: the head and every process that joins it need the same one.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN

NODES=()
trap teardown EXIT

node() { # node NAME RAY-START-ARGS...: one node of one CPU, in its own temp dir
  local name=$1 pid
  shift
  mkdir -p "$WORK/$name-tmp"
  pid=$(TMPDIR="$WORK/$name-tmp" start "$WORK/$name.log" "$BIN/ray" start --block "$@" \
    --num-cpus 1 --temp-dir "$WORK/$name" --disable-usage-stats)
  NODES+=("$pid")
  wait_for_line "$WORK/$name.log" "Ray runtime started" 120 "$pid"
  echo "$name node: pid $pid, log $WORK/$name.log"
}

node head --head --port "$PORT" --include-dashboard=false
node worker --address "127.0.0.1:$PORT"

batch() { # batch NAME OUT [ARGS...]: one `batch` run; its report in NAME.json
  local name=$1 out=$2
  shift 2
  echo "$name: python -m captioning batch --model $MODEL $PHOTOS --out $out ${SAME[*]} $*"
  if ! "$PY" -m captioning batch --model "$MODEL" "$PHOTOS" --out "$out" "${SAME[@]}" "$@" \
    >"$WORK/$name.out" 2>"$WORK/$name.err"; then
    tail -5 "$WORK/$name.err" >&2
    return 1
  fi
  tail -1 "$WORK/$name.out" >"$WORK/$name.json"
}

batch local "$WORK/local"
batch cluster "$WORK/cluster" --address "127.0.0.1:$PORT"
batch again "$WORK/cluster" --address "127.0.0.1:$PORT"

"$PY" - "$WORK" <<'EOF'
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

work = Path(sys.argv[1])
report = json.loads((work / "cluster.json").read_text())
again = json.loads((work / "again.json").read_text())
for n in report["nodes"]:
    kind = "head" if n["head"] else "worker"
    print(f"{kind} node {n['node_id'][:12]}: {n['actors']} caption actor(s)")
assert all(n["actors"] for n in report["nodes"]), "a node ran no actor"


def rows(out):
    table = pq.read_table(work / out).to_pylist()
    found = {r["path"]: r for r in table}
    assert len(found) == len(table), f"{out}: a path has two rows"
    return found


local, cluster = rows("local"), rows("cluster")
assert local.keys() == cluster.keys(), "the runs captioned different paths"
keys = ("caption", "nbest", "error", "model", "bundle_sha256", "runtime", "precision")
worst = 0.0
for path, a in cluster.items():
    b = local[path]
    assert all(a[k] == b[k] for k in keys if k != "nbest"), path
    assert json.loads(a["decoding"]) == json.loads(b["decoding"]), path
    if a["error"] is None:
        worst = max(worst, abs(a["logprob"] - b["logprob"]))
errors = sum(r["error"] is not None for r in cluster.values())
print(f"rows equal: {len(cluster)} rows, {errors} of them errors, max |d logprob| {worst:.1e}")
assert worst <= 5e-5
assert again["captioned"] == again["errors"] == 0, "the re-run added rows"
print(f"re-run: {again['already_done']} paths already done, nothing added")
EOF
