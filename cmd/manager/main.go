// Command manager runs the kubetwin operator: the DeviceTwin controller and
// its MQTT bridge, with an embedded broker unless --broker-url names an
// external one.
package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	_ "k8s.io/client-go/plugin/pkg/client/auth"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/metrics/filters"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	crwebhook "sigs.k8s.io/controller-runtime/pkg/webhook"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/certs"
	"github.com/kubetwin/kubetwin/internal/deviceauth"
	"github.com/kubetwin/kubetwin/internal/operator"
	"github.com/kubetwin/kubetwin/internal/ratelog"
	"github.com/kubetwin/kubetwin/internal/watchdecode"
	"github.com/kubetwin/kubetwin/internal/webhook"
	"github.com/kubetwin/kubetwin/pkg/sas"
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
	// watchDecoder is --watch-decoder.
	watchDecoder string
	workers      int
	// configApplies and configAppliesPerSecond bound the TwinConfiguration applier.
	configApplies          int
	configAppliesPerSecond float64
	// pending bounds the device messages waiting to be stored.
	pending operator.BridgeOptions
	// claimsNS is --claims-namespace (see claimsNamespace).
	claimsNS string

	brokerURL, brokerUsername, brokerPasswordFile string
	brokerClientID                                string
	brokerCAFile, brokerCertFile, brokerKeyFile   string
	brokerInsecure                                bool
	mqttListen                                    string

	// deviceAuth is "sas" (keys for every twin, SAS tokens on the embedded
	// broker) or "none".
	deviceAuth      string
	hubHostname     string
	mosquittoDynsec bool
	// maxTokenLifetime bounds how far ahead a SAS token's expiry may be
	// (device tokens at the embedded broker, service tokens at the
	// service API); 0: no bound.
	maxTokenLifetime time.Duration
	mqtt             mqttOptions

	webhook webhookOptions
	service serviceAPIOptions

	// hubTLS is shared by the embedded broker and the service API.
	hubTLS *hubTLS
	// memoryLimit is --memory-limit, the Go heap's soft limit.
	memoryLimit memoryLimitFlag
}

// webhookOptions are the flags of the admission webhooks.
type webhookOptions struct {
	disable                  bool
	port                     int
	certDir                  string
	manageCerts              bool
	serviceName, serviceNS   string
	secretName, secretNS     string
	hosts                    stringList
	url                      string
	configName               string
	certValidity, caValidity time.Duration
}

// stringList is a flag that may be repeated or hold comma-separated values.
type stringList []string

func (l *stringList) String() string { return strings.Join(*l, ",") }

func (l *stringList) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

