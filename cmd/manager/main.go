// Command manager runs the kubetwin operator: the DeviceTwin controller and
// its MQTT bridge, with an embedded broker unless --broker-url names an
// external one.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	_ "k8s.io/client-go/plugin/pkg/client/auth"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/metrics/filters"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/bus"
)

var scheme = runtime.NewScheme()

func init() {
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(v1alpha1.AddToScheme(scheme))
}

// options are the command-line flags.
type options struct {
	metricsAddr, probeAddr string
	secureMetrics          bool
	leaderElect            bool
	namespace              string
	workers                int

	brokerURL, brokerUsername, brokerPasswordFile string
	brokerClientID                                string
	brokerCAFile, brokerCertFile, brokerKeyFile   string
	brokerInsecure                                bool
	mqttListen                                    string
}

func main() {
	var o options
	flag.StringVar(&o.metricsAddr, "metrics-bind-address", "0", "Address of the metrics endpoint (:8443 for HTTPS, :8080 for HTTP, 0 to disable).")
	flag.BoolVar(&o.secureMetrics, "metrics-secure", true, "Serve metrics over HTTPS with authentication and authorization.")
	flag.StringVar(&o.probeAddr, "health-probe-bind-address", ":8081", "Address of the /healthz and /readyz endpoints.")
	flag.BoolVar(&o.leaderElect, "leader-elect", false, "Elect a leader so that only one replica bridges devices.")
	flag.StringVar(&o.namespace, "namespace", "", "Watch DeviceTwins in this namespace only (default: all namespaces).")
	flag.IntVar(&o.workers, "max-concurrent-reconciles", 32, "Parallel DeviceTwin reconciles (and so status writes in flight).")
	flag.StringVar(&o.brokerURL, "broker-url", "", "External MQTT broker, e.g. tcp://mosquitto:1883 or ssl://mosquitto:8883. Empty runs the embedded broker.")
	flag.StringVar(&o.brokerUsername, "broker-username", "", "Username for the external broker.")
	flag.StringVar(&o.brokerPasswordFile, "broker-password-file", "", "File holding the password for the external broker (env KUBETWIN_BROKER_PASSWORD also works).")
	flag.StringVar(&o.brokerClientID, "broker-client-id", "kubetwin-operator", "MQTT client id of the operator; its persistent session holds messages while the operator is down.")
	flag.StringVar(&o.brokerCAFile, "broker-ca-file", "", "PEM CA bundle to verify the external broker (ssl:// URLs).")
	flag.StringVar(&o.brokerCertFile, "broker-cert-file", "", "PEM client certificate for the external broker.")
	flag.StringVar(&o.brokerKeyFile, "broker-key-file", "", "PEM client key for the external broker.")
	flag.BoolVar(&o.brokerInsecure, "broker-insecure-skip-verify", false, "Do not verify the external broker's certificate (testing only).")
	flag.StringVar(&o.mqttListen, "mqtt-bind-address", ":1883", "Listen address of the embedded MQTT broker.")
	zapOpts := zap.Options{Development: false}
	zapOpts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zapOpts)))

	if err := run(ctrl.SetupSignalHandler(), o); err != nil {
		ctrl.Log.Error(err, "manager stopped")
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) error {
	log := ctrl.Log.WithName("setup")
	mgr, err := setupManager(o)
	if err != nil {
		return err
	}
	br := bridge.New(bridge.Options{
		Logger: ctrl.Log.WithName("bridge"),
		Resolve: func(ctx context.Context, id string) (*v1alpha1.DeviceTwin, error) {
			return controllers.ResolveDeviceID(ctx, mgr.GetClient(), id)
		},
	})
	b, err := setupBus(o, br)
	if err != nil {
		return err
	}
	br.SetBus(b)
	if err := mgr.Add(b.(manager.Runnable)); err != nil {
		return err
	}
	r := &controllers.DeviceTwinReconciler{
		Client:                  mgr.GetClient(),
		Bridge:                  br,
		Recorder:                mgr.GetEventRecorder("kubetwin"),
		MaxConcurrentReconciles: o.workers,
	}
	if err := r.SetupWithManager(ctx, mgr); err != nil {
		return fmt.Errorf("setting up the DeviceTwin controller: %w", err)
	}
	if err := setupProbes(mgr); err != nil {
		return err
	}
	log.Info("starting manager", "embeddedBroker", o.brokerURL == "", "brokerUrl", o.brokerURL, "mqttBindAddress", o.mqttListen)
	return mgr.Start(ctx)
}

