#!/bin/bash
# Plain SSH to a list of hosts (the first one coordinates and serves HTTP):
#   scripts/ssh_hosts.sh host-a host-b -- serve --mesh data=2,model=8
# Each host must have shardinfer installed and reach the first host on PORT.
set -euo pipefail
PORT=${PORT:-12355}
hosts=()
while [[ $# -gt 0 && $1 != "--" ]]; do hosts+=("$1"); shift; done
shift  # the --
n=${#hosts[@]}
pids=()
for i in "${!hosts[@]}"; do
  ssh "${hosts[$i]}" SHARDINFER_COORDINATOR="${hosts[0]}:$PORT" SHARDINFER_NUM_PROCESSES="$n" \
    SHARDINFER_PROCESS_ID="$i" shardinfer "$@" 2>&1 | sed "s/^/[$i] /" &
  pids+=($!)
done
# As `shardinfer launch` does locally: when one host fails, stop the others.
status=0
wait -n "${pids[@]}" || status=$?
if [[ $status -ne 0 ]]; then
  echo "a host failed (status $status); stopping the others" >&2
  for h in "${hosts[@]}"; do ssh "$h" pkill -f "shardinfer $1" || true; done
fi
wait || true
exit "$status"