func main() {
	var o options
	flag.StringVar(&o.metricsAddr, "metrics-bind-address", "0", "Address of the metrics endpoint (:8443 for HTTPS, :8080 for HTTP, 0 to disable).")
	flag.BoolVar(&o.secureMetrics, "metrics-secure", true, "Serve metrics over HTTPS with authentication and authorization.")
	flag.StringVar(&o.probeAddr, "health-probe-bind-address", ":8081", "Address of the /healthz and /readyz endpoints.")
	flag.BoolVar(&o.leaderElect, "leader-elect", false, "Elect a leader so that only one replica bridges devices.")
	flag.StringVar(&o.namespace, "namespace", "", "Watch DeviceTwins in this namespace only (default: all namespaces).")
	flag.StringVar(&o.claimsNS, "claims-namespace", "",
		"Namespace of the DeviceIDClaims that make each device id unique to one DeviceTwin (default: $POD_NAMESPACE, else \"default\"). Tenants need no rights there.")
	flag.StringVar(&o.watchDecoder, "watch-decoder", watchdecode.OnePass,
		"Decoder of the DeviceTwin and DeviceIDClaim watches that fill the cache: one-pass (each event read once) or client-go (client-go's own, several passes per event).")
	flag.IntVar(&o.workers, "max-concurrent-reconciles", 32, "Parallel DeviceTwin reconciles (and so status writes in flight).")
	flag.IntVar(&o.configApplies, "max-configuration-applies", controllers.DefaultMaxConfigurationApplies,
		"TwinConfiguration applies to twins in flight at once (the applier's workers, apart from the DeviceTwin reconciler's).")
	flag.Float64Var(&o.configAppliesPerSecond, "configuration-applies-per-second", controllers.DefaultConfigurationAppliesPerSecond,
		"Steady rate of TwinConfiguration applies to twins, all configurations together.")
	flag.IntVar(&o.pending.MaxPendingReports, "max-pending-reports", bridge.DefaultMaxPendingReports,
		"Messages of one device (reports, plus its latest presence and ack) waiting to be stored; a report beyond it is answered 429.")
	flag.IntVar(&o.pending.MaxPendingReportBytes, "max-pending-report-bytes", bridge.DefaultMaxPendingReportBytes,
		"Payload bytes of one device's messages waiting to be stored; a report beyond it is answered 429. At least the largest reported patch (65536).")
	flag.DurationVar(&o.pending.IdleStateTTL, "bridge-idle-state-ttl", bridge.DefaultIdleStateTTL,
		"How long an idle twin's working state stays in memory unused before it is dropped (and reloaded from the cached status on next use); 0 keeps it.")
	flag.StringVar(&o.brokerURL, "broker-url", "", "External MQTT broker, e.g. tcp://mosquitto:1883 or ssl://mosquitto:8883. Empty runs the embedded broker.")
	flag.StringVar(&o.brokerUsername, "broker-username", "", "Username for the external broker.")
	flag.StringVar(&o.brokerPasswordFile, "broker-password-file", "", "File holding the password for the external broker (env KUBETWIN_BROKER_PASSWORD also works).")
	flag.StringVar(&o.brokerClientID, "broker-client-id", "kubetwin-operator", "MQTT client id of the operator; its persistent session holds messages while the operator is down.")
	flag.StringVar(&o.brokerCAFile, "broker-ca-file", "", "PEM CA bundle to verify the external broker (ssl:// URLs).")
	flag.StringVar(&o.brokerCertFile, "broker-cert-file", "", "PEM client certificate for the external broker.")
	flag.StringVar(&o.brokerKeyFile, "broker-key-file", "", "PEM client key for the external broker.")
	flag.BoolVar(&o.brokerInsecure, "broker-insecure-skip-verify", false, "Do not verify the external broker's certificate (testing only).")
	flag.StringVar(&o.mqttListen, "mqtt-bind-address", "",
		"Listen address of the embedded broker's plain (unencrypted) MQTT listener, e.g. :1883. Empty (the default): none; devices use --mqtt-tls-bind-address.")
	flag.StringVar(&o.deviceAuth, "device-auth", deviceAuthSAS,
		"Device authentication: sas (every twin gets keys; the embedded broker accepts a device only with a SAS token signed with them and confines it to its own topics) "+
			"or none (any client may connect as any device and use any topic; development and tests only).")
	flag.StringVar(&o.hubHostname, "hub-hostname", "kubetwin.local",
		"The hub's host name: the HostName of the devices' connection strings (what devices connect to and sign their SAS tokens for) and a name in the embedded broker's TLS certificate.")
	flag.BoolVar(&o.mosquittoDynsec, "mosquitto-dynsec", false,
		"With --broker-url: provision every device (its credential and a role confining it to its topics) in Mosquitto's dynamic-security plugin; the --broker-username must have the plugin's admin role.")
	bindTokenLifetimeFlag(&o.maxTokenLifetime)
	bindMQTTFlags(&o.mqtt)
	bindWebhookFlags(&o.webhook)
	bindServiceAPIFlags(&o.service)
	bindMemoryLimitFlag(flag.CommandLine, &o.memoryLimit)
	zapOpts := zap.Options{Development: false}
	zapOpts.BindFlags(flag.CommandLine)
	flag.Parse()
	// Log fields are encoded when written, not at every reconcile.
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zapOpts), zap.RawZapOpts(operator.LazyFields())))
	setupMemoryLimit(ctrl.Log.WithName("setup"), o.memoryLimit)

	if err := run(ctrl.SetupSignalHandler(), o); err != nil {
		ctrl.Log.Error(err, "manager stopped")
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) error {
	log := ctrl.Log.WithName("setup")
	if err := checkSecurityFlags(o); err != nil {
		return err
	}
	if err := checkServiceAPIFlags(o); err != nil {
		return err
	}
	if err := checkPendingFlags(o.pending); err != nil {
		return err
	}
	if err := checkTokenLifetimeFlag(o.maxTokenLifetime); err != nil {
		return err
	}
	o.hubTLS = &hubTLS{}
	mgr, err := setupManager(o)
	if err != nil {
		return err
	}
	o.pending.ClaimsNamespace = o.claimsNamespace()
	if o.pending.IdleStateTTL == 0 {
		o.pending.IdleStateTTL = bridge.KeepIdleState
	}
	br := operator.NewBridge(mgr, o.pending)
	auth, err := newAuthenticator(mgr, o)
	if err != nil {
		return err
	}
	b, err := setupBus(ctx, mgr, o, br, auth)
	if err != nil {
		return err
	}
	if err := operator.AddBus(mgr, br, b); err != nil {
		return err
	}
	if err := setupBrokerLabel(ctx, mgr, b); err != nil {
		return err
	}
	creds, err := setupCredentials(mgr, o, b, auth)
	if err != nil {
		return err
	}
	if err := operator.AddReconciler(ctx, mgr, br, operator.ReconcilerOptions{
		Workers: o.workers, Credentials: creds, ClaimsNamespace: o.claimsNamespace(),
		ConfigurationApplies: o.configApplies, ConfigurationAppliesPerSecond: o.configAppliesPerSecond,
	}); err != nil {
		return err
	}
	if err := setupProbes(mgr); err != nil {
		return err
	}
	if err := setupWebhook(ctx, mgr, o); err != nil {
		return err
	}
	if err := setupServiceAPI(ctx, mgr, o, b); err != nil {
		return err
	}
	if err := setupQueryAPI(ctx, mgr, o); err != nil {
		return err
	}
	log.Info("starting manager", "embeddedBroker", o.brokerURL == "", "brokerUrl", o.brokerURL, "mqttBindAddress", o.mqttListen,
		"mqttTlsBindAddress", o.mqtt.tlsListen, "deviceAuth", o.deviceAuth, "hubHostname", o.hubHostname, "mosquittoDynsec", o.mosquittoDynsec,
		"serviceApiBindAddress", o.service.listen)
	return mgr.Start(ctx)
}

