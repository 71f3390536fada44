// Package certs issues and rotates the operator's own TLS certificates
// without cert-manager: a CA and a serving certificate kept in a Secret,
// for the admission webhook, for the hub (embedded broker and service
// API) and for the query API (its APIService's caBundle). See [CertManager].
package certs

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/manager"
)

// The cert manager reads and writes one Secret in its own namespace (create
// cannot be limited by name) and the two webhook configurations, by name.
// The names are those config/default deploys; with other names, grant the
// same verbs on them.
//
// +kubebuilder:rbac:groups="",namespace=system,resources=secrets,verbs=create
// +kubebuilder:rbac:groups="",namespace=system,resources=secrets,resourceNames=kubetwin-webhook-server-cert,verbs=get;update
// +kubebuilder:rbac:groups=admissionregistration.k8s.io,resources=validatingwebhookconfigurations;mutatingwebhookconfigurations,resourceNames=kubetwin-admission,verbs=get;update
//
// The embedded MQTT broker's certificate manager (Purpose "mqtt") keeps its
// Secret (kubetwin-mqtt-server-cert; the operator's Secret rights cover
// it, see controllers) and publishes the CA bundle devices trust in a
// ConfigMap, by name:
//
// +kubebuilder:rbac:groups="",namespace=system,resources=configmaps,verbs=create
// +kubebuilder:rbac:groups="",namespace=system,resources=configmaps,resourceNames=kubetwin-mqtt-ca,verbs=get;update
//
// The query API's certificate manager (Purpose "query-api") patches the
// caBundle of its APIService, by name. config/ does not deploy the query
// API, so these rights are the chart's (templates/queryapi.yaml), not a
// marker here.

// Keys of the certificate Secret (type kubernetes.io/tls). CABundleKey
// holds every CA certificate that is still trusted (the current one first,
// then older ones until they expire): it is what goes into caBundle.
const (
	CertKey     = corev1.TLSCertKey       // tls.crt: the serving certificate
	KeyKey      = corev1.TLSPrivateKeyKey // tls.key: its private key
	CABundleKey = "ca.crt"                // the trusted CA certificates
	CAKeyKey    = "ca.key"                // the current CA's private key
)

// Defaults of [CertOptions].
const (
	DefaultCAValidity   = 5 * 365 * 24 * time.Hour
	DefaultCertValidity = 90 * 24 * time.Hour
	DefaultResync       = time.Minute
	// missingRetry is how soon to look again for a webhook configuration
	// that does not exist yet (it is usually being installed).
	missingRetry = 10 * time.Second
	// backdate is how far before issuance certificates become valid, so
	// that API servers whose clock is a little behind accept them.
	backdate = time.Hour
	// namesGrace is how long a CA that permits more names than this
	// replica's hosts is kept: in a rolling update that removes names, the
	// replicas still running with the old names need them for a while.
	namesGrace = 10 * time.Minute
	// maxRetiredCAs bounds the replaced CAs kept in the trust bundle.
	maxRetiredCAs = 2
)

// CertOptions configure a [CertManager].
type CertOptions struct {
	// Purpose names what the certificate serves, in the CA's common name,
	// the Secret's component label and the logs: "webhook" (the default),
	// "mqtt" or "query-api".
	Purpose string
	// CAConfigMap, when set, names a ConfigMap in SecretNamespace that the
	// manager keeps holding the trust bundle under ca.crt, for clients that
	// must trust the CA (devices of the MQTT broker) but may not read the
	// Secret, which holds the CA's key.
	CAConfigMap string
	// Client reads and writes the Secret and the webhook configurations.
	// Give it a client without a cache: the manager's cached client would
	// list and watch every Secret in the cluster.
	Client client.Client
	// SecretNamespace and SecretName name the Secret that holds the CA and
	// the serving certificate.
	SecretNamespace, SecretName string
	// CertDir is the folder the webhook server reads tls.crt and tls.key
	// from; ca.crt is written next to them. Empty: no files are written;
	// serve GetCertificate instead (no writable filesystem needed).
	CertDir string
	// Hosts are the serving certificate's subject alternative names: DNS
	// names (e.g. the Service's) and IP addresses. The CA carries critical
	// X.509 name constraints that permit exactly these names (a DNS name
	// permits its subdomains too, as RFC 5280 has it) and these addresses,
	// so a client that trusts it trusts it for nothing else.
	Hosts []string
	// ConfigName names the ValidatingWebhookConfiguration and the
	// MutatingWebhookConfiguration whose webhooks get the caBundle. Either
	// may be missing. Empty means none.
	ConfigName string
	// APIServiceName names an APIService (apiregistration.k8s.io/v1, the
	// query API's) whose spec.caBundle is kept holding the trust bundle;
	// its insecureSkipTLSVerify is cleared, as kube-apiserver refuses it
	// next to a caBundle. It may be missing. Empty means none.
	APIServiceName string
	// URL, when set, is the base URL (https://host:port) the API server
	// should call instead of a Service: every webhook of the configurations
	// is pointed at URL followed by its path. For an operator that runs
	// outside the cluster, as in the demo.
	URL string
	// CAValidity (default 5 years) and CertValidity (default 90 days) are
	// the lifetimes of the CA and of the serving certificate. Each is
	// replaced once 2/3 of its lifetime has passed.
	CAValidity, CertValidity time.Duration
	// Resync is how often the Secret and the configurations are read when
	// nothing is due (default 1 minute): how soon a replica serves what
	// another replica rotated, and a caBundle someone removed comes back.
	Resync time.Duration
	// Clock is the time source (default the real clock).
	Clock clock.Clock
	// Logger receives the manager's logs.
	Logger logr.Logger
}

