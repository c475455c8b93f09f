#!/usr/bin/env bash
# A benchmark matrix that outlives one device call (10 min at most): `start` runs the steps
# of a steps file one after another in a detached session, `collect` waits up to N seconds
# (or until the steps are done) and packs the results into $OUT. The steps file is read again
# before each step, so the queue can be changed while the matrix runs.
#   bash benchmarks/gpu_session.sh start benchmarks/gpu_steps.txt
#   bash benchmarks/gpu_session.sh collect 540 "$OUT"
# A line of the steps file is gpu_run.sh's arguments without --out; '#' starts a comment.
set -uo pipefail
cd "$(dirname "$0")/.."
R=/tmp/stv-results
case "${1:-}" in
  start)
    mkdir -p $R
    setsid nohup bash "$0" loop "$2" >>$R/session.log 2>&1 </dev/null &
    ;;
  loop)
    i=0
    while :; do
      line=$(grep -v '^\s*#' "$2" | grep -v '^\s*$' | sed -n "$((i + 1))p")
      [ -z "$line" ] && break
      echo "== step $((i + 1)) $(date +%T): $line"
      # shellcheck disable=SC2086
      timeout 1500 bash benchmarks/gpu_run.sh --out $R $line || echo "== step $((i + 1)) exit $?"
      pkill -f 'comfyui/main.py' || true
      i=$((i + 1))
    done
    echo "== done $(date +%T)"
    touch $R/done
    ;;
  collect)
    end=$(( $(date +%s) + $2 ))
    while [ ! -f $R/done ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    grep -v "HTTP Request" $R/session.log | tail -n 60  # every step's output, once
    tar -C $R --exclude=clips -czf "$3/results.tar.gz" .
    ;;
  *) echo "usage: $0 start STEPS | collect SECONDS OUT" >&2; exit 2 ;;
esac