// checkPendingFlags refuses bounds under which a device could never report.
func checkPendingFlags(p operator.BridgeOptions) error {
	if p.MaxPendingReports < 1 {
		return fmt.Errorf("--max-pending-reports must be at least 1, not %d", p.MaxPendingReports)
	}
	if p.MaxPendingReportBytes < bridge.MaxReportedPatchBytes {
		return fmt.Errorf("--max-pending-report-bytes must be at least %d (the largest reported patch), not %d",
			bridge.MaxReportedPatchBytes, p.MaxPendingReportBytes)
	}
	if p.IdleStateTTL < 0 {
		return fmt.Errorf("--bridge-idle-state-ttl must be 0 (keep idle state) or positive, not %s", p.IdleStateTTL)
	}
	return nil
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
	cfg := ctrl.GetConfigOrDie()
	var err error
	if mo.Cache, err = operator.CacheOptions(cfg, o.namespace, o.claimsNamespace(), o.watchDecoder); err != nil {
		return nil, fmt.Errorf("--watch-decoder: %w", err)
	}
	mo.MapperProvider = operator.NewRESTMapper
	if webhookServed(o.webhook) {
		// HTTP/2 is off for the webhook server too.
		mo.WebhookServer = crwebhook.NewServer(crwebhook.Options{
			Port:    o.webhook.port,
			CertDir: o.webhook.certDir,
			TLSOpts: []func(*tls.Config){disableHTTP2},
		})
	}
	mgr, err := ctrl.NewManager(cfg, mo)
	if err != nil {
		return nil, fmt.Errorf("creating manager: %w", err)
	}
	return mgr, nil
}

func setupBus(ctx context.Context, mgr ctrl.Manager, o options, br *bridge.Bridge, auth *deviceauth.Authenticator) (bus.Bus, error) {
	if o.brokerURL == "" {
		return setupEmbedded(ctx, mgr, o, br, auth)
	}
	po := bus.PahoOptions{
		BrokerURL: o.brokerURL,
		ClientID:  o.brokerClientID,
		Username:  o.brokerUsername,
		Handler:   br.Handle,
		Logger:    ctrl.Log.WithName("mqtt"),
		// Devices can leave retained requests on an external broker.
		LogLimiter: ratelog.New(o.mqtt.logRateLimit),
	}
	var err error
	if po.Password, err = brokerPassword(o); err != nil {
		return nil, err
	}
	tlsCfg, err := brokerTLS(o)
	if err != nil {
		return nil, err
	}
	po.TLSConfig = tlsCfg
	if po.Password != "" && plainURL(o.brokerURL) {
		ctrl.Log.WithName("setup").Info("the broker password goes to the broker unencrypted: use an ssl:// --broker-url outside a trusted network",
			"brokerUrl", o.brokerURL)
	}
	return bus.NewPaho(po)
}