// CertManager keeps the webhook's serving certificate, so that no
// cert-manager is needed:
//
//   - It keeps a CA and a serving certificate (ECDSA P-256) signed by it in
//     a Secret, creating them when the Secret is missing or unusable.
//   - It replaces the serving certificate at 2/3 of its lifetime, or at once
//     when it does not cover the Hosts or is not signed by the current CA.
//     It replaces the CA at 2/3 of its lifetime too, and keeps the old CA in
//     the trust bundle (ca.crt) until the old CA expires, so certificates
//     it signed stay trusted while replicas pick up the new ones.
//   - The CA's name constraints permit the Hosts and nothing else. When the
//     Hosts change the CA is replaced: at once when a host is not
//     permitted, after namesGrace when the CA permits names no longer
//     served (replicas of a rolling update may still serve them); a CA that
//     permits names no longer served leaves the trust bundle.
//   - The trust bundle holds only CAs it issued (its own form, with name
//     constraints within the current CA's): a certificate someone else put
//     into the Secret's ca.crt is dropped, never published.
//   - It serves the current certificate from memory (GetCertificate), and
//     writes tls.crt, tls.key and ca.crt to CertDir (if set), where
//     controller-runtime's webhook server watches them (fsnotify, and a
//     re-read every 10 seconds) and serves the new certificate without a
//     restart.
//   - It sets the caBundle (and, with URL, the url) of every webhook in the
//     configurations named ConfigName, and the caBundle of the APIService
//     named APIServiceName.
//
// Every replica runs one (it does not need leader election: every replica
// serves webhooks, and each needs the certificate before it can). Replicas
// share the Secret through optimistic concurrency: a replica writes only
// when the Secret needs a change, with the resourceVersion it read, and one
// that loses the race reads the winner's certificates and uses them. So
// the Secret is written once per rotation whatever the number of replicas,
// and no replica waits for a leader to serve.
type CertManager struct {
	opts  CertOptions
	clock clock.Clock
	log   logr.Logger

	mu      sync.Mutex // one Sync at a time
	missing map[string]bool
	current atomic.Pointer[tls.Certificate] // the serving certificate of the last Sync
}

var _ manager.LeaderElectionRunnable = (*CertManager)(nil)

// NewCertManager returns a CertManager; add it to the manager with
// mgr.Add, after one successful [CertManager.Sync] so the webhook server
// finds its certificate when it starts.
func NewCertManager(o CertOptions) (*CertManager, error) {
	if o.Purpose == "" {
		o.Purpose = "webhook"
	}
	if o.Client == nil || o.SecretName == "" || o.SecretNamespace == "" {
		return nil, fmt.Errorf("%s certificates: Client, SecretNamespace and SecretName are required", o.Purpose)
	}
	if len(o.Hosts) == 0 {
		return nil, fmt.Errorf("%s certificates: at least one host is required", o.Purpose)
	}
	for _, h := range o.Hosts {
		if !validHost(h) {
			return nil, fmt.Errorf("%s certificates: host %q is neither an IP address nor a DNS name", o.Purpose, h)
		}
	}
	if o.URL != "" {
		u, err := url.Parse(o.URL)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return nil, fmt.Errorf("webhook certificates: URL %q is not an https://host[:port] URL", o.URL)
		}
	}
	if o.CAValidity <= 0 {
		o.CAValidity = DefaultCAValidity
	}
	if o.CertValidity <= 0 {
		o.CertValidity = DefaultCertValidity
	}
	if o.Resync <= 0 {
		o.Resync = DefaultResync
	}
	c := o.Clock
	if c == nil {
		c = clock.RealClock{}
	}
	return &CertManager{opts: o, clock: c, log: o.Logger, missing: map[string]bool{}}, nil
}

