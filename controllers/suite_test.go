package controllers_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/deviceauth"
	"github.com/kubetwin/kubetwin/internal/operator"
)

// The suite runs the real manager (cache, controller, embedded broker)
// against a real kube-apiserver and etcd; tests talk to it with a
// non-caching client and real MQTT devices.
var (
	k8s        client.WithWatch
	restConfig *rest.Config // for tests that start a manager of their own
	brokerURL  string
	testScheme = runtime.NewScheme()
)

// testHub is the suite's --hub-hostname.
const testHub = "kubetwin.test"

// claimsNS is the suite's --claims-namespace.
const claimsNS = "kubetwin-system"

// openWithoutUsername lets a client that sends no username and no password
// in as an administrator (every topic), as the broker did before devices
// were authenticated, so the tests written for that keep working; a client
// with a username is authenticated for real. Security tests always send one.
type openWithoutUsername struct{ bus.Authenticator }

func (a openWithoutUsername) Authenticate(ctx context.Context, clientID, username string, password []byte) (bus.Grant, error) {
	if username == "" && len(password) == 0 {
		return bus.Grant{Admin: true}, nil
	}
	return a.Authenticator.Authenticate(ctx, clientID, username, password)
}

func TestMain(m *testing.M) {
	os.Exit(runSuite(m))
}

func runSuite(m *testing.M) int {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		fmt.Fprintln(os.Stderr, "KUBEBUILDER_ASSETS is not set: run the tests with make test (it builds the control plane)")
		return 1
	}
	ctrl.SetLogger(zap.New(zap.UseDevMode(true), zap.Level(zapLevel())))
	_ = clientgoscheme.AddToScheme(testScheme)
	_ = v1alpha1.AddToScheme(testScheme)

	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	cfg, err := env.Start()
	if err != nil {
		fmt.Fprintf(os.Stderr, "starting envtest: %v\n", err)
		return 1
	}
	defer func() { _ = env.Stop() }()

	restConfig = cfg
	k8s, err = client.NewWithWatch(cfg, client.Options{Scheme: testScheme})
	if err != nil {
		fmt.Fprintf(os.Stderr, "client: %v\n", err)
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: claimsNS}}); err != nil {
		fmt.Fprintf(os.Stderr, "namespace: %v\n", err)
		return 1
	}

	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 testScheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Cache:                  cache.Options{ByObject: controllers.KeySecretCacheOptions(), DefaultTransform: operator.CacheTransform},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "manager: %v\n", err)
		return 1
	}
	br := operator.NewBridge(mgr, operator.BridgeOptions{ClaimsNamespace: claimsNS})
	auth := &deviceauth.Authenticator{HubHostname: testHub, Lookup: controllers.DeviceLookup(operator.Resolver(mgr, claimsNS))}
	emb, err := bus.NewEmbedded(bus.EmbeddedOptions{
		Listen: "127.0.0.1:0", Handler: br.Handle, Presence: br.Presence, Logger: ctrl.Log.WithName("broker"),
		Auth: openWithoutUsername{auth},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "broker: %v\n", err)
		return 1
	}
	if err := operator.AddBus(mgr, br, emb); err != nil {
		fmt.Fprintf(os.Stderr, "%v\n", err)
		return 1
	}
	if err := operator.AddReconciler(ctx, mgr, br, operator.ReconcilerOptions{ClaimsNamespace: claimsNS, Credentials: &controllers.Credentials{
		HubHostname: testHub,
		Provisioner: deviceauth.EmbeddedProvisioner{Broker: emb, Auth: auth},
	}}); err != nil {
		fmt.Fprintf(os.Stderr, "%v\n", err)
		return 1
	}
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	select {
	case <-emb.Ready():
	case err := <-done:
		fmt.Fprintf(os.Stderr, "manager stopped: %v\n", err)
		return 1
	case <-time.After(60 * time.Second):
		fmt.Fprintln(os.Stderr, "embedded broker did not start")
		return 1
	}
	brokerURL = "tcp://" + emb.Addr()
	code := m.Run()
	cancel()
	<-done
	return code
}

func zapLevel() zapcore.Level {
	if os.Getenv("KUBETWIN_TEST_VERBOSE") != "" {
		return -1
	}
	return 2 // errors only
}
