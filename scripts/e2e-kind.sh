#!/usr/bin/env bash
# End-to-end run of Pawfect Inpaint on a throwaway local cluster (kind, or k3d with
# CLUSTER_TOOL=k3d), for CI systems that have a container engine (Docker or Podman).
# It cannot run on machines without one.
#
# What it does:
#   1. stages MODELS_DIR (tiny or real weights; hard-linked when possible) with INPUT_DIR's
#      photo and mask in e2e-input/, and creates a cluster whose node sees it at /pawfect/models;
#   2. builds or takes the operator and worker images and loads them into the cluster;
#   3. installs the CRDs, a Redis 7 and the operator (with the RBAC of operator/README.md);
#   4. creates a CPU-only InpaintPool (no GPU request) and one InpaintJob;
#   5. waits for the job to be Complete, checks its status (worker, timings, output), checks
#      that the pool scaled up for it and back down to zero afterwards, and deletes a second
#      job while it waits to check the cancel path.
#
# Environment:
#   OPERATOR_IMAGE   operator image (default: built from operator/Dockerfile as pawfect-operator:e2e)
#   WORKER_IMAGE     worker image (default: built from worker/Dockerfile as pawfect-worker:e2e)
#   MODELS_DIR       models directory the worker loads (default: tests/fixtures/models)
#   INPUT_DIR        directory with image.png and mask.png (default: tests/fixtures/e2e)
#   MODEL_VARIANT    PAWFECT_MODEL_VARIANT of the pool (default: q5_k_m)
#   CLUSTER_TOOL     kind (default) or k3d
#   CLUSTER_NAME     default: pawfect-e2e
#   KEEP_CLUSTER=1   keep the cluster afterwards
#   TIMEOUT          seconds to wait for the job (default 900)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
CLUSTER_TOOL=${CLUSTER_TOOL:-kind}
CLUSTER_NAME=${CLUSTER_NAME:-pawfect-e2e}
MODELS_DIR=$(realpath "${MODELS_DIR:-tests/fixtures/models}")
INPUT_DIR=$(realpath "${INPUT_DIR:-tests/fixtures/e2e}")
MODEL_VARIANT=${MODEL_VARIANT:-q5_k_m}
TIMEOUT=${TIMEOUT:-900}
NS=pawfect-e2e

log() { printf '\n=== %s\n' "$*"; }
die() { printf 'e2e-kind: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is required ($2)"; }

need kubectl "https://kubernetes.io/docs/tasks/tools/"
need "$CLUSTER_TOOL" "kind or k3d creates the cluster"
ENGINE=${CONTAINER_ENGINE:-docker}
need "$ENGINE" "a container engine is required; this script cannot run without one"
[ -d "$MODELS_DIR" ] || die "MODELS_DIR $MODELS_DIR does not exist"
[ -f "$INPUT_DIR/image.png" ] && [ -f "$INPUT_DIR/mask.png" ] ||
  die "INPUT_DIR $INPUT_DIR must hold image.png and mask.png"

cleanup() {
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    log "deleting cluster $CLUSTER_NAME"
    case "$CLUSTER_TOOL" in
      kind) kind delete cluster --name "$CLUSTER_NAME" || true ;;
      k3d) k3d cluster delete "$CLUSTER_NAME" || true ;;
    esac
  fi
}
dump() {
  echo "--- state at failure" >&2
  kubectl -n "$NS" get ij,ipool,deploy,pods -o wide >&2 || true
  kubectl -n "$NS" describe ij >&2 || true
  kubectl -n "$NS" logs deploy/pawfect-operator --tail=200 >&2 || true
  kubectl -n "$NS" logs -l inpaint.pawfect.dev/pool=e2e --tail=200 >&2 || true
}
STAGE=""
trap 'rc=$?; [ $rc -ne 0 ] && dump; cleanup; [ -n "$STAGE" ] && rm -rf "$STAGE"; exit $rc' EXIT

STAGE=$(mktemp -d)
cp -al "$MODELS_DIR/." "$STAGE/" 2>/dev/null || cp -r "$MODELS_DIR/." "$STAGE/"
mkdir -p "$STAGE/e2e-input"
cp "$INPUT_DIR/image.png" "$INPUT_DIR/mask.png" "$STAGE/e2e-input/"
chmod -R a+rX "$STAGE"

