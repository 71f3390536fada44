package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"os"
	"strings"
	"time"

	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/certwatcher"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/certs"
	"github.com/kubetwin/kubetwin/internal/deviceauth"
	"github.com/kubetwin/kubetwin/internal/dynsec"
	"github.com/kubetwin/kubetwin/internal/operator"
	"github.com/kubetwin/kubetwin/internal/ratelog"
)

// Values of --device-auth.
const (
	deviceAuthSAS  = "sas"
	deviceAuthNone = "none"
)

// mqttOptions are the flags of the embedded broker's TLS listener and of
// its administrative credential.
type mqttOptions struct {
	tlsListen            string
	certFile, keyFile    string
	hosts                stringList
	secretName, secretNS string
	caConfigMap          string
	adminPasswordFile    string
	// What clients may cost the embedded broker (embedded_limits.go).
	limits bus.EmbeddedLimits
	// Sessions and logs (embedded_sessions.go, internal/ratelog).
	sessionExpiry   time.Duration
	maxSessionQueue int
	logRateLimit    float64
}

func bindMQTTFlags(m *mqttOptions) {
	flag.StringVar(&m.tlsListen, "mqtt-tls-bind-address", ":8883", "Listen address of the embedded broker's MQTT-over-TLS listener. Empty: none.")
	flag.StringVar(&m.certFile, "mqtt-tls-cert-file", "",
		"PEM certificate (chain) of the TLS listener, e.g. from cert-manager; re-read when it changes. Empty: the operator issues and rotates its own, "+
			"signed by a CA it keeps in --mqtt-tls-secret-name, and publishes the CA for devices in --mqtt-tls-ca-configmap.")
	flag.StringVar(&m.keyFile, "mqtt-tls-key-file", "", "PEM private key of --mqtt-tls-cert-file.")
	flag.Var(&m.hosts, "mqtt-tls-host", "Extra DNS name or IP address for the operator-issued MQTT certificate (repeatable or comma-separated); "+
		"--hub-hostname, localhost and 127.0.0.1 are always in it.")
	flag.StringVar(&m.secretName, "mqtt-tls-secret-name", "kubetwin-mqtt-server-cert", "Secret that holds the operator-issued MQTT CA and certificate.")
	flag.StringVar(&m.secretNS, "mqtt-tls-secret-namespace", "",
		"Namespace of that Secret and of the CA ConfigMap (default: $POD_NAMESPACE, else \"default\").")
	flag.StringVar(&m.caConfigMap, "mqtt-tls-ca-configmap", "kubetwin-mqtt-ca",
		"ConfigMap (key ca.crt) where the operator publishes the CA bundle devices must trust for the operator-issued MQTT certificate.")
	flag.StringVar(&m.adminPasswordFile, "mqtt-admin-password-file", "",
		"File holding the password of the embedded broker's administrative user "+deviceauth.AdminUsername+", which may connect with any client id and use every topic (monitoring, debugging). Empty: no such user.")
	bindMQTTLimitFlags(&m.limits)
	flag.DurationVar(&m.sessionExpiry, "mqtt-session-expiry", bus.DefaultSessionExpiry,
		"How long the embedded broker keeps the persistent session (clean=false, as the Azure IoT SDKs connect) of a disconnected client: its subscriptions and queued messages. "+
			"A device whose twin is deleted or disabled loses its session at once. At least 1s.")
	flag.IntVar(&m.maxSessionQueue, "mqtt-max-session-queue", bus.DefaultMaxSessionQueue,
		"Messages the embedded broker keeps per session that the client has not acknowledged (while it is offline: queued for it); further ones are dropped. "+
			"A device loses no configuration by it: the whole desired document is retained and answers every GET. 1 to 65535.")
	flag.Float64Var(&m.logRateLimit, "log-rate-limit", ratelog.DefaultRate,
		"Log lines per second of each kind that clients can cause (refused connections, dropped messages, the broker's warnings), with a burst of twice that; "+
			"lines over it are counted in kubetwin_log_lines_suppressed_total and reported in one \"log lines suppressed\" line. 0: no limit.")
}

// checkSessionFlags refuses out-of-range session and log limits.
func checkSessionFlags(m mqttOptions) error {
	switch {
	case m.sessionExpiry < time.Second:
		return fmt.Errorf("--mqtt-session-expiry must be at least 1s, not %s", m.sessionExpiry)
	case m.maxSessionQueue < 1 || m.maxSessionQueue > math.MaxUint16:
		return fmt.Errorf("--mqtt-max-session-queue must be between 1 and 65535, not %d", m.maxSessionQueue)
	case m.logRateLimit < 0 || math.IsNaN(m.logRateLimit) || math.IsInf(m.logRateLimit, 0):
		return fmt.Errorf("--log-rate-limit must be a number of lines per second, 0 or more, not %v", m.logRateLimit)
	}
	return nil
}

