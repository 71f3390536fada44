# kubetwin — build, test, demo and benchmark.

# Tool versions (pinned).
CONTROLLER_TOOLS_VERSION ?= v0.23.0
GOLANGCI_LINT_VERSION ?= v2.15.0

LOCALBIN ?= $(shell pwd)/bin
KUBETWIN_CACHE ?= $(HOME)/.cache/kubetwin
export KUBETWIN_CACHE
# Tools are built once from the Go module proxy into the cache, outside the
# clone, so a fresh clone on the same machine (CI) does not build them again.
TOOLS ?= $(KUBETWIN_CACHE)/tools
CONTROLLER_GEN ?= $(TOOLS)/controller-gen-$(CONTROLLER_TOOLS_VERSION)/controller-gen
GOLANGCI_LINT ?= $(TOOLS)/golangci-lint-$(GOLANGCI_LINT_VERSION)/golangci-lint

# Where make install-plugin puts kubectl-twin (any folder on the PATH works),
# and the version kubectl twin version reports.
PREFIX ?= /usr/local/bin
VERSION ?= dev

# Where the local control plane (kube-apiserver, etcd, kubectl) lives; built on first use.
CONTROLPLANE = $(shell hack/controlplane.sh)

.PHONY: all
all: build

##@ General

.PHONY: help
help: ## Show the targets.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target>\n"} /^[a-zA-Z_0-9-]+:.*?##/ { printf "  %-16s %s\n", $$1, $$2 } /^##@/ { printf "\n%s\n", substr($$0, 5) } ' $(MAKEFILE_LIST)

##@ Development

.PHONY: manifests
manifests: controller-gen ## Generate the CRD and RBAC manifests.
	$(CONTROLLER_GEN) rbac:roleName=kubetwin-manager crd paths="./api/...;./controllers/...;./internal/..." output:crd:artifacts:config=config/crd/bases output:rbac:artifacts:config=config/rbac
	hack/sync-chart-crds.sh

.PHONY: generate
generate: controller-gen ## Generate deepcopy code.
	$(CONTROLLER_GEN) object:headerFile="hack/boilerplate.go.txt" paths="./api/..."

.PHONY: fmt
fmt: ## go fmt.
	go fmt ./...

.PHONY: vet
vet: ## go vet.
	go vet ./...

.PHONY: lint
lint: golangci-lint ## Run the pinned golangci-lint (.golangci.yml).
	$(GOLANGCI_LINT) run ./...

.PHONY: verify
verify: controller-gen golangci-lint ## Check, never change: generated files and go mod tidy (in a scratch copy), gofmt, go vet, golangci-lint.
	CONTROLLER_GEN=$(CONTROLLER_GEN) GOLANGCI_LINT=$(GOLANGCI_LINT) hack/verify.sh

.PHONY: verify-generated
verify-generated: controller-gen ## Check (never regenerate) the generated files and go.mod/go.sum; make test runs it first.
	@CONTROLLER_GEN=$(CONTROLLER_GEN) hack/verify.sh generated

.PHONY: deps
deps: ## Install what make test needs (mosquitto, Node.js, npm, the Azure IoT SDKs, the control plane); quick when present.
	@hack/deps.sh

.PHONY: controlplane
controlplane: ## Build (once) the local kube-apiserver, etcd and kubectl; prints their folder.
	@hack/controlplane.sh

# The packages whose goroutines share state (broker, bridge, device
# library, reconciler, service API, the plugin's part-by-part output) run
# under the race detector; the rest without it, which keeps make test's
# time down. Each package runs once;
# the abuse suite runs alone, so its latency bounds measure the operator,
# not the other suites sharing the machine.
RACE_PKGS ?= ./internal/bridge/... ./internal/bus/... ./pkg/device/... ./controllers/... ./internal/hubapi/... ./internal/kubectltwin/
# Debian installs mosquitto in /usr/sbin, which a non-root PATH may lack.
TEST_ENV = KUBEBUILDER_ASSETS="$(CONTROLPLANE)" KUBETWIN_MANAGER=$(LOCALBIN)/manager PATH="$$PATH:/usr/sbin"

