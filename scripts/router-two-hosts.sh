#!/bin/bash
# `shardinfer router` over two servers on two hosts, with no cluster manager. Each server is its
# own mesh on its host's devices; the router may run on either host or on a third one.
#   host-a$ bash scripts/router-two-hosts.sh backend             # a server on :8000
#   host-b$ bash scripts/router-two-hosts.sh backend
#   host-c$ bash scripts/router-two-hosts.sh router host-a host-b  # the router on :8080
#   any$    bash scripts/router-two-hosts.sh check host-c          # /health, /v1/models, a chat
# Environment: MODEL (smollm2-135m-instruct), BACKEND_PORT (8000), ROUTER_PORT (8080),
# MAX_BATCH (32), MESH (unset: all devices on data), API_KEY (unset: none). With API_KEY set,
# the servers and the router all require it, and the router passes the client's key on.
# Both `backend` and `router` bind 0.0.0.0: keep these ports behind a firewall or set API_KEY.
set -euo pipefail
MODEL=${MODEL:-smollm2-135m-instruct}
BACKEND_PORT=${BACKEND_PORT:-8000}
ROUTER_PORT=${ROUTER_PORT:-8080}
MAX_BATCH=${MAX_BATCH:-32}

usage() {
  cat >&2 <<EOF
usage: $0 backend                 run a server here (port $BACKEND_PORT)
       $0 router HOSTA HOSTB      run the router here over HOSTA and HOSTB (port $ROUTER_PORT)
       $0 check ROUTER            ask the router on host ROUTER for its health, models, a reply
EOF
  exit 2
}

key_args=()
[[ -n ${API_KEY:-} ]] && key_args=(--api-key "$API_KEY")

case ${1:-} in
  backend)
    [[ $# -eq 1 ]] || usage
    mesh_args=()
    [[ -n ${MESH:-} ]] && mesh_args=(--mesh "$MESH")
    # One host, one process: SHARDINFER_NUM_PROCESSES=1 keeps it from joining other processes
    # by a cluster's variables (SLURM, Open MPI) should the host have them set.
    export SHARDINFER_NUM_PROCESSES=1
    exec shardinfer serve --model "$MODEL" --host 0.0.0.0 --port "$BACKEND_PORT" \
      --max-batch "$MAX_BATCH" ${mesh_args[@]+"${mesh_args[@]}"} ${key_args[@]+"${key_args[@]}"}
    ;;
  router)
    [[ $# -eq 3 ]] || usage
    # A backend that is not up yet is simply unhealthy: the router takes it in at its first
    # good /health poll. One whose process dies (connection refused) leaves at the next poll,
    # within about 1 s (--health-interval 1); one that stops answering, after two missed polls.
    exec shardinfer router --host 0.0.0.0 --port "$ROUTER_PORT" --policy least_loaded \
      --backend "http://$2:$BACKEND_PORT" --backend "http://$3:$BACKEND_PORT" \
      ${key_args[@]+"${key_args[@]}"}
    ;;
  check)
    [[ $# -eq 2 ]] || usage
    url="http://$2:$ROUTER_PORT"
    auth=()
    [[ -n ${API_KEY:-} ]] && auth=(-H "Authorization: Bearer $API_KEY")
    # /health: 200 while any backend is healthy, 503 while none is.
    curl -fsS "$url/health"; echo
    curl -fsS ${auth[@]+"${auth[@]}"} "$url/v1/models"; echo
    curl -fsS ${auth[@]+"${auth[@]}"} "$url/v1/chat/completions" \
      -H "Content-Type: application/json" \
      -d "{\"model\": \"$MODEL\", \"max_tokens\": 32,
           \"messages\": [{\"role\": \"user\", \"content\": \"Say hello in five words.\"}]}"
    echo
    ;;
  *)
    usage
    ;;
esac