// NeedLeaderElection is false: every replica serves webhooks.
func (m *CertManager) NeedLeaderElection() bool { return false }

// Start syncs whenever something is due and at least every Resync,
// retrying failures with backoff, until ctx ends.
func (m *CertManager) Start(ctx context.Context) error {
	backoff := time.Second
	for {
		next, err := m.Sync(ctx)
		wait := next.Sub(m.clock.Now())
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			m.log.Error(err, "syncing certificates", "purpose", m.opts.Purpose, "retryIn", backoff)
			wait, backoff = backoff, min(2*backoff, m.opts.Resync)
		} else {
			backoff = time.Second
		}
		select {
		case <-ctx.Done():
			return nil
		case <-m.clock.After(max(wait, 0)):
		}
	}
}

// Sync makes the Secret, the files in CertDir and the webhook
// configurations current, and returns when it should run next.
func (m *CertManager) Sync(ctx context.Context) (time.Time, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.syncSecret(ctx)
	if err != nil {
		return time.Time{}, fmt.Errorf("%s certificate Secret %s/%s: %w", m.opts.Purpose, m.opts.SecretNamespace, m.opts.SecretName, err)
	}
	m.setCurrent(st)
	if err := m.writeFiles(st); err != nil {
		return time.Time{}, fmt.Errorf("writing %s certificates to %s: %w", m.opts.Purpose, m.opts.CertDir, err)
	}
	if err := m.publishCA(ctx, st.bundlePEM()); err != nil {
		return time.Time{}, fmt.Errorf("publishing the %s CA bundle in ConfigMap %s/%s: %w", m.opts.Purpose, m.opts.SecretNamespace, m.opts.CAConfigMap, err)
	}
	missing, err := m.inject(ctx, st.bundlePEM())
	if err != nil {
		return time.Time{}, err
	}
	missingAS, err := m.injectAPIService(ctx, st.bundlePEM())
	if err != nil {
		return time.Time{}, err
	}
	missing = missing || missingAS
	now := m.clock.Now()
	next := st.due(now.Add(m.opts.Resync))
	if !subset(permitted(st.cas[0]), constraintSet(m.opts.Hosts)) {
		// The CA permits names no longer served: replace it when the grace ends.
		if end := issuedAt(st.cas[0]).Add(namesGrace); end.After(now) && end.Before(next) {
			next = end
		}
	}
	if missing && next.After(now.Add(missingRetry)) {
		next = now.Add(missingRetry)
	}
	return next, nil
}

// syncSecret reads the Secret, renews what is due and writes it back; a
// write that loses to another replica's is retried against the winner's.
func (m *CertManager) syncSecret(ctx context.Context) (*certState, error) {
	key := client.ObjectKey{Namespace: m.opts.SecretNamespace, Name: m.opts.SecretName}
	for attempt := 1; ; attempt++ {
		sec := &corev1.Secret{}
		err := m.opts.Client.Get(ctx, key, sec)
		exists := err == nil
		if err != nil && !apierrors.IsNotFound(err) {
			return nil, err
		}
		cur := parseState(sec.Data)
		next, reasons, err := m.plan(cur, m.clock.Now())
		if err != nil {
			return nil, err
		}
		if len(reasons) == 0 {
			return next, nil
		}
		sec.Data = next.data()
		if exists {
			err = m.opts.Client.Update(ctx, sec)
		} else {
			sec.Namespace, sec.Name, sec.Type = key.Namespace, key.Name, corev1.SecretTypeTLS
			sec.Labels = map[string]string{"app.kubernetes.io/name": "kubetwin", "app.kubernetes.io/component": m.opts.Purpose + "-certificates"}
			err = m.opts.Client.Create(ctx, sec)
		}
		if err == nil {
			m.log.Info("issued certificates", "purpose", m.opts.Purpose, "reasons", strings.Join(reasons, "; "),
				"caExpires", next.cas[0].NotAfter, "certExpires", next.leaf.NotAfter, "trustedCAs", len(next.cas))
			return next, nil
		}
		if (apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err)) && attempt < 5 {
			continue // another replica was first: use what it wrote
		}
		return nil, err
	}
}

