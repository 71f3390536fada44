package webhook_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	clocktesting "k8s.io/utils/clock/testing"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	crwebhook "sigs.k8s.io/controller-runtime/pkg/webhook"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	ktcerts "github.com/kubetwin/kubetwin/internal/certs"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/internal/webhook"
)

// The suite installs config/webhook/manifests.yaml into a real
// kube-apiserver (envtest points it at a local URL and its own throwaway
// CA), then runs the webhook server with the operator's CertManager, which
// issues its own CA and replaces the caBundle. So every admission call the
// tests make succeeds only if that injection worked.
var (
	suiteErr   error // why the API server tests cannot run
	env        *envtest.Environment
	restConfig *rest.Config
	k8s        client.Client
	certs      *ktcerts.CertManager
	certClock  *clocktesting.FakeClock
	webhookURL string // https://127.0.0.1:port
	servingHP  string // 127.0.0.1:port
	testScheme = runtime.NewScheme()
)

const (
	// configName is the name of the webhook configurations in
	// config/webhook/manifests.yaml (kustomize prefixes it when deploying).
	configName   = "admission"
	certNS       = "kubetwin-system"
	claimsNS     = certNS
	certSecret   = "webhook-server-cert"
	operatorUser = "system:serviceaccount:kubetwin-system:kubetwin-controller-manager"
	wait         = 20 * time.Second
	tick         = 50 * time.Millisecond
)

func TestMain(m *testing.M) {
	code, cleanup := setup()
	if code == 0 {
		code = m.Run()
	}
	cleanup()
	os.Exit(code)
}

// setup starts the API server and the webhook unless KUBEBUILDER_ASSETS is
// missing; then only the unit tests can run (apiServer fails the others).
func setup() (int, func()) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		suiteErr = errors.New("KUBEBUILDER_ASSETS is not set: run the tests with make test (it builds the control plane)")
		return 0, func() {}
	}
	ctrl.SetLogger(zap.New(zap.UseDevMode(true), zap.Level(zapLevel())))
	_ = clientgoscheme.AddToScheme(testScheme)
	_ = v1alpha1.AddToScheme(testScheme)
	fail := func(format string, args ...any) (int, func()) {
		fmt.Fprintf(os.Stderr, format+"\n", args...)
		return 1, func() {}
	}

	env = &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		WebhookInstallOptions: envtest.WebhookInstallOptions{
			Paths:            []string{filepath.Join("..", "..", "config", "webhook", "manifests.yaml")},
			LocalServingHost: "127.0.0.1",
		},
	}
	var err error
	restConfig, err = env.Start()
	if err != nil {
		return fail("starting envtest: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	cleanup := func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
		}
		_ = env.Stop()
	}
	if k8s, err = client.New(restConfig, client.Options{Scheme: testScheme}); err != nil {
		cleanup()
		return fail("client: %v", err)
	}
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: certNS}}); err != nil {
		cleanup()
		return fail("namespace: %v", err)
	}

	wo := env.WebhookInstallOptions
	servingHP = net.JoinHostPort(wo.LocalServingHost, strconv.Itoa(wo.LocalServingPort))
	webhookURL = "https://" + servingHP
	certDir, err := os.MkdirTemp("", "kubetwin-webhook-certs-")
	if err != nil {
		cleanup()
		return fail("cert dir: %v", err)
	}
	// A fake clock that starts now: the API server checks certificate
	// validity with the real time, so tests only step it within the
	// certificates' hour of backdating.
	certClock = clocktesting.NewFakeClock(time.Now())
	certs, err = ktcerts.NewCertManager(ktcerts.CertOptions{
		Client: k8s, SecretNamespace: certNS, SecretName: certSecret, CertDir: certDir,
		Hosts: []string{"127.0.0.1", "localhost"}, ConfigName: configName, URL: webhookURL,
		CertValidity: 90 * time.Minute, Resync: time.Hour, Clock: certClock,
		Logger: ctrl.Log.WithName("webhook-certs"),
	})
	if err != nil {
		cleanup()
		return fail("cert manager: %v", err)
	}
	if _, err := certs.Sync(ctx); err != nil {
		cleanup()
		return fail("first certificate sync: %v", err)
	}

	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme:                 testScheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		WebhookServer: crwebhook.NewServer(crwebhook.Options{
			Host: wo.LocalServingHost, Port: wo.LocalServingPort, CertDir: certDir,
		}),
	})
	if err != nil {
		cleanup()
		return fail("manager: %v", err)
	}
	webhook.Register(mgr.GetWebhookServer(), testScheme, webhook.Validator{Claims: &deviceid.Claims{
		Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Namespace: claimsNS,
	}, SecretRefs: webhook.SecretRefs{Reader: mgr.GetClient()}})
	if err := mgr.Add(certs); err != nil {
		cleanup()
		return fail("adding the cert manager: %v", err)
	}
	go func() { done <- mgr.Start(ctx) }()

	// Wait until the webhook server answers TLS with the operator's CA.
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := servedCertificate(); err == nil {
			break
		} else if time.Now().After(deadline) {
			cleanup()
			return fail("webhook server did not come up: %v", err)
		}
		select {
		case err := <-done:
			cleanup()
			return fail("manager stopped: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	return 0, func() {
		cleanup()
		_ = os.RemoveAll(certDir)
	}
}

// apiServer fails t when the suite could not start.
func apiServer(t *testing.T) {
	t.Helper()
	if suiteErr != nil {
		t.Fatal(suiteErr)
	}
}

// certSecretData returns the data of the operator's certificate Secret.
func certSecretData(t *testing.T) map[string][]byte {
	t.Helper()
	s := &corev1.Secret{}
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: certNS, Name: certSecret}, s); err != nil {
		t.Fatal(err)
	}
	return s.Data
}

// servedCertificate returns the certificate the webhook server presents,
// verified against the trust bundle in the operator's Secret.
func servedCertificate() (*x509.Certificate, error) {
	s := &corev1.Secret{}
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: certNS, Name: certSecret}, s); err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(s.Data[ktcerts.CABundleKey]) {
		return nil, errors.New("no CA in the Secret")
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", servingHP, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})
	if err != nil {
		return nil, err
	}
	defer func() { _ = conn.Close() }()
	return conn.ConnectionState().PeerCertificates[0], nil
}

func zapLevel() zapcore.Level {
	if os.Getenv("KUBETWIN_TEST_VERBOSE") != "" {
		return -1
	}
	return 2 // errors only
}
