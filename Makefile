# kubetwin — build, test, demo and benchmark.

# Tool versions (pinned).
CONTROLLER_TOOLS_VERSION ?= v0.23.0

LOCALBIN ?= $(shell pwd)/bin
CONTROLLER_GEN ?= $(LOCALBIN)/controller-gen
KUBETWIN_CACHE ?= $(HOME)/.cache/kubetwin
export KUBETWIN_CACHE

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
	$(CONTROLLER_GEN) rbac:roleName=kubetwin-manager crd paths="./api/...;./controllers/...;./internal/webhook/...;./internal/certs/...;./internal/hubapi/..." output:crd:artifacts:config=config/crd/bases output:rbac:artifacts:config=config/rbac
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

.PHONY: verify
verify: manifests generate fmt ## Fail when generated files or formatting are out of date.
	@git diff --exit-code -- api config controllers charts || (echo "generated files are out of date: run make manifests generate fmt" && exit 1)

.PHONY: controlplane
controlplane: ## Build (once) the local kube-apiserver, etcd and kubectl; prints their folder.
	@hack/controlplane.sh

# The packages whose goroutines share state (broker, bridge, device
# library, reconciler, service API) run under the race detector; the rest
# without it, which keeps make test's time down. Each package runs once;
# the abuse suite runs alone, so its latency bounds measure the operator,
# not the other suites sharing the machine.
RACE_PKGS ?= ./internal/bridge/... ./internal/bus/... ./pkg/device/... ./controllers/... ./internal/hubapi/...
TEST_ENV = KUBEBUILDER_ASSETS="$(CONTROLPLANE)" KUBETWIN_MANAGER=$(LOCALBIN)/manager

.PHONY: test
test: manifests generate vet build ## Unit, envtest, end-to-end and abuse tests (needs mosquitto; race detector on the concurrent packages), then a short fuzz run.
	$(TEST_ENV) go test -race $(RACE_PKGS) -count=1 -timeout 30m
	$(TEST_ENV) go test $(filter-out $(shell go list $(RACE_PKGS) ./test/abuse/),$(shell go list ./...)) -count=1 -timeout 30m
	$(TEST_ENV) go test ./test/abuse/ -count=1 -timeout 15m
	$(MAKE) fuzz FUZZTIME=10s

FUZZTIME ?= 60s
.PHONY: fuzz
fuzz: ## Run each fuzz target for FUZZTIME (default 60s; make test runs 10s).
	go test ./internal/query/ -run='^$$' -fuzz='^FuzzParse$$' -fuzztime=$(FUZZTIME)
	go test ./internal/query/ -run='^$$' -fuzz='^FuzzEval$$' -fuzztime=$(FUZZTIME)
	go test ./internal/twin/ -run='^$$' -fuzz='^FuzzMergeDiff$$' -fuzztime=$(FUZZTIME)

.PHONY: test-e2e
test-e2e: build ## End-to-end tests only.
	KUBEBUILDER_ASSETS="$(CONTROLPLANE)" go test ./test/e2e/... -count=1 -v -timeout 30m

.PHONY: test-abuse
test-abuse: build ## Abuse suite only: the operator with 200 devices under each attack (docs/operations.md).
	$(TEST_ENV) go test ./test/abuse/ -run '^TestAbuse$$' -count=1 -v -timeout 15m

SOAK_DURATION ?= 10m
SOAK_DEVICES ?= 1000
SOAK_REPORT_INTERVAL ?= 10s
.PHONY: soak
soak: build ## Abuse soak (not in CI): SOAK_DEVICES devices, every attack repeated for SOAK_DURATION; prints memory, goroutines, latency, lost reports.
	$(TEST_ENV) KUBETWIN_SOAK_DURATION=$(SOAK_DURATION) KUBETWIN_SOAK_DEVICES=$(SOAK_DEVICES) KUBETWIN_SOAK_REPORT_INTERVAL=$(SOAK_REPORT_INTERVAL) \
		go test ./test/abuse/ -run '^TestSoak$$' -count=1 -v -timeout 90m

.PHONY: bench
bench: build ## Benchmarks against the real control plane and embedded broker.
	KUBEBUILDER_ASSETS="$(CONTROLPLANE)" go run ./test/bench $(BENCH_ARGS)

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

.PHONY: controller-gen
controller-gen: $(CONTROLLER_GEN)
$(CONTROLLER_GEN):
	GOBIN=$(LOCALBIN) go install sigs.k8s.io/controller-tools/cmd/controller-gen@$(CONTROLLER_TOOLS_VERSION)
