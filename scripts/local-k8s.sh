#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, for the tests and for trying the chart by hand:
# etcd, kube-apiserver and kube-controller-manager, built from their Go modules (tests/k8s), and
# the kubectl of the same release ($PAWFECT_K8S_BIN/kubectl, PAWFECT_K8S_BIN is in DIR/env).
#
#   scripts/local-k8s.sh build       build the binaries (or find them in the cache); prints the dir
#   scripts/local-k8s.sh up DIR      start a control plane whose state lives in DIR; prints
#                                    `export KUBECONFIG=DIR/kubeconfig`
#   scripts/local-k8s.sh down DIR    stop it and remove what `up` wrote into DIR
#   scripts/local-k8s.sh restart DIR NAME
#                                    SIGKILL etcd, kube-apiserver or kube-controller-manager and
#                                    start it again with the same flags and data (a crash)
#
# `up`:
#   - etcd on 127.0.0.1 (data in DIR/etcd, fsync off: test data);
#   - kube-apiserver on 127.0.0.1 only, generated CA + serving certificate + service-account key
#     pair (DIR/pki), RBAC authorization, client-certificate authentication; the admin kubeconfig
#     (group system:masters) is DIR/kubeconfig;
#   - kube-controller-manager with the deployment, replicaset, garbage-collector, namespace and
#     serviceaccount controllers, each with its own ServiceAccount credentials (the RBAC roles a
#     real cluster gives them); no scheduler, no kubelet: the tests bind pods and write their
#     status themselves;
#   - waits for /readyz and for the default ServiceAccount, then registers $PAWFECT_K8S_NODES
#     (default 2) fake GKE T4 nodes: label cloud.google.com/gke-accelerator=nvidia-tesla-t4,
#     taint nvidia.com/gpu=present:NoSchedule, capacity nvidia.com/gpu: 1, Ready.
#   Ports are free ones picked at random unless set: PAWFECT_K8S_API_PORT, PAWFECT_K8S_ETCD_PORT,
#   PAWFECT_K8S_ETCD_PEER_PORT. DIR/env holds the chosen ones; logs are DIR/*.log.
#   With PAWFECT_K8S_OWNER_PID=PID, a watcher runs `down DIR` once that process is gone (the
#   Rust test fixture passes its own PID, so a killed test run leaves nothing behind).
#
# Binaries are cached in $PAWFECT_K8S_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/pawfect-inpaint/k8s)
# under <kubernetes version>-etcd<etcd version>-<hash of tests/k8s>; a second build builds
# nothing. Needs Go (>= the go line of tests/k8s/go.mod) and the Go module proxy, nothing else:
# no prebuilt binary is downloaded. The first build compiles Kubernetes: about 6 min on 2 cores.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODULE=$ROOT/tests/k8s
SELF=$ROOT/scripts/local-k8s.sh

die() {
  echo "local-k8s: $*" >&2
  exit 1
}

mod_version() { # the required version of module $1 in tests/k8s/go.mod
  awk -v m="$1" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$MODULE/go.mod"
}

find_go() {
  if [ -n "${GO:-}" ]; then
    [ -x "$GO" ] || die "GO=$GO is not an executable"
  elif command -v go >/dev/null 2>&1; then
    GO=$(command -v go)
  elif [ -x /usr/local/go/bin/go ]; then
    GO=/usr/local/go/bin/go
  else
    die "Go is not installed (no \`go\` on PATH, nor /usr/local/go/bin/go). The tests build \
kube-apiserver, kube-controller-manager and etcd from source and need Go $(awk '$1 == "go" {print $2}' "$MODULE/go.mod") \
or newer: https://go.dev/doc/install (or set GO=/path/to/go)."
  fi
  local have need
  have=$("$GO" env GOVERSION 2>/dev/null | sed 's/^go//') || die "$GO does not run"
  need=$(awk '$1 == "go" {print $2}' "$MODULE/go.mod")
  if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ] &&
    [ "${GOTOOLCHAIN:-auto}" = local ]; then
    die "$GO is Go $have; tests/k8s needs Go $need or newer (or unset GOTOOLCHAIN=local)"
  fi
}

