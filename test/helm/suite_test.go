// Package helm tests the chart charts/kubetwin: helm lint, the values schema,
// what helm template renders, and that a real kube-apiserver (envtest)
// accepts every rendered object with the expected shape, both with the
// defaults and with an external broker and cert-manager certificates; then
// helm install, upgrade and uninstall through the helm binary.
//
// The helm binary is built once from the Go module proxy by hack/helm.sh
// (cached outside the repository). The API server tests need
// KUBEBUILDER_ASSETS (make test sets it from hack/controlplane.sh); without
// it they fail and say so, while lint, schema and template tests still run.
package helm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// kubeVersion is the Kubernetes version helm template renders for (the
// chart needs 1.30+; helm template alone assumes 1.20). It is the version of
// the local control plane (hack/controlplane.sh).
const kubeVersion = "1.37.2"

var (
	root   = repoRoot()
	chart  = filepath.Join(root, "charts", "kubetwin")
	scheme = k8sruntime.NewScheme()

	// The API server, started by TestMain when KUBEBUILDER_ASSETS is set.
	env        *envtest.Environment
	restConfig *rest.Config
	k8s        client.Client
	kubeconfig string // for the helm binary
	envErr     error  // why there is no API server
)

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

func TestMain(m *testing.M) {
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1alpha1.AddToScheme(scheme)
	stop := startAPIServer()
	code := m.Run()
	stop()
	os.Exit(code)
}

// startAPIServer starts envtest with the chart's own CRDs.
func startAPIServer() func() {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		envErr = errors.New("KUBEBUILDER_ASSETS is not set: run `make test`, or " +
			"KUBEBUILDER_ASSETS=$(hack/controlplane.sh) go test ./test/helm/ (hack/controlplane.sh builds the control plane once)")
		return func() {}
	}
	env = &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join(chart, "crds")},
		ErrorIfCRDPathMissing: true,
	}
	var err error
	if restConfig, err = env.Start(); err != nil {
		envErr = fmt.Errorf("starting the API server: %w", err)
		return func() {}
	}
	stop := func() { _ = env.Stop() }
	if k8s, err = client.New(restConfig, client.Options{Scheme: scheme}); err != nil {
		envErr = err
		return stop
	}
	// A kubeconfig for the helm binary: a cluster administrator.
	user, err := env.AddUser(envtest.User{Name: "helm-test", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		envErr = err
		return stop
	}
	kc, err := user.KubeConfig()
	if err != nil {
		envErr = err
		return stop
	}
	dir, err := os.MkdirTemp("", "kubetwin-helm-test-")
	if err != nil {
		envErr = err
		return stop
	}
	kubeconfig = filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, kc, 0o600); err != nil {
		envErr = err
	}
	return func() {
		stop()
		_ = os.RemoveAll(dir)
	}
}

// apiServer fails the test when there is no API server.
func apiServer(t *testing.T) client.Client {
	t.Helper()
	if envErr != nil {
		t.Fatal(envErr)
	}
	return k8s
}

var (
	helmOnce sync.Once
	helmPath string
	helmErr  error
)

// helmBinary builds (once, cached) and returns the pinned helm binary.
func helmBinary(t *testing.T) string {
	t.Helper()
	helmOnce.Do(func() {
		cmd := exec.Command(filepath.Join(root, "hack", "helm.sh"))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			helmErr = fmt.Errorf("hack/helm.sh: %v\n%s", err, stderr.String())
			return
		}
		helmPath = strings.TrimSpace(string(out))
	})
	if helmErr != nil {
		t.Fatal(helmErr)
	}
	return helmPath
}

// helm runs the helm binary with a throwaway home, so the tests neither read
// nor write the user's helm configuration.
func helm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	bin := helmBinary(t)
	home := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"),
		"KUBECONFIG="+kubeconfig,
	)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// render runs helm template and decodes the objects it prints.
func render(t *testing.T, release, namespace string, args ...string) []*unstructured.Unstructured {
	t.Helper()
	all := append([]string{"template", release, chart, "--namespace", namespace, "--kube-version", kubeVersion}, args...)
	out, err := helm(t, all...)
	if err != nil {
		t.Fatalf("helm %s: %v\n%s", strings.Join(all, " "), err, out)
	}
	return decodeObjects(t, out)
}

func decodeObjects(t *testing.T, manifests string) []*unstructured.Unstructured {
	t.Helper()
	var objs []*unstructured.Unstructured
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(manifests), 4096)
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			t.Fatalf("decoding rendered manifests: %v", err)
		}
		if len(m) == 0 {
			continue
		}
		objs = append(objs, &unstructured.Unstructured{Object: m})
	}
	return objs
}

// find returns the one rendered object of a kind and name.
func find(t *testing.T, objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o
		}
	}
	t.Fatalf("no %s %s among the rendered objects %v", kind, name, names(objs))
	return nil
}

func names(objs []*unstructured.Unstructured) []string {
	var out []string
	for _, o := range objs {
		out = append(out, o.GetKind()+"/"+o.GetName())
	}
	return out
}

// writeValues writes a values file for helm -f.
func writeValues(t *testing.T, yaml string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