// certState is what the Secret holds, parsed. cas[0] is the current CA and
// caKey its key; leaf and leafKey are the serving certificate. A part that
// is missing or unusable is nil.
type certState struct {
	cas     []*x509.Certificate
	caKey   crypto.Signer
	leaf    *x509.Certificate
	leafKey crypto.Signer
}

// parseState reads a Secret's data, leaving out what does not parse or
// does not fit together.
func parseState(data map[string][]byte) *certState {
	st := &certState{caKey: parseKey(data[CAKeyKey])}
	for _, c := range parseCerts(data[CABundleKey]) {
		if c.IsCA {
			st.cas = append(st.cas, c)
		}
	}
	// The current CA is the one whose key we have; it goes first.
	i := -1
	if st.caKey != nil {
		i = slices.IndexFunc(st.cas, func(c *x509.Certificate) bool { return samePublicKey(c.PublicKey, st.caKey) })
	}
	if i < 0 {
		st.caKey = nil
	} else {
		cur := st.cas[i]
		st.cas = slices.Insert(slices.Delete(st.cas, i, i+1), 0, cur)
	}
	if certs := parseCerts(data[CertKey]); len(certs) > 0 {
		st.leaf = certs[0]
	}
	st.leafKey = parseKey(data[KeyKey])
	if st.leaf == nil || st.leafKey == nil || !samePublicKey(st.leaf.PublicKey, st.leafKey) {
		st.leaf, st.leafKey = nil, nil
	}
	return st
}

// plan returns the state the Secret should hold at now, and why it differs
// from cur (no reasons: cur is fine).
func (m *CertManager) plan(cur *certState, now time.Time) (*certState, []string, error) {
	next := &certState{}
	var reasons []string
	want := constraintSet(m.opts.Hosts)
	caNames := m.opts.Hosts
	caOK := cur.caKey != nil
	switch {
	case !caOK:
		reasons = append(reasons, "no usable CA")
	case !m.issuedByUs(cur.cas[0]):
		caOK = false
		reasons = append(reasons, "CA without the operator's name constraints")
	case !now.Before(renewAt(cur.cas[0])):
		caOK = false
		reasons = append(reasons, "CA due for renewal")
	case !subset(want, permitted(cur.cas[0])):
		caOK = false
		reasons = append(reasons, "CA name constraints do not permit "+strings.Join(m.opts.Hosts, ","))
		if now.Before(issuedAt(cur.cas[0]).Add(namesGrace)) {
			// Just issued, maybe by a replica with other hosts (a rolling
			// update): permit both, so neither replaces the other's CA.
			caNames = union(permitted(cur.cas[0]), caNames)
		}
	case !subset(permitted(cur.cas[0]), want) && !now.Before(issuedAt(cur.cas[0]).Add(namesGrace)):
		caOK = false
		reasons = append(reasons, "CA name constraints permit names no longer served")
	}
	if caOK {
		next.cas, next.caKey = []*x509.Certificate{cur.cas[0]}, cur.caKey
	} else {
		ca, key, err := newCA(now, m.opts.CAValidity, m.opts.Purpose, caNames)
		if err != nil {
			return nil, nil, err
		}
		next.cas, next.caKey = []*x509.Certificate{ca}, key
	}
	old := cur.cas
	if caOK {
		old = cur.cas[1:]
	}
	dropped := false
	for _, c := range old {
		if len(next.cas) <= maxRetiredCAs && m.retain(c, next.cas[0], now) {
			next.cas = append(next.cas, c) // still trusted: replicas may serve what it signed
		} else {
			dropped = true
		}
	}
	if caOK && dropped {
		reasons = append(reasons, "CA dropped from the trust bundle (expired, not the operator's, or for names no longer served)")
	}

	hosts := m.opts.Hosts
	switch {
	case !caOK:
		// A new CA signs a new certificate.
	case cur.leaf == nil:
		reasons = append(reasons, "no usable serving certificate")
	case cur.leaf.CheckSignatureFrom(next.cas[0]) != nil:
		reasons = append(reasons, "serving certificate not signed by the current CA")
	case !now.Before(renewAt(cur.leaf)):
		reasons = append(reasons, "serving certificate due for renewal")
	case !subset(constraintSet(leafHosts(cur.leaf)), permitted(next.cas[0])):
		reasons = append(reasons, "serving certificate names hosts its CA does not permit")
	case !covers(cur.leaf, hosts):
		// Another replica may run with other hosts (say, during a rolling
		// update that changes them): cover both, so neither replaces the
		// other's certificate in turn.
		hosts = union(leafHosts(cur.leaf), hosts)
		reasons = append(reasons, "serving certificate does not cover "+strings.Join(hosts, ","))
	default:
		next.leaf, next.leafKey = cur.leaf, cur.leafKey
		return next, reasons, nil
	}
	leaf, key, err := newLeaf(now, m.opts.CertValidity, hosts, next.cas[0], next.caKey)
	if err != nil {
		return nil, nil, err
	}
	next.leaf, next.leafKey = leaf, key
	return next, reasons, nil
}