K8S_VERSION=$(mod_version k8s.io/kubernetes)
ETCD_VERSION=$(mod_version go.etcd.io/etcd/server/v3)
K8S_MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
# What the official build stamps in (hack/lib/version.sh): /version reports the real release, so
# that helm's kubeVersion checks and clients see v1.37.x, not v0.0.0-master.
LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$K8S_MINOR"
  LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

cache_root() {
  echo "${PAWFECT_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pawfect-inpaint/k8s}"
}

bin_dir() {
  local hash
  hash=$(cd "$MODULE" && { cat go.mod go.sum; find cmd -name '*.go' | sort | xargs cat; echo "$LDFLAGS"; } |
    sha256sum | cut -c1-12)
  echo "$(cache_root)/$K8S_VERSION-etcd$ETCD_VERSION-$hash"
}

cmd_build() {
  local dir
  dir=$(bin_dir)
  if [ -x "$dir/k8s-local" ]; then
    echo "$dir"
    return 0
  fi
  find_go
  mkdir -p "$(cache_root)"
  # One build at a time (test binaries may ask concurrently); the others wait and reuse it.
  exec 9>"$(cache_root)/.build.lock"
  flock 9
  if [ ! -x "$dir/k8s-local" ]; then
    echo "local-k8s: building kube-apiserver + kube-controller-manager $K8S_VERSION and etcd $ETCD_VERSION" \
      "from the Go module proxy into $dir (the first build takes about 6 min on 2 cores)" >&2
    local tmp start=$SECONDS
    tmp=$(mktemp -d "$(cache_root)/.build.XXXXXX")
    if ! (cd "$MODULE" && CGO_ENABLED=${CGO_ENABLED:-1} "$GO" build -trimpath -ldflags "$LDFLAGS" \
      -o "$tmp/k8s-local" ./cmd/k8s-local) >&2; then
      rm -rf "$tmp"
      die "building the control plane failed (go build in tests/k8s, output above). Is the Go module \
proxy ($("$GO" env GOPROXY)) reachable?"
    fi
    for name in etcd kube-apiserver kube-controller-manager kubectl; do ln -s k8s-local "$tmp/$name"; done
    rm -rf "$dir"
    mv "$tmp" "$dir"
    echo "local-k8s: built in $((SECONDS - start)) s" >&2
  fi
  flock -u 9
  echo "$dir"
}

port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pick_port() { # a free port, or the one in $1's variable when set (which must be free)
  local var=$1 port=${!1:-}
  if [ -n "$port" ]; then
    port_in_use "$port" && die "port $port ($var) is taken on 127.0.0.1: stop what listens there or choose another"
    echo "$port"
    return
  fi
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 30000))
    port_in_use "$port" || { echo "$port"; return; }
  done
  die "found no free port on 127.0.0.1"
}

start() { # name logfile command...: starts a daemon, records its pid
  local name=$1 log=$2
  shift 2
  "$@" </dev/null >"$log" 2>&1 &
  echo $! >"$DIR/$name.pid"
  PIDS+="${PIDS:+,}$name=$!"
}

explain_failure() { # what went wrong, from the logs: a taken port first
  local name
  for name in etcd kube-apiserver kube-controller-manager; do
    [ -f "$DIR/$name.log" ] || continue
    if grep -q "address already in use" "$DIR/$name.log"; then
      local addr
      addr=$(grep -o "127.0.0.1:[0-9]*[^0-9]*address already in use" "$DIR/$name.log" | head -1 | cut -d' ' -f1)
      echo "local-k8s: $name could not listen: ${addr:-a port} is taken (address already in use)" >&2
    fi
  done
  for name in etcd kube-apiserver kube-controller-manager; do
    [ -f "$DIR/$name.log" ] || continue
    echo "---- last lines of $DIR/$name.log" >&2
    tail -n 15 "$DIR/$name.log" >&2
  done
}