// brokerPassword is the external broker's password: the file's, else the
// environment's.
func brokerPassword(o options) (string, error) {
	if o.brokerPasswordFile == "" {
		return os.Getenv("KUBETWIN_BROKER_PASSWORD"), nil
	}
	pw, err := os.ReadFile(o.brokerPasswordFile)
	if err != nil {
		return "", fmt.Errorf("reading --broker-password-file: %w", err)
	}
	return strings.TrimRight(string(pw), "\r\n"), nil
}

// brokerTLS builds the TLS configuration for an external broker. Without
// any of the flags, an ssl:// broker is verified against the system's CAs
// (paho's default).
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
	// Readiness does not follow leadership: every replica serves the
	// admission webhook (failurePolicy Fail), which must stay available
	// while leadership moves. Devices reach the embedded broker through the
	// label its leader sets (setupBrokerLabel), and an external broker's
	// outage must not take the operator out of its Services.
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		return fmt.Errorf("adding ready check: %w", err)
	}
	return nil
}

func bindWebhookFlags(w *webhookOptions) {
	flag.BoolVar(&w.disable, "disable-webhook", false, "Do not serve the DeviceTwin admission webhooks.")
	flag.IntVar(&w.port, "webhook-port", crwebhook.DefaultPort, "Port of the admission webhook server.")
	flag.StringVar(&w.certDir, "webhook-cert-dir", filepath.Join(os.TempDir(), "k8s-webhook-server", "serving-certs"),
		"Folder of the webhook serving certificate (tls.crt, tls.key); the operator writes it there unless --webhook-manage-certs=false.")
	flag.BoolVar(&w.manageCerts, "webhook-manage-certs", true,
		"Create and rotate the webhook's CA and serving certificate (kept in the --webhook-secret-* Secret) and keep the caBundle of the webhook configurations current. "+
			"Set false when another tool (cert-manager) provides tls.crt and tls.key in --webhook-cert-dir and injects the caBundle.")
	flag.StringVar(&w.serviceName, "webhook-service-name", "kubetwin-webhook-service", "Service in front of the webhook server (its DNS names go into the serving certificate).")
	flag.StringVar(&w.serviceNS, "webhook-service-namespace", "", "Namespace of that Service (default: $POD_NAMESPACE).")
	flag.StringVar(&w.secretName, "webhook-secret-name", "kubetwin-webhook-server-cert", "Secret that holds the webhook CA and serving certificate.")
	flag.StringVar(&w.secretNS, "webhook-secret-namespace", "", "Namespace of that Secret (default: the Service's namespace; with --webhook-url and no namespace, \"default\").")
	flag.Var(&w.hosts, "webhook-host", "Extra DNS name or IP address for the serving certificate (repeatable or comma-separated), e.g. 127.0.0.1.")
	flag.StringVar(&w.url, "webhook-url", "",
		"Base URL (https://host:port) the API server should call instead of the Service, for an operator outside the cluster; the webhook configurations are pointed at it and its host goes into the certificate.")
	flag.StringVar(&w.configName, "webhook-config-name", "kubetwin-admission", "Name of the ValidatingWebhookConfiguration and MutatingWebhookConfiguration to keep the caBundle of.")
	flag.DurationVar(&w.certValidity, "webhook-cert-validity", certs.DefaultCertValidity, "Lifetime of the serving certificate; it is replaced at 2/3 of it.")
	flag.DurationVar(&w.caValidity, "webhook-ca-validity", certs.DefaultCAValidity, "Lifetime of the webhook CA; it is replaced at 2/3 of it.")
}

// bindTokenLifetimeFlag binds --max-sas-token-lifetime.
func bindTokenLifetimeFlag(d *time.Duration) {
	flag.DurationVar(d, "max-sas-token-lifetime", sas.DefaultMaxLifetime,
		"Refuse a SAS token (a device's at the embedded broker, a service's at the service API) that expires further ahead than this; 0: no bound.")
}