// bindMQTTLimitFlags binds the flags of the embedded broker's limits.
func bindMQTTLimitFlags(l *bus.EmbeddedLimits) {
	flag.IntVar(&l.MaxPacketSize, "mqtt-max-packet-size", bus.DefaultMaxPacketSize,
		"Largest MQTT packet, in bytes, a client may send the embedded broker (MQTT 5 clients are told in CONNACK). "+
			"A larger one is refused from its fixed header, before it is read: the connection is closed (MQTT 5: DISCONNECT 0x95). 1024 to 268435460.")
	flag.DurationVar(&l.ConnectTimeout, "mqtt-connect-timeout", bus.DefaultMQTTConnectTimeout,
		"How long a connection to the embedded broker may take from accept to a complete CONNECT packet, TLS or WebSocket handshake included; then it is closed.")
	flag.DurationVar(&l.WriteTimeout, "mqtt-write-timeout", bus.DefaultWriteTimeout,
		"How long the embedded broker waits for a client to take each packet it writes; a client that takes none for that long is disconnected (it resumes its session when it reconnects).")
	flag.IntVar(&l.MaxClientQueue, "mqtt-max-client-queue", bus.DefaultMaxClientQueue,
		"Messages that may wait to be written to one client of the embedded broker; one more disconnects the client instead of dropping the message.")
	flag.IntVar(&l.MaxClientQueueBytes, "mqtt-max-client-queue-bytes", bus.DefaultMaxClientQueueBytes,
		"Bytes that may wait to be written to one client of the embedded broker; a packet beyond them disconnects the client (a single larger packet is still sent when nothing else waits).")
	flag.IntVar(&l.MaxConnections, "mqtt-max-connections", bus.DefaultMaxConnections,
		"Open connections the embedded broker accepts on all its listeners (TCP, TLS, WebSockets), authenticated or not; one more is closed at once (WebSockets: HTTP 503).")
	flag.IntVar(&l.MaxConnectionsPerIP, "mqtt-max-connections-per-ip", bus.DefaultMaxConnectionsPerIP,
		"Open connections the embedded broker accepts from one source address, as the pod sees it (behind NAT many devices share one; "+
			"with a Service of externalTrafficPolicy Cluster it is a node's address); one more is closed at once.")
}

// checkLimitFlags refuses out-of-range limits of the embedded broker.
func checkLimitFlags(l bus.EmbeddedLimits) error {
	switch {
	case l.MaxPacketSize < 1024 || l.MaxPacketSize > 268435460:
		return fmt.Errorf("--mqtt-max-packet-size must be between 1024 and 268435460 bytes, not %d", l.MaxPacketSize)
	case l.ConnectTimeout <= 0:
		return fmt.Errorf("--mqtt-connect-timeout must be positive, not %s", l.ConnectTimeout)
	case l.WriteTimeout <= 0:
		return fmt.Errorf("--mqtt-write-timeout must be positive, not %s", l.WriteTimeout)
	case l.MaxClientQueue < 1 || l.MaxClientQueue > 1<<20:
		return fmt.Errorf("--mqtt-max-client-queue must be between 1 and 1048576, not %d", l.MaxClientQueue)
	case l.MaxClientQueueBytes < 4096:
		return fmt.Errorf("--mqtt-max-client-queue-bytes must be at least 4096, not %d", l.MaxClientQueueBytes)
	case l.MaxConnections < 1:
		return fmt.Errorf("--mqtt-max-connections must be at least 1, not %d", l.MaxConnections)
	case l.MaxConnectionsPerIP < 1:
		return fmt.Errorf("--mqtt-max-connections-per-ip must be at least 1, not %d", l.MaxConnectionsPerIP)
	}
	return nil
}

// checkSecurityFlags refuses contradictory device security flags.
func checkSecurityFlags(o options) error {
	switch o.deviceAuth {
	case deviceAuthSAS, deviceAuthNone:
	default:
		return fmt.Errorf("--device-auth must be %s or %s, not %q", deviceAuthSAS, deviceAuthNone, o.deviceAuth)
	}
	embedded := o.brokerURL == ""
	switch {
	case o.deviceAuth == deviceAuthSAS && o.hubHostname == "":
		return errors.New("--hub-hostname must not be empty: it goes into every device's connection string")
	case o.mosquittoDynsec && embedded:
		return errors.New("--mosquitto-dynsec needs --broker-url (an external Mosquitto)")
	case o.mosquittoDynsec && o.deviceAuth != deviceAuthSAS:
		return errors.New("--mosquitto-dynsec needs --device-auth=sas (the devices' keys are their Mosquitto passwords)")
	case embedded && o.mqttListen == "" && o.mqtt.tlsListen == "":
		return errors.New("the embedded broker needs a listener: --mqtt-tls-bind-address, --mqtt-bind-address (plain), or both")
	case (o.mqtt.certFile == "") != (o.mqtt.keyFile == ""):
		return errors.New("--mqtt-tls-cert-file and --mqtt-tls-key-file go together")
	case o.mqtt.adminPasswordFile != "" && (!embedded || o.deviceAuth != deviceAuthSAS):
		return errors.New("--mqtt-admin-password-file is for the embedded broker with --device-auth=sas")
	}
	return checkSessionFlags(o.mqtt)
}

