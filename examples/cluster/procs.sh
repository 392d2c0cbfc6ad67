# Process helpers for the loopback scripts (sourced). Every command they start runs in a session
# of its own; teardown SIGKILLs a command's process tree and sessions by pid, never by name
# (`ray stop` would stop every Ray on the machine, other users' too).

# start LOG CMD...: run CMD in a session of its own, output to LOG; prints its pid (= its session).
start() {
  local log=$1
  shift
  setsid "$@" >"$log" 2>&1 </dev/null &
  local pid=$!
  sleep 0.2
  if [ "$(ps -o sid= -p "$pid" | tr -d ' ')" != "$pid" ]; then
    echo "could not give $1 a session of its own" >&2
    return 1
  fi
  echo "$pid"
}

# tree ROOT: the live processes of ROOT's tree and of the sessions they are in (torchrun and Ray
# give some children sessions or process groups of their own), never this shell's session.
tree() {
  local own
  own=$(ps -o sid= -p $$ | tr -d ' ')
  ps -eo pid=,ppid=,sid=,stat= | awk -v root="$1" -v own="$own" '
    { pid[NR] = $1; ppid[NR] = $2; sid[NR] = $3; stat[NR] = $4; n = NR }
    END {
      inside[root] = 1; sids[root] = 1; grew = 1
      while (grew) {
        grew = 0
        for (i = 1; i <= n; i++)
          if (!(pid[i] in inside) && (ppid[i] in inside)) { inside[pid[i]] = 1; grew = 1 }
      }
      for (i = 1; i <= n; i++) if ((pid[i] in inside) && sid[i] != own) sids[sid[i]] = 1
      for (i = 1; i <= n; i++)
        if (((pid[i] in inside) || (sid[i] in sids)) && stat[i] !~ /^Z/) print pid[i]
    }'
}

# kill_tree ROOT: SIGKILL ROOT's tree and sessions until none is left (30 s at most).
kill_tree() {
  local pids i
  for i in $(seq 150); do
    pids=$(tree "$1")
    [ -z "$pids" ] && return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.2
  done
  echo "still alive after SIGKILL: $(tree "$1" | tr '\n' ' ')" >&2
  return 1
}

# wait_for_line LOG TEXT SECONDS PID: wait until LOG holds TEXT; fails when PID ends first.
wait_for_line() {
  local i
  for i in $(seq $((${3} * 5))); do
    grep -q "$2" "$1" && return 0
    kill -0 "$4" 2>/dev/null || { tail -20 "$1" >&2; return 1; }
    sleep 0.2
  done
  echo "timed out waiting for '$2' in $1" >&2
  return 1
}

# free_port: a free TCP port on 127.0.0.1.
free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# teardown (the scripts' EXIT trap): kill each node of NODES with its tree, check that no process
# of WORK is left, remove WORK; exit 1 when one had to be reported, else with the script's code.
teardown() {
  local code=$? pid left
  for pid in "${NODES[@]}"; do kill_tree "$pid" || code=1; done
  left=$(ps -eo pid=,args= | grep -F "$WORK/" | grep -v grep || true)
  if [ -n "$left" ]; then
    echo "processes left behind:" >&2
    echo "$left" >&2
    code=1
  fi
  rm -rf "$WORK"
  exit "$code"
}