func checkTokenLifetimeFlag(d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("--max-sas-token-lifetime must be 0 (no bound) or more, not %s", d)
	}
	return nil
}

// claimsNamespace is where the device id claims are: --claims-namespace,
// else the pod's namespace, else "default".
func (o options) claimsNamespace() string {
	return cmp.Or(o.claimsNS, os.Getenv("POD_NAMESPACE"), operator.DefaultClaimsNamespace)
}

// serviceNamespace is the webhook Service's namespace: the flag, else the
// pod's namespace from the downward API.
func (w webhookOptions) serviceNamespace() string {
	if w.serviceNS != "" {
		return w.serviceNS
	}
	return os.Getenv("POD_NAMESPACE")
}

// webhookServed reports whether the webhooks are served: unless disabled,
// when the API server has a way to reach them, a Service (whose namespace
// is known) or a URL. An operator run from a laptop without --webhook-url
// therefore serves none, as the API server could not call it.
func webhookServed(w webhookOptions) bool {
	return !w.disable && (w.url != "" || w.serviceNamespace() != "")
}

// setupWebhook registers the DeviceTwin webhooks and, unless certificates
// come from elsewhere, issues the serving certificate before the manager
// starts (the webhook server needs it to start) and adds the certificate
// manager that rotates it.
func setupWebhook(ctx context.Context, mgr ctrl.Manager, o options) error {
	w := o.webhook
	log := ctrl.Log.WithName("setup")
	if !webhookServed(w) {
		reason := "--disable-webhook"
		if !w.disable {
			reason = "neither a Service namespace (--webhook-service-namespace, $POD_NAMESPACE) nor --webhook-url is known"
		}
		log.Info("admission webhooks not served", "reason", reason)
		return nil
	}
	srv := mgr.GetWebhookServer()
	webhook.Register(srv, mgr.GetScheme(), webhook.Validator{
		Claims: operator.Claims(mgr, o.claimsNamespace()), Namespace: o.namespace,
		SecretRefs: webhook.SecretRefs{Reader: mgr.GetClient()},
	})
	if err := mgr.AddReadyzCheck("webhook", srv.StartedChecker()); err != nil {
		return fmt.Errorf("adding webhook ready check: %w", err)
	}
	if !w.manageCerts {
		log.Info("serving admission webhooks with certificates from elsewhere", "certDir", w.certDir, "port", w.port)
		return nil
	}
	co, err := certOptions(w)
	if err != nil {
		return err
	}
	// A client without a cache: the manager's would watch every Secret.
	co.Client, err = client.New(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme()})
	if err != nil {
		return fmt.Errorf("creating the certificate client: %w", err)
	}
	cm, err := certs.NewCertManager(co)
	if err != nil {
		return err
	}
	if err := syncCertificate(ctx, cm, "the webhook serving certificate"); err != nil {
		return err
	}
	log.Info("serving admission webhooks", "port", w.port, "certDir", w.certDir, "secret", co.SecretNamespace+"/"+co.SecretName,
		"hosts", co.Hosts, "webhookConfiguration", co.ConfigName, "url", co.URL)
	return mgr.Add(cm)
}

// certOptions derives the certificate manager's options from the flags.
func certOptions(w webhookOptions) (certs.CertOptions, error) {
	co := certs.CertOptions{
		SecretName:   w.secretName,
		CertDir:      w.certDir,
		ConfigName:   w.configName,
		URL:          w.url,
		CertValidity: w.certValidity,
		CAValidity:   w.caValidity,
		Logger:       ctrl.Log.WithName("webhook-certs"),
	}
	ns := w.serviceNamespace()
	if ns != "" {
		s := w.serviceName
		co.Hosts = append(co.Hosts, s+"."+ns+".svc", s+"."+ns+".svc.cluster.local", s+"."+ns, s)
	}
	if w.url != "" {
		u, err := url.Parse(w.url)
		if err != nil || u.Hostname() == "" {
			return co, fmt.Errorf("--webhook-url %q is not a URL with a host", w.url)
		}
		co.Hosts = append(co.Hosts, u.Hostname())
	}
	co.Hosts = append(co.Hosts, w.hosts...)
	co.SecretNamespace = w.secretNS
	switch {
	case co.SecretNamespace != "":
	case ns != "":
		co.SecretNamespace = ns
	default:
		co.SecretNamespace = "default"
	}
	return co, nil
}
