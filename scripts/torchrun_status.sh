# Sourced by the launch scripts: run torchrun and return what its workers said.
# torchrun exits 1 whenever a worker exits non-zero, and with its own traceback when it is signalled; a scheduler or
# a requeue loop needs the workers' code: 75 (a checkpoint was saved: relaunch to resume) or 130 (interrupted).
# Each worker leaves its code in $DDP_EXIT_CODE_DIR (train_distributed.py's run()); when every code left there is
# the same 75 or 130, that is this script's exit code, else torchrun's. SIGTERM, SIGUSR1 and SIGINT sent to this
# script reach torchrun (which passes them on to the workers: SIGUSR1 as SIGTERM, the stop both mean).
run_torchrun() {
  local codes pid status workers
  codes=$(mktemp -d)
  DDP_EXIT_CODE_DIR="$codes" torchrun "$@" &
  pid=$!
  trap 'kill -TERM "$pid" 2>/dev/null' TERM USR1
  trap 'kill -INT "$pid" 2>/dev/null' INT
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true  # returns early when a trapped signal arrives: wait again until torchrun is gone
  done
  status=0
  wait "$pid" || status=$?
  trap - TERM USR1 INT
  workers=$(cat "$codes"/* 2>/dev/null | sort -u)
  rm -rf "$codes"
  if [ "$status" -ne 0 ] && { [ "$workers" = 75 ] || [ "$workers" = 130 ]; }; then
    status=$workers
  fi
  return "$status"
}