# make test checks the generated files and never regenerates them: a stale
# CRD, deepcopy file or chart CRD fails it (make manifests generate fixes).
.PHONY: test
test: deps verify-generated vet build ## Install what is missing (hack/deps.sh), then unit, envtest, end-to-end and abuse tests (race detector on the concurrent packages) and a short fuzz run.
	$(TEST_ENV) go test -race $(RACE_PKGS) -count=1 -timeout 30m
	$(TEST_ENV) go test $(filter-out $(shell go list $(RACE_PKGS) ./test/abuse/),$(shell go list ./...)) -count=1 -timeout 30m
	$(TEST_ENV) go test ./test/abuse/ -count=1 -timeout 15m
	$(MAKE) fuzz FUZZTIME=$(TEST_FUZZTIME)

FUZZTIME ?= 60s
# make test fuzzes a number of inputs, not a time: with a timed -fuzztime,
# go1.26's fuzzer can fail "context deadline exceeded" as the time runs out,
# with no failing input (golang/go#75804, fixed in Go 1.27); seen in CI.
TEST_FUZZTIME ?= 150000x
.PHONY: fuzz
fuzz: ## Run each fuzz target for FUZZTIME (default 60s; make test runs 150000 inputs each).
	go test ./internal/query/ -run='^$$' -fuzz='^FuzzParse$$' -fuzztime=$(FUZZTIME)
	go test ./internal/query/ -run='^$$' -fuzz='^FuzzEval$$' -fuzztime=$(FUZZTIME)
	go test ./internal/twin/ -run='^$$' -fuzz='^FuzzMergeDiff$$' -fuzztime=$(FUZZTIME)
	go test ./internal/watchdecode/ -run='^$$' -fuzz='^FuzzDecodeAsClientGo$$' -fuzztime=$(FUZZTIME)
	go test ./internal/watchdecode/ -run='^$$' -fuzz='^FuzzSplitEvent$$' -fuzztime=$(FUZZTIME)
	go test ./internal/watchdecode/ -run='^$$' -fuzz='^FuzzWatchStream$$' -fuzztime=$(FUZZTIME)
	go test ./internal/kubectltwin/ -run='^$$' -fuzz='^FuzzRawJSON$$' -fuzztime=$(FUZZTIME)

.PHONY: test-e2e
test-e2e: deps build ## End-to-end tests only.
	$(TEST_ENV) go test ./test/e2e/... -count=1 -v -timeout 30m

.PHONY: test-abuse
test-abuse: deps build ## Abuse suite only: the operator with 200 devices under each attack (docs/operations.md).
	$(TEST_ENV) go test ./test/abuse/ -run '^TestAbuse$$' -count=1 -v -timeout 15m

SOAK_DURATION ?= 10m
SOAK_DEVICES ?= 1000
SOAK_REPORT_INTERVAL ?= 10s
.PHONY: soak
soak: build ## Abuse soak (not in CI): SOAK_DEVICES devices, every attack repeated for SOAK_DURATION; prints memory, goroutines, latency, lost reports.
	$(TEST_ENV) KUBETWIN_SOAK_DURATION=$(SOAK_DURATION) KUBETWIN_SOAK_DEVICES=$(SOAK_DEVICES) KUBETWIN_SOAK_REPORT_INTERVAL=$(SOAK_REPORT_INTERVAL) \
		go test ./test/abuse/ -run '^TestSoak$$' -count=1 -v -timeout 90m

# BENCH_SIZE=tiny: every phase at a few twins and a second or two, a check
# that the benchmark still runs and its answers are right (CI runs it), not a
# measurement; 200 query twins, so both queries match some (6 and 1) and the
# comparison with a full scan checks something. BENCH_ARGS follow it.
BENCH_SIZE ?= full
BENCH_TINY_ARGS = --twins 20 --baseline-inflight 4 --baseline-duration 1s --baseline-device-twins 1s \
	--devices 10 --rate 2 --warmup 1s --duration 2s --desired 5 --query-twins 200 --query-reps 1 \
	--service-twins 10 --service-duration 2s --service-concurrency 2