// newAuthenticator returns the embedded broker's device Authenticator, or
// nil without device authentication or with an external broker.
func newAuthenticator(mgr ctrl.Manager, o options) (*deviceauth.Authenticator, error) {
	if o.deviceAuth != deviceAuthSAS || o.brokerURL != "" {
		return nil, nil
	}
	a := &deviceauth.Authenticator{HubHostname: o.hubHostname, Lookup: controllers.DeviceLookup(operator.Resolver(mgr, o.claimsNamespace())),
		MaxTokenLifetime: o.maxTokenLifetime}
	if f := o.mqtt.adminPasswordFile; f != "" {
		pw, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("reading --mqtt-admin-password-file: %w", err)
		}
		if a.AdminPassword = strings.TrimRight(string(pw), "\r\n"); a.AdminPassword == "" {
			return nil, errors.New("--mqtt-admin-password-file is empty")
		}
	}
	return a, nil
}

// setupEmbedded builds the embedded broker: its TLS listener (with a
// certificate from files, or issued by the operator), its plain one, and
// auth (nil: every client may do anything).
func setupEmbedded(ctx context.Context, mgr ctrl.Manager, o options, br *bridge.Bridge, auth *deviceauth.Authenticator) (bus.Bus, error) {
	log := ctrl.Log.WithName("setup")
	if err := checkLimitFlags(o.mqtt.limits); err != nil {
		return nil, err
	}
	eo := bus.EmbeddedOptions{
		Listen:    o.mqttListen,
		TLSListen: o.mqtt.tlsListen,
		Handler:   br.Handle,
		Presence:  br.Presence,
		Logger:    ctrl.Log.WithName("broker"),
		Limits:    o.mqtt.limits,
		Sessions: bus.SessionOptions{
			Expiry:   o.mqtt.sessionExpiry,
			MaxQueue: o.mqtt.maxSessionQueue,
		},
		LogLimiter: ratelog.New(o.mqtt.logRateLimit),
	}
	if eo.TLSListen != "" {
		var err error
		if eo.TLSConfig, err = o.hubTLS.get(ctx, mgr, o); err != nil {
			return nil, err
		}
	}
	if o.mqttListen != "" {
		log.Info("the embedded broker also serves plain MQTT: what devices send, credentials included, crosses the network unencrypted",
			"address", o.mqttListen)
	}
	if auth == nil {
		log.Info("device authentication is off (--device-auth=none): any client may connect as any device and use any topic")
	} else {
		eo.Auth = auth
	}
	e, err := bus.NewEmbedded(eo)
	if err != nil {
		return nil, err
	}
	return e, nil
}

// hubTLS is the TLS configuration of the hub's endpoints: the embedded
// broker's TLS listener and the service API. Both serve one certificate,
// for the hub host name, so that devices and back ends trust one CA.
type hubTLS struct {
	cfg *tls.Config
}

// get returns the hub's TLS configuration, setting it up on first use.
func (h *hubTLS) get(ctx context.Context, mgr ctrl.Manager, o options) (*tls.Config, error) {
	if h.cfg != nil {
		return h.cfg, nil
	}
	cfg, err := setupHubTLS(ctx, mgr, o)
	if err != nil {
		return nil, err
	}
	h.cfg = cfg
	return cfg, nil
}