log "cluster ($CLUSTER_TOOL)"
case "$CLUSTER_TOOL" in
  kind)
    cat > /tmp/pawfect-kind.yaml <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraMounts:
      - {hostPath: "$STAGE", containerPath: /pawfect/models, readOnly: true}
EOF
    kind create cluster --name "$CLUSTER_NAME" --config /tmp/pawfect-kind.yaml --wait 120s
    ;;
  k3d)
    k3d cluster create "$CLUSTER_NAME" --wait \
      --volume "$STAGE:/pawfect/models@server:0" \
      --k3s-arg '--disable=traefik,servicelb,metrics-server@server:0'
    ;;
  *) die "CLUSTER_TOOL must be kind or k3d" ;;
esac

log "images"
build_or_take() { # var default-tag dockerfile
  local var=$1 tag=$2 file=$3
  if [ -z "${!var:-}" ]; then
    [ -f "$file" ] || die "$var is not set and $file does not exist"
    "$ENGINE" build -f "$file" -t "$tag" "$ROOT"
    printf -v "$var" '%s' "$tag"
  fi
  case "$CLUSTER_TOOL" in
    kind) kind load docker-image "${!var}" --name "$CLUSTER_NAME" ;;
    k3d) k3d image import "${!var}" -c "$CLUSTER_NAME" ;;
  esac
}
build_or_take OPERATOR_IMAGE pawfect-operator:e2e operator/Dockerfile
build_or_take WORKER_IMAGE pawfect-worker:e2e worker/Dockerfile

log "CRDs, Redis, operator"
kubectl apply -f crds/
kubectl wait --for=condition=Established crd/inpaintjobs.inpaint.pawfect.dev crd/inpaintpools.inpaint.pawfect.dev --timeout=60s
kubectl create namespace "$NS"
kubectl -n "$NS" apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: redis}
spec:
  selector: {matchLabels: {app: redis}}
  template:
    metadata: {labels: {app: redis}}
    spec:
      containers:
        - name: redis
          image: redis:7.4
          args: ["--appendonly", "yes", "--maxmemory-policy", "noeviction"]
          ports: [{containerPort: 6379}]
---
apiVersion: v1
kind: Service
metadata: {name: redis}
spec: {selector: {app: redis}, ports: [{port: 6379}]}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: pawfect-operator}
---
# The RBAC table of operator/README.md, namespace-scoped (the operator runs with --namespace).
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pawfect-operator}
rules:
  - apiGroups: [inpaint.pawfect.dev]
    resources: [inpaintjobs]
    verbs: [list, watch, patch, delete]
  - apiGroups: [inpaint.pawfect.dev]
    resources: [inpaintjobs/status, inpaintpools/status]
    verbs: [patch]
  - apiGroups: [inpaint.pawfect.dev]
    resources: [inpaintpools]
    verbs: [get, list, watch]
  - apiGroups: [inpaint.pawfect.dev]
    resources: [inpaintpools/finalizers]
    verbs: [update]
  - apiGroups: [apps]
    resources: [deployments]
    verbs: [get, list, watch, create, patch]
  - apiGroups: [""]
    resources: [pods]
    verbs: [list, patch]
  - apiGroups: [events.k8s.io]
    resources: [events]
    verbs: [create, patch]
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    verbs: [get, create, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: pawfect-operator}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pawfect-operator}
subjects: [{kind: ServiceAccount, name: pawfect-operator}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: pawfect-operator}
spec:
  selector: {matchLabels: {app: pawfect-operator}}
  template:
    metadata: {labels: {app: pawfect-operator}}
    spec:
      serviceAccountName: pawfect-operator
      securityContext: {runAsNonRoot: true, runAsUser: 65532}
      containers:
        - name: operator
          image: $OPERATOR_IMAGE
          imagePullPolicy: IfNotPresent
          args: [run, --namespace, $NS, --redis-url, "redis://redis:6379/", --leader-election, --log-level, "info,pawfect_operator=debug"]
          env:
            - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
            - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
          ports: [{name: http, containerPort: 8080}]
          readinessProbe: {httpGet: {path: /readyz, port: http}}
          livenessProbe: {httpGet: {path: /healthz, port: http}}
          securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false}