// issuedByUs reports whether c is a CA this manager issues: self-signed,
// named for its purpose, with critical name constraints. Anything else in
// the Secret is not trusted, however it got there.
func (m *CertManager) issuedByUs(c *x509.Certificate) bool {
	return c.IsCA && strings.HasPrefix(c.Subject.CommonName, caNamePrefix(m.opts.Purpose)) &&
		c.PermittedDNSDomainsCritical && len(permitted(c)) > 0 && c.CheckSignatureFrom(c) == nil
}

// retain reports whether the replaced CA c stays in the trust bundle next
// to current: it is the manager's own, unexpired, and permits no name that
// current does not.
func (m *CertManager) retain(c, current *x509.Certificate, now time.Time) bool {
	return now.Before(c.NotAfter) && m.issuedByUs(c) && subset(permitted(c), permitted(current))
}

// issuedAt is when c was issued (its validity starts backdate earlier).
func issuedAt(c *x509.Certificate) time.Time {
	return c.NotBefore.Add(backdate)
}

// due returns the earliest of limit and the times something in st must be
// renewed or dropped.
func (st *certState) due(limit time.Time) time.Time {
	t := limit
	for _, c := range []time.Time{renewAt(st.cas[0]), renewAt(st.leaf)} {
		if c.Before(t) {
			t = c
		}
	}
	for _, c := range st.cas[1:] {
		if c.NotAfter.Before(t) {
			t = c.NotAfter
		}
	}
	return t
}

// data encodes st as Secret data.
func (st *certState) data() map[string][]byte {
	return map[string][]byte{
		CABundleKey: st.bundlePEM(),
		CAKeyKey:    keyPEM(st.caKey),
		CertKey:     certPEM(st.leaf),
		KeyKey:      keyPEM(st.leafKey),
	}
}

// bundlePEM is the trust bundle: every CA certificate, current first.
func (st *certState) bundlePEM() []byte {
	var b []byte
	for _, c := range st.cas {
		b = append(b, certPEM(c)...)
	}
	return b
}

// writeFiles writes ca.crt, tls.key and tls.crt to CertDir, each only when
// it changed and each by an atomic rename, key before certificate (the
// webhook server keeps serving the old pair if it reads a mismatched one,
// and re-reads on the next change).
func (m *CertManager) writeFiles(st *certState) error {
	if m.opts.CertDir == "" {
		return nil
	}
	if err := os.MkdirAll(m.opts.CertDir, 0o700); err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{CABundleKey, st.bundlePEM(), 0o644},
		{KeyKey, keyPEM(st.leafKey), 0o600},
		{CertKey, certPEM(st.leaf), 0o644},
	} {
		path := filepath.Join(m.opts.CertDir, f.name)
		if cur, err := os.ReadFile(path); err == nil && bytes.Equal(cur, f.data) {
			continue
		}
		if err := writeAtomic(path, f.data, f.mode); err != nil {
			return err
		}
	}
	return nil
}

func writeAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	defer func() { _ = os.Remove(tmp.Name()) }()
	if _, err := tmp.Write(data); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// setCurrent makes st's serving certificate the one GetCertificate returns.
func (m *CertManager) setCurrent(st *certState) {
	c := &tls.Certificate{Certificate: [][]byte{st.leaf.Raw}, PrivateKey: st.leafKey, Leaf: st.leaf}
	m.current.Store(c)
}

// GetCertificate returns the current serving certificate, for
// tls.Config.GetCertificate: a server using it serves a renewed
// certificate at once, without files. It fails before the first Sync.
func (m *CertManager) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if c := m.current.Load(); c != nil {
		return c, nil
	}
	return nil, fmt.Errorf("no %s certificate issued yet", m.opts.Purpose)
}

