package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/testutil/operatorproc"
)

// What the suite shares: the control plane, a kubeconfig for it, the built
// binaries and a non-caching client.
var (
	k8s            client.WithWatch
	kubeconfigPath string
	managerBin     string
	deviceSimBin   string
	pluginBin      string
	repoRoot       string

	mosquittoBin    string
	mosquittoPubBin string
	mosquittoSubBin string

	testScheme = k8sruntime.NewScheme()
)

func TestMain(m *testing.M) {
	os.Exit(runSuite(m))
}

func runSuite(m *testing.M) int {
	// Listing or running no test must not need the control plane.
	if onlyListing() {
		return m.Run()
	}
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		fmt.Fprintln(os.Stderr, "e2e: KUBEBUILDER_ASSETS is not set. It must point at kube-apiserver, etcd and kubectl:\n"+
			"  export KUBEBUILDER_ASSETS=$(hack/controlplane.sh)   (or run make test-e2e)")
		return 1
	}
	var err error
	if mosquittoBin, err = findBinary("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"); err == nil {
		if mosquittoPubBin, err = findBinary("mosquitto_pub"); err == nil {
			mosquittoSubBin, err = findBinary("mosquitto_sub")
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v. The end-to-end tests need Mosquitto and its clients:\n"+
			"  apt-get install mosquitto mosquitto-clients\n", err)
		return 1
	}
	if repoRoot, err = filepath.Abs(filepath.Join("..", "..")); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		return 1
	}
	_ = clientgoscheme.AddToScheme(testScheme)
	_ = v1alpha1.AddToScheme(testScheme)

	tmp, err := os.MkdirTemp("", "kubetwin-e2e-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		return 1
	}
	defer func() { _ = os.RemoveAll(tmp) }()

	// Build the binaries first: it is the slow part, and needs no control plane.
	managerBin = filepath.Join(tmp, "manager")
	deviceSimBin = filepath.Join(tmp, "device-sim")
	pluginBin = filepath.Join(tmp, "kubectl-twin")
	for _, b := range []struct{ out, pkg string }{{managerBin, "./cmd/manager"}, {deviceSimBin, "./cmd/device-sim"}, {pluginBin, "./cmd/kubectl-twin"}} {
		if err := operatorproc.GoBuild(repoRoot, b.out, b.pkg); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
			return 1
		}
	}

	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join(repoRoot, "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	if _, err := env.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: starting the control plane (envtest, KUBEBUILDER_ASSETS=%s): %v\n", os.Getenv("KUBEBUILDER_ASSETS"), err)
		return 1
	}
	defer func() {
		if err := env.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: stopping the control plane: %v\n", err)
		}
	}()

	user, err := env.ControlPlane.AddUser(envtest.User{Name: "e2e-admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: adding the admin user: %v\n", err)
		return 1
	}
	kc, err := user.KubeConfig()
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: kubeconfig: %v\n", err)
		return 1
	}
	kubeconfigPath = filepath.Join(tmp, "kubeconfig")
	if err := os.WriteFile(kubeconfigPath, kc, 0o600); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: writing the kubeconfig: %v\n", err)
		return 1
	}

	// The tests' own client: no cache, so every read is the API server's truth.
	k8s, err = client.NewWithWatch(rest.CopyConfig(user.Config()), client.Options{Scheme: testScheme})
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: client: %v\n", err)
		return 1
	}
	if err := operatorproc.WaitForCRD(k8s); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		return 1
	}
	return m.Run()
}

// onlyListing reports whether go test was asked only to list tests.
func onlyListing() bool {
	for _, a := range os.Args[1:] {
		if len(a) > len("-test.list") && a[:len("-test.list")] == "-test.list" {
			return true
		}
	}
	return false
}

// findBinary looks a program up in PATH, then in the given places.
func findBinary(name string, more ...string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, p := range more {
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s is not installed (not in PATH)", name)
}