EOF
kubectl -n "$NS" rollout status deploy/redis --timeout=180s
kubectl -n "$NS" rollout status deploy/pawfect-operator --timeout=180s

log "pool and job"
# The pool's model volume is the staged directory: weights at /models, inputs in /models/e2e-input.
kubectl -n "$NS" apply -f - <<EOF
apiVersion: inpaint.pawfect.dev/v1alpha1
kind: InpaintPool
metadata: {name: e2e}
spec:
  minReplicas: 0
  maxReplicas: 1
  pollIntervalSeconds: 2
  scaleDownDelaySeconds: 20
  worker:
    image: $WORKER_IMAGE
    imagePullPolicy: IfNotPresent
    resources: {limits: {nvidia.com/gpu: "0", cpu: "2", memory: 4Gi}}
    modelVolume: {hostPath: /pawfect/models}
    modelVariant: $MODEL_VARIANT
    # CPU worker; file:// inputs and outputs only under these roots.
    args: [--device, cpu, --allow-root, /models/e2e-input, --allow-root, /tmp]
    terminationGracePeriodSeconds: 60
---
apiVersion: inpaint.pawfect.dev/v1alpha1
kind: InpaintJob
metadata: {name: rex}
spec:
  pool: e2e
  image: file:///models/e2e-input/image.png
  mask: file:///models/e2e-input/mask.png
  output: file:///tmp/rex-out.png
  prompt: green grass, seamless continuation, no objects
  steps: 2
  seed: 7
  timeoutSeconds: $TIMEOUT
EOF

log "waiting for the pool to scale up"
for _ in $(seq 1 60); do
  desired=$(kubectl -n "$NS" get ipool e2e -o jsonpath='{.status.desiredReplicas}' 2>/dev/null || true)
  [ "${desired:-0}" -ge 1 ] && break
  sleep 2
done
[ "${desired:-0}" -ge 1 ] || die "pool e2e did not scale up for a queued job"

log "waiting for the job (up to ${TIMEOUT}s)"
kubectl -n "$NS" wait --for=condition=Complete ij/rex --timeout="${TIMEOUT}s"
kubectl -n "$NS" get ij rex -o wide
phase=$(kubectl -n "$NS" get ij rex -o jsonpath='{.status.phase}')
worker=$(kubectl -n "$NS" get ij rex -o jsonpath='{.status.worker}')
total=$(kubectl -n "$NS" get ij rex -o jsonpath='{.status.timings.total}')
output=$(kubectl -n "$NS" get ij rex -o jsonpath='{.status.output}')
[ "$phase" = Succeeded ] || die "phase $phase"
[[ "$worker" == e2e-worker-* ]] || die "worker '$worker' is not a pod of the pool"
[ -n "$total" ] || die "no timings in the status"
[ "$output" = file:///tmp/rex-out.png ] || die "output '$output'"
kubectl -n "$NS" get events --field-selector involvedObject.name=rex -o custom-columns=REASON:.reason --no-headers |
  grep -q Succeeded || die "no Succeeded event"

log "cancel path: a job deleted while it waits"
kubectl -n "$NS" apply -f - <<EOF
apiVersion: inpaint.pawfect.dev/v1alpha1
kind: InpaintJob
metadata: {name: doomed}
spec: {pool: e2e, image: file:///models/e2e-input/image.png, mask: file:///models/e2e-input/mask.png, output: file:///tmp/doomed.png, steps: 2}
EOF
kubectl -n "$NS" wait --for=jsonpath='{.status.phase}'=Queued ij/doomed --timeout=60s ||
  kubectl -n "$NS" wait --for=jsonpath='{.status.phase}'=Running ij/doomed --timeout=60s
kubectl -n "$NS" delete ij doomed --timeout=120s

log "waiting for scale to zero"
for _ in $(seq 1 90); do
  replicas=$(kubectl -n "$NS" get deploy e2e-worker -o jsonpath='{.spec.replicas}')
  [ "$replicas" = 0 ] && break
  sleep 2
done
[ "$replicas" = 0 ] || die "pool did not scale back to zero (replicas $replicas)"

log "e2e passed"