# The three daemons, from what `up` recorded in DIR/env (so that `restart` starts each again with
# the same ports, certificates and data).
start_etcd() {
  start etcd "$DIR/etcd.log" "$PAWFECT_K8S_BIN/etcd" --name local --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$PAWFECT_K8S_ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$PAWFECT_K8S_ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$PAWFECT_K8S_ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$PAWFECT_K8S_ETCD_PEER_PORT" \
    --initial-cluster "local=http://127.0.0.1:$PAWFECT_K8S_ETCD_PEER_PORT" --unsafe-no-fsync --log-level warn
}

start_apiserver() {
  local pki=$DIR/pki
  start kube-apiserver "$DIR/kube-apiserver.log" "$PAWFECT_K8S_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$PAWFECT_K8S_ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$PAWFECT_K8S_API_PORT" \
    --endpoint-reconciler-type none \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged \
    --profiling=false --v 1
}

start_controller_manager() {
  local pki=$DIR/pki
  start kube-controller-manager "$DIR/kube-controller-manager.log" "$PAWFECT_K8S_BIN/kube-controller-manager" \
    --kubeconfig "$pki/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$pki/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$pki/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 \
    --leader-elect=false \
    --controllers deployment-controller,replicaset-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller \
    --use-service-account-credentials \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --profiling=false --v 1
}

cmd_up() {
  DIR=${1:?usage: local-k8s.sh up DIR}
  [ -f "$DIR/kube-apiserver.pid" ] && die "$DIR already has a control plane: run \`$0 down $DIR\` first"
  local bin
  bin=$(cmd_build)
  local api_port etcd_port peer_port
  api_port=$(pick_port PAWFECT_K8S_API_PORT)
  etcd_port=$(pick_port PAWFECT_K8S_ETCD_PORT)
  peer_port=$(pick_port PAWFECT_K8S_ETCD_PEER_PORT)
  [ "$etcd_port" != "$api_port" ] && [ "$peer_port" != "$api_port" ] && [ "$peer_port" != "$etcd_port" ] ||
    die "the ports must differ: $api_port $etcd_port $peer_port"
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  local server=https://127.0.0.1:$api_port
  touch "$DIR/.local-k8s"
  cat >"$DIR/env" <<EOF
KUBECONFIG=$DIR/kubeconfig
PAWFECT_K8S_SERVER=$server
PAWFECT_K8S_API_PORT=$api_port
PAWFECT_K8S_ETCD_PORT=$etcd_port
PAWFECT_K8S_ETCD_PEER_PORT=$peer_port
PAWFECT_K8S_BIN=$bin
EOF
  # shellcheck source=/dev/null
  . "$DIR/env"
  "$bin/k8s-local" pki --server "$server" "$DIR" || die "cannot write certificates into $DIR"
  local start_s=$SECONDS
  PIDS=""
  start_etcd
  start_apiserver
  start_controller_manager
  if [ -n "${PAWFECT_K8S_OWNER_PID:-}" ]; then
    # Its own session: a Ctrl-C of the test run does not kill the cleanup with it.
    setsid bash -c 'while kill -0 "$1" 2>/dev/null && [ -f "$2/kube-apiserver.pid" ]; do sleep 0.5; done
      [ -f "$2/kube-apiserver.pid" ] && exec "$3" down "$2"' \
      watcher "$PAWFECT_K8S_OWNER_PID" "$DIR" "$SELF" </dev/null >>"$DIR/watcher.log" 2>&1 &
  fi
  local rc=0
  "$bin/k8s-local" ready --kubeconfig "$DIR/kubeconfig" --timeout "${PAWFECT_K8S_READY_TIMEOUT:-120s}" \
    --pids "$PIDS" || rc=$?
  if [ "$rc" -ne 0 ]; then
    explain_failure
    cmd_down "$DIR" >/dev/null 2>&1 || true
    die "the control plane did not come up (logs above; \`$0 up\` removed $DIR)"
  fi
  "$bin/k8s-local" nodes --kubeconfig "$DIR/kubeconfig" --count "${PAWFECT_K8S_NODES:-2}" ||
    { cmd_down "$DIR" >/dev/null 2>&1 || true; die "cannot register the fake nodes"; }
  echo "local-k8s: Kubernetes $K8S_VERSION up at $server in $((SECONDS - start_s)) s (state and logs in $DIR)" >&2
  echo "export KUBECONFIG=$DIR/kubeconfig"
}

