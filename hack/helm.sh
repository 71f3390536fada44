#!/usr/bin/env bash
# Builds (once) a pinned helm binary from the Go module proxy and prints its
# path, bin/helm-<version> in the repository. The build is kept in the same
# cache as the control plane (hack/controlplane.sh), so a fresh clone on the
# same machine links it instead of building again (~5 minutes on 2 cores).
# Progress goes to stderr.
#
# `go install pkg@version` builds with helm's own go.mod: helm's Kubernetes
# libraries never mix with the operator's, and go.mod is not touched.
set -euo pipefail

HELM_VERSION=${HELM_VERSION:-v3.22.0}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${KUBETWIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetwin}
cached=$cache/helm/$HELM_VERSION/helm
bindir=${LOCALBIN:-$here/../bin}
mkdir -p "$bindir" "$(dirname "$cached")"
bindir=$(cd "$bindir" && pwd)
bin=$bindir/helm-$HELM_VERSION

log() { printf '[helm] %s\n' "$*" >&2; }

if [ ! -x "$cached" ]; then
	log "building helm $HELM_VERSION from the Go module proxy (first time only; ~5 minutes on 2 cores)..."
	start=$SECONDS
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	CGO_ENABLED=0 GOBIN=$tmp GOFLAGS=-trimpath go install \
		-ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
		"helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
	mv "$tmp/helm" "$cached.tmp"
	mv "$cached.tmp" "$cached"
	log "built helm $HELM_VERSION in $((SECONDS - start))s"
fi
if [ ! -x "$bin" ] || ! cmp -s "$cached" "$bin"; then
	cp "$cached" "$bin.tmp" && mv "$bin.tmp" "$bin"
fi
ln -sf "$(basename "$bin")" "$bindir/helm"
echo "$bin"
