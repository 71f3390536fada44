#!/usr/bin/env bash
# Copies the generated CRDs (make manifests writes config/crd/bases) into the
# Helm chart's crds/ folder. test/helm fails while the two differ.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=$root/config/crd/bases
dst=$root/charts/kubetwin/crds
mkdir -p "$dst"
# Remove chart CRDs whose source is gone, then copy every current one.
for f in "$dst"/*.yaml; do
	[ -e "$f" ] || continue
	[ -e "$src/$(basename "$f")" ] || rm -f "$f"
done
cp "$src"/*.yaml "$dst"/
echo "synced $(ls "$src"/*.yaml | wc -l) CRD(s) into charts/kubetwin/crds" >&2