wait_gone() { # seconds pid...: true once every pid has exited
  local tries=$(($1 * 10)) pid alive
  shift
  for _ in $(seq "$tries"); do
    alive=0
    for pid in "$@"; do
      # A zombie counts as gone (nobody may reap an orphan in a container).
      if kill -0 "$pid" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; then
        alive=1
      fi
    done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  return 1
}

pid_of() { [ -f "$DIR/$1.pid" ] && cat "$DIR/$1.pid"; }

stop_all() {
  # The API server and the controller-manager get SIGTERM (SIGKILL after 15 s) while etcd still
  # answers them; then etcd is killed: its data is deleted next, nothing of it needs flushing.
  local pids=() pid
  for name in kube-controller-manager kube-apiserver; do
    pid=$(pid_of $name) && pids+=("$pid")
  done
  if [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait_gone 15 "${pids[@]}" || kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
  if pid=$(pid_of etcd); then
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone 5 "$pid" || true
  fi
  rm -f "$DIR"/*.pid
}

cmd_restart() {
  DIR=${1:?usage: local-k8s.sh restart DIR etcd|kube-apiserver|kube-controller-manager}
  local name=${2:?usage: local-k8s.sh restart DIR etcd|kube-apiserver|kube-controller-manager} pid
  [ -f "$DIR/.local-k8s" ] || die "$DIR was not made by \`$0 up\`"
  DIR=$(cd "$DIR" && pwd)
  # shellcheck source=/dev/null
  . "$DIR/env"
  case "$name" in
    etcd | kube-apiserver | kube-controller-manager) ;;
    *) die "restart: no component $name (etcd, kube-apiserver or kube-controller-manager)" ;;
  esac
  # A crash, not a shutdown: SIGKILL, then the same command again (the old log is kept aside).
  if pid=$(pid_of "$name"); then
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone 10 "$pid" || die "$name (pid $pid) did not exit after SIGKILL"
  fi
  mv "$DIR/$name.log" "$DIR/$name.log.$(date +%s%N)" 2>/dev/null || true
  PIDS=""
  case "$name" in
    etcd) start_etcd ;;
    kube-apiserver) start_apiserver ;;
    kube-controller-manager) start_controller_manager ;;
  esac
  "$PAWFECT_K8S_BIN/k8s-local" ready --kubeconfig "$DIR/kubeconfig" --timeout "${PAWFECT_K8S_READY_TIMEOUT:-120s}" \
    --pids "$PIDS" || { explain_failure; die "$name did not come back"; }
  echo "local-k8s: $name restarted" >&2
}

cmd_down() {
  DIR=${1:?usage: local-k8s.sh down DIR}
  [ -d "$DIR" ] || { echo "local-k8s: $DIR does not exist: nothing to stop" >&2; return 0; }
  DIR=$(cd "$DIR" && pwd)
  [ -f "$DIR/.local-k8s" ] || die "$DIR was not made by \`$0 up\`: not touching it"
  stop_all
  rm -rf "$DIR/etcd" "$DIR/pki" "$DIR/kubeconfig" "$DIR/env" "$DIR"/*.log "$DIR"/*.log.* "$DIR/.local-k8s"
  rmdir "$DIR" 2>/dev/null || true
  echo "local-k8s: stopped" >&2
}

case "${1:-}" in
  build) cmd_build ;;
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  restart) shift; cmd_restart "$@" ;;
  *)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
