#!/usr/bin/env bash
# Builds kube-apiserver, kubectl (v1.37.2) and etcd (v3.6.16) from the Go module
# proxy and caches them outside the repository. Prints the folder that holds
# them (use it as KUBEBUILDER_ASSETS). Progress goes to stderr.
#
# The first build takes about 8-10 minutes on a 2-core machine (kube-apiserver
# is a large program); later runs find the cache and return at once.
set -euo pipefail

KUBE_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${KUBETWIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetwin}
dir=$cache/controlplane/kube-$KUBE_VERSION-etcd-$ETCD_VERSION
mkdir -p "$dir"

log() { printf '[controlplane] %s\n' "$*" >&2; }

build() { # build <name> <module dir> <package> [ldflags]
	local name=$1 mod=$2 pkg=$3 ldflags=${4:-}
	if [ -x "$dir/$name" ]; then
		return
	fi
	log "building $name from the Go module proxy (first time only; kube-apiserver takes ~8 minutes on 2 cores)..."
	local start=$SECONDS
	# A ticker so a long build visibly makes progress.
	( while sleep 30; do log "  still building $name ($((SECONDS - start))s)..."; done ) &
	local ticker=$!
	trap 'kill $ticker 2>/dev/null || true' RETURN
	(cd "$here/controlplane/$mod" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w $ldflags" -o "$dir/$name.tmp" "$pkg")
	mv "$dir/$name.tmp" "$dir/$name"
	log "built $name in $((SECONDS - start))s"
}

kver="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37"
build etcd etcd . "-X go.etcd.io/etcd/api/v3/version.Version=${ETCD_VERSION#v}"
build kube-apiserver kube ./kube-apiserver "$kver"
build kubectl kube ./kubectl "$kver -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
echo "$dir"