BENCH_SIZE_ARGS_full =
BENCH_SIZE_ARGS_tiny = $(BENCH_TINY_ARGS)
.PHONY: bench
bench: build ## Benchmarks against the real control plane and embedded broker (BENCH_SIZE=tiny: a quick check that it runs).
	@case "$(BENCH_SIZE)" in full|tiny) ;; *) echo "BENCH_SIZE must be full or tiny, not '$(BENCH_SIZE)'" >&2; exit 2;; esac
	KUBEBUILDER_ASSETS="$(CONTROLPLANE)" go run ./test/bench $(BENCH_SIZE_ARGS_$(BENCH_SIZE)) $(BENCH_ARGS)

# Not in CI: fleet-size figures for docs/sizing.md. On 2 cores 10,000 twins
# with 10,000 devices take ~5 minutes, 30,000 twins ~15, the default 100,000
# over 30 (mostly the operator's start-up). It stops by itself when the
# machine's available memory runs low. The operator runs with its production
# soft memory limit (--scale-memory-limit; SCALE_ARGS=--scale-memory-limit=0
# for none) and serves the query API behind an APIService, as the chart does.
# The restart is also measured as a pod restarts: bin/manager, a fresh
# process, in a memory cgroup limited as the chart's container (as root).
SCALE_TWINS ?= 100000
SCALE_DEVICES ?= 10000
SCALE_ARGS ?=
.PHONY: bench-scale
bench-scale: build ## Fleet-size benchmark (not in CI): SCALE_TWINS twins, SCALE_DEVICES connected devices; memory, start-up, queries, latency.
	KUBEBUILDER_ASSETS="$(CONTROLPLANE)" go run ./test/bench --scale $(SCALE_TWINS) --scale-devices $(SCALE_DEVICES) --scale-restart-binary bin/manager $(SCALE_ARGS)

# Not in CI (~6 minutes per variant and round on 2 cores, most of it warm-ups): the operator's
# write path before issue 14 against today's, side by side on one control
# plane: distinct-twin report capacity, then report latency at 50% and 80%
# of it. AB_VARIANTS takes --write-path values (see go run ./test/bench --help).
AB_VARIANTS ?= old,current
AB_ARGS ?=
.PHONY: bench-writepath
bench-writepath: build ## Write-path A/B (not in CI): AB_VARIANTS side by side; capacity and latency at 50%/80% of it.
	KUBEBUILDER_ASSETS="$(CONTROLPLANE)" go run ./test/bench --ab $(AB_VARIANTS) $(AB_ARGS)

# One TwinConfiguration over CONFIG_TWINS twins, each with a device
# (cmd/device-sim --apply-desired) that reports the content back, while
# other devices report: time to all applied and all in sync, API writes
# per twin, the other devices' latency without and during the rollout.
# CONFIG_SIZE=tiny: a few twins, a quick check that it runs (CI runs it).
CONFIG_TWINS ?= 10000
CONFIG_ARGS ?=
CONFIG_SIZE ?= full
CONFIG_SIZE_ARGS_full = --config-twins $(CONFIG_TWINS)
CONFIG_SIZE_ARGS_tiny = --config-twins 10 --config-other-devices 5 --config-warmup 1s --config-window 2s --config-quiet 2s --config-timeout 2m
.PHONY: bench-config
bench-config: build ## Fleet configuration benchmark: one TwinConfiguration over CONFIG_TWINS twins with devices (CONFIG_SIZE=tiny: a quick check).
	@case "$(CONFIG_SIZE)" in full|tiny) ;; *) echo "CONFIG_SIZE must be full or tiny, not '$(CONFIG_SIZE)'" >&2; exit 2;; esac
	KUBEBUILDER_ASSETS="$(CONTROLPLANE)" go run ./test/bench $(CONFIG_SIZE_ARGS_$(CONFIG_SIZE)) $(CONFIG_ARGS)

##@ Helm and image

HELM ?= $(LOCALBIN)/helm
IMG ?= ghcr.io/kubetwin/kubetwin:v0.1.0

.PHONY: helm
helm: ## Build (once, cached) the pinned helm binary into bin/.
	@hack/helm.sh >/dev/null