// publishCA keeps the ConfigMap CAConfigMap holding the trust bundle,
// writing it only when it differs.
func (m *CertManager) publishCA(ctx context.Context, bundle []byte) error {
	if m.opts.CAConfigMap == "" {
		return nil
	}
	cm := &corev1.ConfigMap{}
	err := m.opts.Client.Get(ctx, client.ObjectKey{Namespace: m.opts.SecretNamespace, Name: m.opts.CAConfigMap}, cm)
	switch {
	case apierrors.IsNotFound(err):
		cm.Namespace, cm.Name = m.opts.SecretNamespace, m.opts.CAConfigMap
		cm.Labels = map[string]string{"app.kubernetes.io/name": "kubetwin", "app.kubernetes.io/component": m.opts.Purpose + "-ca"}
		cm.Data = map[string]string{CABundleKey: string(bundle)}
		err = m.opts.Client.Create(ctx, cm)
	case err != nil:
		return err
	case cm.Data[CABundleKey] == string(bundle):
		return nil
	default:
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		cm.Data[CABundleKey] = string(bundle)
		err = m.opts.Client.Update(ctx, cm)
	}
	if err == nil {
		m.log.Info("published CA bundle", "purpose", m.opts.Purpose, "configMap", m.opts.SecretNamespace+"/"+m.opts.CAConfigMap)
	}
	return err
}

// inject sets the caBundle (and, with URL, the url) of every webhook in
// the two configurations. missing reports a configuration not found.
func (m *CertManager) inject(ctx context.Context, caBundle []byte) (missing bool, err error) {
	if m.opts.ConfigName == "" {
		return false, nil
	}
	for _, cfg := range []struct {
		kind string
		obj  client.Object
	}{
		{"ValidatingWebhookConfiguration", &admissionregistrationv1.ValidatingWebhookConfiguration{}},
		{"MutatingWebhookConfiguration", &admissionregistrationv1.MutatingWebhookConfiguration{}},
	} {
		kind, obj := cfg.kind, cfg.obj
		err := m.opts.Client.Get(ctx, client.ObjectKey{Name: m.opts.ConfigName}, obj)
		if apierrors.IsNotFound(err) {
			if !m.missing[kind] {
				m.log.Info("webhook configuration not found; will look again", "kind", kind, "name", m.opts.ConfigName)
				m.missing[kind] = true
			}
			missing = true
			continue
		}
		if err != nil {
			return missing, fmt.Errorf("reading %s %s: %w", kind, m.opts.ConfigName, err)
		}
		m.missing[kind] = false
		changed := false
		switch c := obj.(type) {
		case *admissionregistrationv1.ValidatingWebhookConfiguration:
			for i := range c.Webhooks {
				changed = m.fixClientConfig(&c.Webhooks[i].ClientConfig, caBundle) || changed
			}
		case *admissionregistrationv1.MutatingWebhookConfiguration:
			for i := range c.Webhooks {
				changed = m.fixClientConfig(&c.Webhooks[i].ClientConfig, caBundle) || changed
			}
		}
		if !changed {
			continue
		}
		if err := m.opts.Client.Update(ctx, obj); err != nil {
			return missing, fmt.Errorf("updating the caBundle of %s %s: %w", kind, m.opts.ConfigName, err)
		}
		m.log.Info("updated webhook configuration", "kind", kind, "name", m.opts.ConfigName, "url", m.opts.URL)
	}
	return missing, nil
}

// apiServiceGVK is the APIService's kind, read as unstructured: the
// operator does not depend on kube-aggregator's types for one field.
var apiServiceGVK = schema.GroupVersionKind{Group: "apiregistration.k8s.io", Version: "v1", Kind: "APIService"}

// injectAPIService keeps the caBundle of the APIService APIServiceName
// equal to caBundle, with a merge patch of that field (and of
// insecureSkipTLSVerify) only when it differs. missing reports the
// APIService not found.
func (m *CertManager) injectAPIService(ctx context.Context, caBundle []byte) (missing bool, err error) {
	name := m.opts.APIServiceName
	if name == "" {
		return false, nil
	}
	as := &unstructured.Unstructured{}
	as.SetGroupVersionKind(apiServiceGVK)
	err = m.opts.Client.Get(ctx, client.ObjectKey{Name: name}, as)
	if apierrors.IsNotFound(err) {
		if !m.missing["APIService"] {
			m.log.Info("APIService not found; will look again", "name", name)
			m.missing["APIService"] = true
		}
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("reading APIService %s: %w", name, err)
	}
	m.missing["APIService"] = false
	want := base64.StdEncoding.EncodeToString(caBundle)
	have, _, _ := unstructured.NestedString(as.Object, "spec", "caBundle")
	insecure, _, _ := unstructured.NestedBool(as.Object, "spec", "insecureSkipTLSVerify")
	if have == want && !insecure {
		return false, nil
	}
	patch, err := json.Marshal(map[string]any{"spec": map[string]any{"caBundle": want, "insecureSkipTLSVerify": nil}})
	if err != nil {
		return false, err
	}
	if err := m.opts.Client.Patch(ctx, as, client.RawPatch(types.MergePatchType, patch)); err != nil {
		return false, fmt.Errorf("patching the caBundle of APIService %s: %w", name, err)
	}
	m.log.Info("updated APIService caBundle", "name", name, "wasInsecure", insecure)
	return false, nil
}

