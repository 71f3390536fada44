package abuse

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/testutil/mosquitto"
	"github.com/kubetwin/kubetwin/internal/testutil/operatorproc"
)

// What the tests share: the control plane, a kubeconfig for it, the
// operator binary and a non-caching client.
var (
	k8s            client.Client
	kubeconfigPath string
	managerBin     string
	repoRoot       string
	mosquittoBin   string
	passwdBin      string

	testScheme = k8sruntime.NewScheme()
)

func TestMain(m *testing.M) {
	os.Exit(runSuite(m))
}

func runSuite(m *testing.M) int {
	if listingOnly() {
		return m.Run()
	}
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "abuse: "+format+"\n", args...)
		return 1
	}
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		return fail("KUBEBUILDER_ASSETS is not set. It must point at kube-apiserver, etcd and kubectl:\n" +
			"  export KUBEBUILDER_ASSETS=$(hack/controlplane.sh)   (or run make test)")
	}
	var err error
	if mosquittoBin, err = mosquitto.Binary(); err != nil {
		return fail("%v", err)
	}
	if passwdBin, err = exec.LookPath("mosquitto_passwd"); err != nil {
		return fail("mosquitto_passwd is not installed (apt-get install mosquitto): %v", err)
	}
	if repoRoot, err = filepath.Abs(filepath.Join("..", "..")); err != nil {
		return fail("%v", err)
	}
	_ = clientgoscheme.AddToScheme(testScheme)
	_ = v1alpha1.AddToScheme(testScheme)

	tmp, err := os.MkdirTemp("", "kubetwin-abuse-")
	if err != nil {
		return fail("%v", err)
	}
	defer func() { _ = os.RemoveAll(tmp) }()

	// make test builds bin/manager and passes it in KUBETWIN_MANAGER; run
	// alone, the suite builds the operator itself so that it never tests a
	// stale binary.
	if managerBin = os.Getenv("KUBETWIN_MANAGER"); managerBin == "" {
		managerBin = filepath.Join(tmp, "manager")
		if err := operatorproc.GoBuild(repoRoot, managerBin, "./cmd/manager"); err != nil {
			return fail("%v", err)
		}
	} else if _, err := os.Stat(managerBin); err != nil {
		return fail("KUBETWIN_MANAGER: %v (run make build)", err)
	}

	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join(repoRoot, "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	if _, err := env.Start(); err != nil {
		return fail("starting the control plane (envtest, KUBEBUILDER_ASSETS=%s): %v", os.Getenv("KUBEBUILDER_ASSETS"), err)
	}
	defer func() {
		if err := env.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "abuse: stopping the control plane: %v\n", err)
		}
	}()
	user, err := env.ControlPlane.AddUser(envtest.User{Name: "abuse-admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return fail("adding the admin user: %v", err)
	}
	kc, err := user.KubeConfig()
	if err != nil {
		return fail("kubeconfig: %v", err)
	}
	kubeconfigPath = filepath.Join(tmp, "kubeconfig")
	if err := os.WriteFile(kubeconfigPath, kc, 0o600); err != nil {
		return fail("writing the kubeconfig: %v", err)
	}
	cfg := rest.CopyConfig(user.Config())
	// The suite creates hundreds of twins up front and reads them back.
	cfg.QPS, cfg.Burst = 500, 1000
	if k8s, err = client.New(cfg, client.Options{Scheme: testScheme}); err != nil {
		return fail("client: %v", err)
	}
	if err := operatorproc.WaitForCRD(k8s); err != nil {
		return fail("%v", err)
	}
	return m.Run()
}

// listingOnly reports whether go test was asked only to list tests.
func listingOnly() bool {
	for _, a := range os.Args[1:] {
		if strings.HasPrefix(a, "-test.list") {
			return true
		}
	}
	return false
}