.PHONY: helm-lint
helm-lint: helm ## helm lint the chart (defaults, and an external broker with cert-manager).
	$(HELM) lint charts/kubetwin --strict --kube-version 1.37.2
	$(HELM) lint charts/kubetwin --strict --kube-version 1.37.2 --set broker.external.url=tcp://mosquitto:1883 --set webhook.certificates.mode=cert-manager

.PHONY: helm-template
helm-template: helm ## Render the chart with its defaults.
	$(HELM) template kubetwin charts/kubetwin -n kubetwin-system --kube-version 1.37.2

.PHONY: test-helm
test-helm: ## Chart and GitOps tests only (lint, schema, install into the local control plane, Argo CD/Flux health).
	KUBEBUILDER_ASSETS="$(CONTROLPLANE)" go test ./test/helm/ ./test/gitops/ -count=1 -v

.PHONY: docker-build
docker-build: ## Build the operator image (needs a container engine; the dev machines have none).
	docker build -t $(IMG) .

##@ Demo

.PHONY: demo
demo: build ## Start a local control plane, the operator and a device, and run the getting-started scenario.
	KUBEBUILDER_ASSETS="$(CONTROLPLANE)" hack/demo.sh up

.PHONY: demo-down
demo-down: ## Stop what make demo started.
	hack/demo.sh down

##@ Build

.PHONY: build
build: build-plugin ## Build the operator, the device simulator and the kubectl plugin into bin/.
	go build -o $(LOCALBIN)/manager ./cmd/manager
	go build -o $(LOCALBIN)/device-sim ./cmd/device-sim

.PHONY: build-plugin
build-plugin: ## Build the kubectl plugin into bin/kubectl-twin.
	go build -ldflags "-X github.com/kubetwin/kubetwin/internal/kubectltwin.version=$(VERSION)" -o $(LOCALBIN)/kubectl-twin ./cmd/kubectl-twin

.PHONY: run
run: manifests generate ## Run the operator against the current kubeconfig.
	go run ./cmd/manager

##@ Deployment

.PHONY: install
install: manifests ## Install the CRD into the current kubeconfig's cluster.
	kubectl apply -k config/crd

.PHONY: install-plugin
install-plugin: build-plugin ## Put kubectl-twin on the PATH (PREFIX=/usr/local/bin) so that `kubectl twin` works.
	install -d $(PREFIX)
	install -m 0755 $(LOCALBIN)/kubectl-twin $(PREFIX)/kubectl-twin
	@echo "installed $(PREFIX)/kubectl-twin: try kubectl twin --help"

.PHONY: uninstall-plugin
uninstall-plugin: ## Remove kubectl-twin from PREFIX.
	rm -f $(PREFIX)/kubectl-twin

.PHONY: uninstall
uninstall: manifests ## Remove the CRD.
	kubectl delete -k config/crd --ignore-not-found

.PHONY: deploy
deploy: manifests ## Deploy the operator with kustomize.
	kubectl apply -k config/default

.PHONY: undeploy
undeploy: ## Remove the operator.
	kubectl delete -k config/default --ignore-not-found

##@ Tools

# go install pkg@version builds with the tool's own go.mod (go.mod here is
# not touched); into a temporary folder first, so an interrupted build
# leaves no binary behind.
.PHONY: controller-gen
controller-gen: $(CONTROLLER_GEN)
$(CONTROLLER_GEN):
	@mkdir -p $(@D)
	GOBIN=$(@D)/.tmp go install sigs.k8s.io/controller-tools/cmd/controller-gen@$(CONTROLLER_TOOLS_VERSION)
	mv $(@D)/.tmp/controller-gen $@ && rmdir $(@D)/.tmp

.PHONY: golangci-lint
golangci-lint: $(GOLANGCI_LINT)
$(GOLANGCI_LINT):
	@mkdir -p $(@D)
	@echo "building golangci-lint $(GOLANGCI_LINT_VERSION) from the Go module proxy (first time only; ~5 minutes on 2 cores)"
	GOBIN=$(@D)/.tmp go install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)
	mv $(@D)/.tmp/golangci-lint $@ && rmdir $(@D)/.tmp