// fixClientConfig sets cc's caBundle and, with URL, its url; it reports
// whether anything changed.
func (m *CertManager) fixClientConfig(cc *admissionregistrationv1.WebhookClientConfig, caBundle []byte) bool {
	changed := false
	if !bytes.Equal(cc.CABundle, caBundle) {
		cc.CABundle, changed = slices.Clone(caBundle), true
	}
	if m.opts.URL == "" {
		return changed
	}
	path := ""
	switch {
	case cc.Service != nil && cc.Service.Path != nil:
		path = *cc.Service.Path
	case cc.URL != nil:
		if u, err := url.Parse(*cc.URL); err == nil {
			path = u.Path
		}
	}
	want := strings.TrimRight(m.opts.URL, "/") + "/" + strings.TrimLeft(path, "/")
	if cc.URL == nil || *cc.URL != want || cc.Service != nil {
		cc.URL, cc.Service, changed = &want, nil, true
	}
	return changed
}

// renewAt is when 2/3 of c's lifetime have passed. For nil it is the zero
// time (due at once).
func renewAt(c *x509.Certificate) time.Time {
	if c == nil {
		return time.Time{}
	}
	return c.NotBefore.Add(c.NotAfter.Sub(c.NotBefore) * 2 / 3)
}

func caNamePrefix(purpose string) string { return "kubetwin-" + purpose + "-ca@" }

// newCA issues a CA whose critical name constraints permit hosts only: a
// kind of name that hosts has none of (DNS names, IP addresses) is
// excluded altogether, as an empty permitted list would permit any.
func newCA(now time.Time, validity time.Duration, purpose string, hosts []string) (*x509.Certificate, crypto.Signer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serialNumber(),
		Subject:               pkix.Name{CommonName: fmt.Sprintf("%s%d", caNamePrefix(purpose), now.Unix())},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,

		PermittedDNSDomainsCritical: true,
	}
	for _, h := range constraintSet(hosts) {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.PermittedIPRanges = append(tmpl.PermittedIPRanges, hostRange(ip))
		} else {
			tmpl.PermittedDNSDomains = append(tmpl.PermittedDNSDomains, h)
		}
	}
	if len(tmpl.PermittedIPRanges) == 0 {
		tmpl.ExcludedIPRanges = []*net.IPNet{
			{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
			{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)},
		}
	}
	if len(tmpl.PermittedDNSDomains) == 0 {
		tmpl.ExcludedDNSDomains = []string{""} // the empty name matches every name
	}
	return sign(tmpl, tmpl, key, key)
}

// hostRange is the range of exactly ip.
func hostRange(ip net.IP) *net.IPNet {
	if v4 := ip.To4(); v4 != nil {
		return &net.IPNet{IP: v4, Mask: net.CIDRMask(32, 32)}
	}
	return &net.IPNet{IP: ip.To16(), Mask: net.CIDRMask(128, 128)}
}

// constraintOf is the name constraint that permits host h: the IP address
// in canonical form, or the DNS name in lower case without a trailing dot
// or a wildcard label (a constraint permits the subdomains anyway).
func constraintOf(h string) string {
	if ip := net.ParseIP(h); ip != nil {
		return ip.String()
	}
	return strings.TrimPrefix(normalHost(h), "*.")
}

// constraintSet returns the constraints of hosts, each once, in order.
func constraintSet(hosts []string) []string {
	var out []string
	for _, h := range hosts {
		if c := constraintOf(h); !slices.Contains(out, c) {
			out = append(out, c)
		}
	}
	return out
}

// permitted returns the names c's name constraints permit, as
// constraintOf writes them; a range wider than one address is written as
// a CIDR, which no host matches.
func permitted(c *x509.Certificate) []string {
	out := slices.Clone(c.PermittedDNSDomains)
	for i := range out {
		out[i] = strings.ToLower(out[i])
	}
	for _, n := range c.PermittedIPRanges {
		if ones, bits := n.Mask.Size(); ones == bits && bits > 0 {
			out = append(out, n.IP.String())
		} else {
			out = append(out, n.String())
		}
	}
	return out
}

// subset reports whether every name of a is in b.
func subset(a, b []string) bool {
	for _, x := range a {
		if !slices.Contains(b, x) {
			return false
		}
	}
	return true
}