// setupHubTLS returns the hub's TLS configuration. The certificate comes
// from --mqtt-tls-cert-file (a certwatcher serves it and follows changes),
// or is issued and rotated by a certificate manager, which serves it from
// memory (no writable filesystem needed).
func setupHubTLS(ctx context.Context, mgr ctrl.Manager, o options) (*tls.Config, error) {
	if o.mqtt.certFile == "" {
		co := certs.CertOptions{
			Purpose:         "mqtt",
			SecretName:      o.mqtt.secretName,
			SecretNamespace: mqttSecretNamespace(o.mqtt),
			Hosts:           mqttHosts(o),
			CAConfigMap:     o.mqtt.caConfigMap,
			Logger:          ctrl.Log.WithName("mqtt-certs"),
		}
		var err error
		// A client without a cache: the manager's caches only key Secrets.
		if co.Client, err = client.New(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme()}); err != nil {
			return nil, fmt.Errorf("creating the certificate client: %w", err)
		}
		cm, err := certs.NewCertManager(co)
		if err != nil {
			return nil, err
		}
		if err := syncCertificate(ctx, cm, "the MQTT TLS certificate"); err != nil {
			return nil, err
		}
		if err := mgr.Add(cm); err != nil {
			return nil, err
		}
		ctrl.Log.WithName("setup").Info("serving MQTT over TLS with an operator-issued certificate", "secret", co.SecretNamespace+"/"+co.SecretName,
			"hosts", co.Hosts, "caConfigMap", co.SecretNamespace+"/"+co.CAConfigMap)
		return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: cm.GetCertificate}, nil
	}
	cw, err := certwatcher.New(o.mqtt.certFile, o.mqtt.keyFile)
	if err != nil {
		return nil, fmt.Errorf("loading the MQTT TLS certificate: %w", err)
	}
	if err := mgr.Add(cw); err != nil {
		return nil, err
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: cw.GetCertificate}, nil
}

// mqttSecretNamespace is the namespace of the MQTT certificate Secret and
// CA ConfigMap.
func mqttSecretNamespace(m mqttOptions) string {
	return cmp.Or(m.secretNS, os.Getenv("POD_NAMESPACE"), "default")
}

// mqttHosts are the names in the operator-issued MQTT certificate.
func mqttHosts(o options) []string {
	hub := o.hubHostname
	if h, _, err := net.SplitHostPort(hub); err == nil {
		hub = h
	}
	var out []string
	svc := o.service.serviceHostname(hub)
	if h, _, err := net.SplitHostPort(svc); err == nil {
		svc = h
	}
	for _, h := range append([]string{hub, svc, "localhost", "127.0.0.1"}, o.mqtt.hosts...) {
		if h != "" && !containsFold(out, h) {
			out = append(out, h)
		}
	}
	return out
}

func containsFold(l []string, s string) bool {
	for _, x := range l {
		if strings.EqualFold(x, s) {
			return true
		}
	}
	return false
}

// syncCertificate issues a certificate manager's certificate before the
// manager starts (its server needs it to start), retrying for a while.
func syncCertificate(ctx context.Context, cm *certs.CertManager, what string) error {
	return operator.RetryStartup(ctx, "issuing "+what, func() error {
		_, err := cm.Sync(ctx)
		return err
	})
}

// setupCredentials configures device keys in the reconciler and, where the
// operator manages the broker's view of devices, the Provisioner: the
// embedded broker (which checks connected devices again on a change) or
// Mosquitto's dynamic-security plugin.
func setupCredentials(mgr ctrl.Manager, o options, b bus.Bus, auth *deviceauth.Authenticator) (*controllers.Credentials, error) {
	if o.deviceAuth != deviceAuthSAS {
		return nil, nil
	}
	log := ctrl.Log.WithName("setup")
	c := &controllers.Credentials{HubHostname: o.hubHostname}
	switch {
	case o.brokerURL == "":
		c.Provisioner = deviceauth.EmbeddedProvisioner{Broker: b.(*bus.Embedded), Auth: auth}
	case o.mosquittoDynsec:
		pw, err := brokerPassword(o)
		if err != nil {
			return nil, err
		}
		tlsCfg, err := brokerTLS(o)
		if err != nil {
			return nil, err
		}
		if plainURL(o.brokerURL) {
			log.Info("device keys go to Mosquitto's dynamic-security plugin unencrypted: use an ssl:// --broker-url outside a trusted network",
				"brokerUrl", o.brokerURL)
		}
		ds, err := dynsec.New(dynsec.Options{
			BrokerURL: o.brokerURL, Username: o.brokerUsername, Password: pw, TLSConfig: tlsCfg,
			ClientID: o.brokerClientID + "-dynsec", Logger: ctrl.Log.WithName("dynsec"),
			FingerprintKey: dynsecFingerprintKey(mgr, o.claimsNamespace()), Devices: dynsecDevices(mgr),
		})
		if err != nil {
			return nil, err
		}
		if err := mgr.Add(ds); err != nil {
			return nil, err
		}
		c.Provisioner = deviceauth.OnChange(ds)
	default:
		log.Info("device keys are kept for every twin, but the external broker authenticates devices itself (see --mosquitto-dynsec)")
	}
	return c, nil
}

func plainURL(u string) bool {
	return strings.HasPrefix(u, "tcp://") || strings.HasPrefix(u, "mqtt://") || strings.HasPrefix(u, "ws://")
}