func setupManager(o options) (ctrl.Manager, error) {
	// HTTP/2 is off for the metrics server (CVE-2023-44487, CVE-2023-39325).
	disableHTTP2 := func(c *tls.Config) { c.NextProtos = []string{"http/1.1"} }
	metricsOpts := metricsserver.Options{
		BindAddress:   o.metricsAddr,
		SecureServing: o.secureMetrics,
		TLSOpts:       []func(*tls.Config){disableHTTP2},
	}
	if o.secureMetrics {
		metricsOpts.FilterProvider = filters.WithAuthenticationAndAuthorization
	}
	mo := ctrl.Options{
		Scheme:                        scheme,
		Metrics:                       metricsOpts,
		HealthProbeBindAddress:        o.probeAddr,
		LeaderElection:                o.leaderElect,
		LeaderElectionID:              "kubetwin.kubetwin.io",
		LeaderElectionReleaseOnCancel: true,
	}
	if o.namespace != "" {
		mo.Cache = cache.Options{DefaultNamespaces: map[string]cache.Config{o.namespace: {}}}
	}
	mgr, err := ctrl.NewManager(ctrl.GetConfigOrDie(), mo)
	if err != nil {
		return nil, fmt.Errorf("creating manager: %w", err)
	}
	return mgr, nil
}

func setupBus(o options, br *bridge.Bridge) (bus.Bus, error) {
	if o.brokerURL == "" {
		return bus.NewEmbedded(bus.EmbeddedOptions{
			Listen:   o.mqttListen,
			Handler:  br.Handle,
			Presence: br.Presence,
			Logger:   ctrl.Log.WithName("broker"),
		})
	}
	po := bus.PahoOptions{
		BrokerURL: o.brokerURL,
		ClientID:  o.brokerClientID,
		Username:  o.brokerUsername,
		Password:  os.Getenv("KUBETWIN_BROKER_PASSWORD"),
		Handler:   br.Handle,
		Logger:    ctrl.Log.WithName("mqtt"),
	}
	if o.brokerPasswordFile != "" {
		pw, err := os.ReadFile(o.brokerPasswordFile)
		if err != nil {
			return nil, fmt.Errorf("reading --broker-password-file: %w", err)
		}
		po.Password = strings.TrimRight(string(pw), "\r\n")
	}
	tlsCfg, err := brokerTLS(o)
	if err != nil {
		return nil, err
	}
	po.TLSConfig = tlsCfg
	return bus.NewPaho(po)
}

// brokerTLS builds the TLS configuration for an external broker.
func brokerTLS(o options) (*tls.Config, error) {
	if o.brokerCAFile == "" && o.brokerCertFile == "" && !o.brokerInsecure {
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: o.brokerInsecure} //nolint:gosec // opt-in flag
	if o.brokerCAFile != "" {
		pem, err := os.ReadFile(o.brokerCAFile)
		if err != nil {
			return nil, fmt.Errorf("reading --broker-ca-file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--broker-ca-file %s holds no PEM certificate", o.brokerCAFile)
		}
		c.RootCAs = pool
	}
	if (o.brokerCertFile == "") != (o.brokerKeyFile == "") {
		return nil, errors.New("--broker-cert-file and --broker-key-file go together")
	}
	if o.brokerCertFile != "" {
		cert, err := tls.LoadX509KeyPair(o.brokerCertFile, o.brokerKeyFile)
		if err != nil {
			return nil, fmt.Errorf("loading broker client certificate: %w", err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

func setupProbes(mgr ctrl.Manager) error {
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return fmt.Errorf("adding health check: %w", err)
	}
	// Readiness follows the cache, not the broker: a broker outage must not
	// take the operator out of its Service (devices would lose the embedded
	// broker too).
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		return fmt.Errorf("adding ready check: %w", err)
	}
	return nil
}
