#!/usr/bin/env bash
# make verify: fails when the tree is not what its sources say it should be.
# It checks, and never changes the working tree:
#   1. generated files (CRDs, RBAC role, deepcopy code, the chart's CRDs):
#      regenerated in a scratch copy of the tree and compared with the
#      working tree's files;
#   2. go.mod and go.sum: go mod tidy in the same scratch copy;
#   3. gofmt -l;
#   4. go vet ./...;
#   5. golangci-lint (pinned; configuration in .golangci.yml);
#   6. no compiled program (ELF) and no file over 1 MiB among the tree's
#      files (a binary built at the top level once went into a commit).
# Every check runs; the summary names each that failed and how to fix it.
# `hack/verify.sh generated` runs 1 and 2 only (make test does, in seconds).
#
# CONTROLLER_GEN and GOLANGCI_LINT name the pinned binaries (make verify
# builds them once into ~/.cache/kubetwin/tools).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
only_generated=false
case "${1:-}" in
"") ;;
generated) only_generated=true ;;
*) echo "usage: $0 [generated]" >&2; exit 2 ;;
esac
: "${CONTROLLER_GEN:?CONTROLLER_GEN must name the controller-gen binary (run make verify)}"
$only_generated || : "${GOLANGCI_LINT:?GOLANGCI_LINT must name the golangci-lint binary (run make verify)}"

step() { printf '[verify] %4ss %s\n' "$SECONDS" "$*" >&2; }
failed=()
fail() { failed+=("$1"); }

# The files of the working tree as git sees them: tracked (less those deleted
# in the working tree) and untracked but not ignored.
tree_files() {
	git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
		[ -f "$f" ] && printf '%s\0' "$f"
	done
}

scratch=$(mktemp -d "${TMPDIR:-/tmp}/kubetwin-verify.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

sgit() { git -C "$scratch" -c user.name=verify -c user.email=verify@localhost -c commit.gpgsign=false "$@"; }
# changes: the files the last step changed in the scratch copy (new and
# deleted ones included), as "M path" lines; then records them, so the next
# step is compared with this one's result.
changes() {
	sgit add -A && sgit diff --cached --no-renames --name-status HEAD
}
show_diff() { # the diff of the last step, cut short
	{ sgit diff --cached --no-renames --stat HEAD && sgit diff --cached --no-renames HEAD | head -n 80; } | sed 's/^/    /' >&2
}
checkpoint() { sgit commit -q --no-verify --allow-empty -m "$1" >/dev/null; }

step "copying the working tree into $scratch"
tree_files | tar --null -T - -cf - | tar -xf - -C "$scratch"
{ sgit init -q && sgit add -A && checkpoint tree; } || { echo "verify: could not set up the scratch copy" >&2; exit 2; }

step "1. generated files: make manifests generate (and hack/sync-chart-crds.sh) in the scratch copy"
if ! (cd "$scratch" && make -s manifests generate CONTROLLER_GEN="$CONTROLLER_GEN" && hack/sync-chart-crds.sh) >"$scratch.gen.log" 2>&1; then
	sed 's/^/    /' "$scratch.gen.log" >&2
	fail "generation itself failed (output above)"
else
	stale=$(changes)
	if [ -n "$stale" ]; then
		step "stale generated files (A: missing from the tree, M: differs, D: no longer generated):"
		printf '%s\n' "$stale" | sed 's/^/    /' >&2
		show_diff
		fail "generated files are stale: $(printf '%s\n' "$stale" | awk '{print $2}' | paste -sd' ' -); fix: make manifests generate && hack/sync-chart-crds.sh, then commit the result"
	fi
fi
rm -f "$scratch.gen.log"
sgit add -A && checkpoint generated

step "2. go mod tidy in the scratch copy"
if ! (cd "$scratch" && go mod tidy) >"$scratch.tidy.log" 2>&1; then
	sed 's/^/    /' "$scratch.tidy.log" >&2
	fail "go mod tidy failed (output above)"
else
	untidy=$(changes)
	if [ -n "$untidy" ]; then
		step "go mod tidy changes:"
		show_diff
		fail "go.mod/go.sum are not tidy: $(printf '%s\n' "$untidy" | awk '{print $2}' | paste -sd' ' -); fix: go mod tidy, then commit the result"
	fi
fi
rm -f "$scratch.tidy.log"

# summary <what passed>: the failures, if any, and the exit status.
summary() {
	if [ ${#failed[@]} -gt 0 ]; then
		echo >&2
		echo "verify FAILED:" >&2
		printf '  - %s\n' "${failed[@]}" >&2
		exit 1
	fi
	step "ok: $1"
	exit 0
}
$only_generated && summary "generated files and go.mod/go.sum are up to date"

step "3. gofmt -l"
gofiles=()
while IFS= read -r -d '' f; do
	case $f in *.go) gofiles+=("$f") ;; esac
done < <(tree_files)
unformatted=$(gofmt -l "${gofiles[@]}" 2>&1)
if [ -n "$unformatted" ]; then
	printf '%s\n' "$unformatted" | sed 's/^/    /' >&2
	fail "gofmt: $(printf '%s\n' "$unformatted" | paste -sd' ' -); fix: gofmt -w <file>"
fi

step "4. go vet ./..."
go vet ./... || fail "go vet (findings above)"

step "5. golangci-lint $("$GOLANGCI_LINT" version --short 2>/dev/null || echo '?') run (.golangci.yml)"
"$GOLANGCI_LINT" run ./... || fail "golangci-lint (findings above; .golangci.yml says which linters run)"

step "6. no compiled programs or files over 1 MiB in the tree"
big=()
while IFS= read -r -d '' f; do
	size=$(stat -c %s "$f")
	if [ "$size" -gt 1048576 ]; then
		big+=("$f ($size bytes)")
	elif [ "$(head -c 4 "$f" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
		big+=("$f (a compiled program)")
	fi
done < <(tree_files)
if [ ${#big[@]} -gt 0 ]; then
	printf '    %s\n' "${big[@]}" >&2
	fail "files that do not belong in the repository: ${big[*]}; fix: git rm --cached <file>, and add it to .gitignore"
fi

summary "generated files, go.mod/go.sum, gofmt, go vet, golangci-lint and the tree's files"