// validHost reports whether h is an IP address or a DNS name (a leading
// wildcard label allowed), which a name constraint can express.
func validHost(h string) bool {
	if net.ParseIP(h) != nil {
		return true
	}
	return len(validation.IsDNS1123Subdomain(constraintOf(h))) == 0
}

func newLeaf(now time.Time, validity time.Duration, hosts []string, ca *x509.Certificate, caKey crypto.Signer) (*x509.Certificate, crypto.Signer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serialNumber(),
		// A DNS name or none: OpenSSL checks a common name that looks like
		// one (an IP address does) against the CA's DNS name constraints.
		Subject:     pkix.Name{CommonName: firstDNSName(hosts)},
		NotBefore:   now.Add(-backdate),
		NotAfter:    now.Add(validity),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if tmpl.NotAfter.After(ca.NotAfter) {
		tmpl.NotAfter = ca.NotAfter
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, normalHost(h))
		}
	}
	return sign(tmpl, ca, key, caKey)
}

// firstDNSName returns the first of hosts that is not an IP address, or "".
func firstDNSName(hosts []string) string {
	for _, h := range hosts {
		if net.ParseIP(h) == nil {
			return normalHost(h)
		}
	}
	return ""
}

func sign(tmpl, parent *x509.Certificate, key, parentKey crypto.Signer) (*x509.Certificate, crypto.Signer, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return nil, nil, err
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	return c, key, nil
}

func serialNumber() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail
	}
	return n.Add(n, big.NewInt(1))
}

// covers reports whether c names every host.
func covers(c *x509.Certificate, hosts []string) bool {
	have := leafHosts(c)
	for _, h := range hosts {
		if !slices.ContainsFunc(have, func(x string) bool { return strings.EqualFold(x, normalHost(h)) }) {
			return false
		}
	}
	return true
}

// leafHosts returns c's DNS names and IP addresses.
func leafHosts(c *x509.Certificate) []string {
	hosts := slices.Clone(c.DNSNames)
	for _, ip := range c.IPAddresses {
		hosts = append(hosts, ip.String())
	}
	return hosts
}

// normalHost is h as certificates name it: an IP address in canonical
// form, a DNS name in lower case without a trailing dot.
func normalHost(h string) string {
	if ip := net.ParseIP(h); ip != nil {
		return ip.String()
	}
	return strings.TrimSuffix(strings.ToLower(h), ".")
}

// union returns a followed by the members of b not in a.
func union(a, b []string) []string {
	out := slices.Clone(a)
	for _, h := range b {
		if !slices.ContainsFunc(out, func(x string) bool { return strings.EqualFold(x, normalHost(h)) }) {
			out = append(out, normalHost(h))
		}
	}
	return out
}

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func keyPEM(k crypto.Signer) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		panic(err) // keys are ours: ECDSA P-256, or parsed from PKCS#8, PKCS#1 or SEC 1
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// parseCerts returns the certificates in PEM data that parse.
func parseCerts(data []byte) []*x509.Certificate {
	var out []*x509.Certificate
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return out
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		if c, err := x509.ParseCertificate(b.Bytes); err == nil {
			out = append(out, c)
		}
	}
}

// parseKey returns the private key in PEM data, or nil.
func parseKey(data []byte) crypto.Signer {
	b, _ := pem.Decode(data)
	if b == nil {
		return nil
	}
	var k any
	var err error
	switch b.Type {
	case "PRIVATE KEY":
		k, err = x509.ParsePKCS8PrivateKey(b.Bytes)
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(b.Bytes)
	case "RSA PRIVATE KEY":
		k, err = x509.ParsePKCS1PrivateKey(b.Bytes)
	default:
		return nil
	}
	if err != nil {
		return nil
	}
	s, _ := k.(crypto.Signer)
	return s
}

func samePublicKey(pub crypto.PublicKey, k crypto.Signer) bool {
	p, ok := k.Public().(interface{ Equal(crypto.PublicKey) bool })
	return ok && p.Equal(pub)
}

// SelfSigned returns a serving certificate for hosts (DNS names or IP
// addresses), signed by its own key, valid from an hour ago for validity.
// Nothing keeps or rotates it: it is for servers no client can be told a
// CA for (the query API of an operator outside a cluster) and for tests,
// whose clients trust the certificate itself.
func SelfSigned(hosts []string, validity time.Duration) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serialNumber(),
		Subject:               pkix.Name{CommonName: "kubetwin-self-signed"},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, normalHost(h))
		}
	}
	leaf, _, err := sign(tmpl, tmpl, key, key)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}, nil
}
