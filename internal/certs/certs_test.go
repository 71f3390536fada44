package certs

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	clocktesting "k8s.io/utils/clock/testing"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"
)

const (
	testNS     = "kubetwin-system"
	testSecret = "kubetwin-webhook-server-cert"
	testConfig = "kubetwin-admission"
	day        = 24 * time.Hour
	// The webhook paths as config/webhook has them; the manager keeps
	// whatever path a configuration names.
	validatePath = "/validate-kubetwin-io-v1alpha1-devicetwin"
	defaultPath  = "/mutate-kubetwin-io-v1alpha1-devicetwin"
)

var (
	t0        = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	testHosts = []string{"kubetwin-webhook-service.kubetwin-system.svc", "127.0.0.1"}
)

// webhookConfigs returns the two configurations as config/webhook has them
// (a Service reference, no caBundle).
func webhookConfigs() []client.Object {
	cc := func(path string) admissionregistrationv1.WebhookClientConfig {
		return admissionregistrationv1.WebhookClientConfig{Service: &admissionregistrationv1.ServiceReference{
			Namespace: testNS, Name: "kubetwin-webhook-service", Path: ptr.To(path)}}
	}
	return []client.Object{
		&admissionregistrationv1.ValidatingWebhookConfiguration{
			ObjectMeta: metav1.ObjectMeta{Name: testConfig},
			Webhooks:   []admissionregistrationv1.ValidatingWebhook{{Name: "validate.devicetwins.kubetwin.io", ClientConfig: cc(validatePath)}},
		},
		&admissionregistrationv1.MutatingWebhookConfiguration{
			ObjectMeta: metav1.ObjectMeta{Name: testConfig},
			Webhooks:   []admissionregistrationv1.MutatingWebhook{{Name: "default.devicetwins.kubetwin.io", ClientConfig: cc(defaultPath)}},
		},
	}
}

func fakeClient(t *testing.T, funcs *interceptor.Funcs, objs ...client.Object) client.Client {
	t.Helper()
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	b := fake.NewClientBuilder().WithScheme(s).WithObjects(objs...)
	if funcs != nil {
		b = b.WithInterceptorFuncs(*funcs)
	}
	return b.Build()
}

type fixture struct {
	t     *testing.T
	c     client.Client
	clock *clocktesting.FakeClock
	m     *CertManager
	dir   string
}

func newFixture(t *testing.T, c client.Client, clk *clocktesting.FakeClock, mod func(*CertOptions)) *fixture {
	t.Helper()
	o := CertOptions{
		Client: c, SecretNamespace: testNS, SecretName: testSecret, CertDir: t.TempDir(),
		Hosts: testHosts, ConfigName: testConfig, Clock: clk,
		CAValidity: 300 * day, CertValidity: 30 * day, Resync: time.Minute,
	}
	if mod != nil {
		mod(&o)
	}
	m, err := NewCertManager(o)
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{t: t, c: c, clock: clk, m: m, dir: o.CertDir}
}

// sync runs one Sync and returns when it wants to run next.
func (f *fixture) sync() time.Time {
	f.t.Helper()
	next, err := f.m.Sync(context.Background())
	if err != nil {
		f.t.Fatalf("Sync: %v", err)
	}
	return next
}

func (f *fixture) secret() *corev1.Secret {
	f.t.Helper()
	s := &corev1.Secret{}
	if err := f.c.Get(context.Background(), client.ObjectKey{Namespace: testNS, Name: testSecret}, s); err != nil {
		f.t.Fatal(err)
	}
	return s
}

func (f *fixture) state() *certState {
	f.t.Helper()
	st := parseState(f.secret().Data)
	if st.caKey == nil || st.leaf == nil {
		f.t.Fatalf("the Secret does not hold a usable CA and certificate")
	}
	return st
}

func (f *fixture) configs() (*admissionregistrationv1.ValidatingWebhookConfiguration, *admissionregistrationv1.MutatingWebhookConfiguration) {
	f.t.Helper()
	v := &admissionregistrationv1.ValidatingWebhookConfiguration{}
	mu := &admissionregistrationv1.MutatingWebhookConfiguration{}
	if err := f.c.Get(context.Background(), client.ObjectKey{Name: testConfig}, v); err != nil {
		f.t.Fatal(err)
	}
	if err := f.c.Get(context.Background(), client.ObjectKey{Name: testConfig}, mu); err != nil {
		f.t.Fatal(err)
	}
	return v, mu
}

// verifies checks that leaf chains to the trust bundle at time at.
func verifies(bundle []byte, leaf *x509.Certificate, host string, at time.Time) error {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(bundle)
	_, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: host, CurrentTime: at})
	return err
}

func TestCertManagerIssues(t *testing.T) {
	c := fakeClient(t, nil, webhookConfigs()...)
	f := newFixture(t, c, clocktesting.NewFakeClock(t0), nil)
	next := f.sync()

	sec := f.secret()
	if sec.Type != corev1.SecretTypeTLS {
		t.Errorf("Secret type = %q", sec.Type)
	}
	for _, k := range []string{CertKey, KeyKey, CABundleKey, CAKeyKey} {
		if len(sec.Data[k]) == 0 {
			t.Errorf("Secret has no %s", k)
		}
	}
	st := f.state()
	if len(st.cas) != 1 || !st.cas[0].IsCA {
		t.Fatalf("trust bundle holds %d CAs", len(st.cas))
	}
	if !slices.Equal(st.leaf.DNSNames, testHosts[:1]) || len(st.leaf.IPAddresses) != 1 || !st.leaf.IPAddresses[0].Equal(net.ParseIP("127.0.0.1")) {
		t.Errorf("SANs = %v %v", st.leaf.DNSNames, st.leaf.IPAddresses)
	}
	for _, host := range testHosts {
		if err := verifies(sec.Data[CABundleKey], st.leaf, host, t0); err != nil {
			t.Errorf("serving certificate does not verify for %s: %v", host, err)
		}
	}
	if got, want := st.leaf.NotAfter, t0.Add(30*day); !got.Equal(want) {
		t.Errorf("serving certificate expires %v, want %v", got, want)
	}
	if !st.leaf.NotBefore.Before(t0) {
		t.Errorf("serving certificate is not backdated: NotBefore %v", st.leaf.NotBefore)
	}
	// Next run: the resync interval (nothing is due sooner).
	if !next.Equal(t0.Add(time.Minute)) {
		t.Errorf("next sync at %v, want %v", next, t0.Add(time.Minute))
	}

	// The files the webhook server reads hold the same.
	for _, k := range []string{CertKey, KeyKey, CABundleKey} {
		b, err := os.ReadFile(filepath.Join(f.dir, k))
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != string(sec.Data[k]) {
			t.Errorf("%s on disk differs from the Secret", k)
		}
	}
	if fi, err := os.Stat(filepath.Join(f.dir, KeyKey)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("tls.key mode = %v (%v)", fi.Mode(), err)
	}
	if _, err := os.Stat(filepath.Join(f.dir, CAKeyKey)); !os.IsNotExist(err) {
		t.Errorf("the CA key was written to the cert dir")
	}

	// Both configurations trust the bundle; the Service reference stays.
	v, mu := f.configs()
	if string(v.Webhooks[0].ClientConfig.CABundle) != string(sec.Data[CABundleKey]) ||
		string(mu.Webhooks[0].ClientConfig.CABundle) != string(sec.Data[CABundleKey]) {
		t.Errorf("caBundle not injected")
	}
	if v.Webhooks[0].ClientConfig.Service == nil || v.Webhooks[0].ClientConfig.URL != nil {
		t.Errorf("client config changed: %+v", v.Webhooks[0].ClientConfig)
	}

	// A second run changes nothing.
	rv, vrv := sec.ResourceVersion, v.ResourceVersion
	f.sync()
	v, _ = f.configs()
	if f.secret().ResourceVersion != rv || v.ResourceVersion != vrv {
		t.Errorf("a sync with nothing due wrote")
	}
}

func TestCertManagerRotatesServingCertificate(t *testing.T) {
	c := fakeClient(t, nil, webhookConfigs()...)
	clk := clocktesting.NewFakeClock(t0)
	f := newFixture(t, c, clk, func(o *CertOptions) { o.Resync = 365 * day })
	next := f.sync()
	first := f.state()
	renew := renewAt(first.leaf)
	if !next.Equal(renew) {
		t.Fatalf("next sync at %v, want the renewal time %v", next, renew)
	}
	// 2/3 of the lifetime (30 days plus the hour of backdating).
	if want := first.leaf.NotBefore.Add((30*day + time.Hour) * 2 / 3); !renew.Equal(want) {
		t.Fatalf("renewal at %v, want %v", renew, want)
	}
	_, mu := f.configs()
	bundleRV := mu.ResourceVersion

	clk.SetTime(renew.Add(-time.Second))
	f.sync()
	if got := f.state(); got.leaf.SerialNumber.Cmp(first.leaf.SerialNumber) != 0 {
		t.Fatalf("renewed a second early")
	}

	clk.SetTime(renew)
	next = f.sync()
	second := f.state()
	if second.leaf.SerialNumber.Cmp(first.leaf.SerialNumber) == 0 {
		t.Fatal("serving certificate not renewed at 2/3 of its lifetime")
	}
	if !second.cas[0].Equal(first.cas[0]) || len(second.cas) != 1 {
		t.Errorf("the CA changed with the serving certificate")
	}
	if err := verifies(second.bundlePEM(), second.leaf, testHosts[0], renew); err != nil {
		t.Errorf("new certificate: %v", err)
	}
	if !next.Equal(renewAt(second.leaf)) {
		t.Errorf("next sync at %v, want %v", next, renewAt(second.leaf))
	}
	// The caBundle is unchanged, so the configurations are not written.
	if _, mu := f.configs(); mu.ResourceVersion != bundleRV {
		t.Errorf("configuration rewritten although the caBundle did not change")
	}
	// The webhook server's files follow.
	b, _ := os.ReadFile(filepath.Join(f.dir, CertKey))
	if string(b) != string(certPEM(second.leaf)) {
		t.Errorf("tls.crt not rewritten")
	}
}

func TestCertManagerRotatesCA(t *testing.T) {
	c := fakeClient(t, nil, webhookConfigs()...)
	clk := clocktesting.NewFakeClock(t0)
	f := newFixture(t, c, clk, func(o *CertOptions) { o.Resync = 3650 * day })
	f.sync()
	first := f.state()

	// Keep the serving certificate renewed up to the CA's renewal time:
	// every one is signed by the first CA, and none outlives it.
	for now := t0; now.Before(renewAt(first.cas[0])); {
		now = f.sync()
		clk.SetTime(now)
		if st := f.state(); st.cas[0].Equal(first.cas[0]) && st.leaf.NotAfter.After(first.cas[0].NotAfter) {
			t.Fatalf("serving certificate outlives its CA")
		}
	}
	caRenew := renewAt(first.cas[0])
	if !clk.Now().Equal(caRenew) {
		t.Fatalf("sync did not stop at the CA's renewal time %v but %v", caRenew, clk.Now())
	}
	last := f.state() // as at the CA's renewal time, before the sync
	next := f.sync()
	second := f.state()
	if second.cas[0].Equal(first.cas[0]) {
		t.Fatal("CA not renewed at 2/3 of its lifetime")
	}
	if len(second.cas) != 2 || !second.cas[1].Equal(first.cas[0]) {
		t.Fatalf("trust bundle = %d CAs, want the new and the old", len(second.cas))
	}
	if err := second.leaf.CheckSignatureFrom(second.cas[0]); err != nil {
		t.Errorf("new serving certificate not signed by the new CA: %v", err)
	}
	// A replica still serving the old certificate stays trusted.
	if err := verifies(second.bundlePEM(), last.leaf, testHosts[0], caRenew); err != nil {
		t.Errorf("old serving certificate no longer trusted: %v", err)
	}
	v, mu := f.configs()
	if string(v.Webhooks[0].ClientConfig.CABundle) != string(second.bundlePEM()) || string(mu.Webhooks[0].ClientConfig.CABundle) != string(second.bundlePEM()) {
		t.Errorf("caBundle not updated to the new bundle")
	}

	// The old CA leaves the bundle when it expires.
	for clk.Now().Before(first.cas[0].NotAfter) {
		clk.SetTime(next)
		next = f.sync()
	}
	third := f.state()
	if len(third.cas) != 1 || !third.cas[0].Equal(second.cas[0]) {
		t.Fatalf("after the old CA expired the bundle holds %d CAs", len(third.cas))
	}
	if v, _ := f.configs(); string(v.Webhooks[0].ClientConfig.CABundle) != string(third.bundlePEM()) {
		t.Errorf("caBundle still holds the expired CA")
	}
}

// Two replicas share one Secret: the second uses what the first wrote, and
// when both want to rotate at once, one write wins and the other adopts it.
func TestCertManagerReplicasAgree(t *testing.T) {
	clk := clocktesting.NewFakeClock(t0)
	var a *fixture
	raced := false
	funcs := &interceptor.Funcs{
		Update: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.UpdateOption) error {
			if _, ok := obj.(*corev1.Secret); ok && !raced {
				raced = true
				a.sync() // replica a rotates between b's read and b's write
			}
			return c.Update(ctx, obj, opts...)
		},
	}
	c := fakeClient(t, funcs, webhookConfigs()...)
	a = newFixture(t, c, clk, nil)
	b := newFixture(t, c, clk, nil)
	raced = true // no race for the first issue
	a.sync()
	rv := a.secret().ResourceVersion
	b.sync()
	if a.secret().ResourceVersion != rv {
		t.Fatal("the second replica rewrote a valid Secret")
	}
	for _, k := range []string{CertKey, KeyKey, CABundleKey} {
		x, _ := os.ReadFile(filepath.Join(a.dir, k))
		y, _ := os.ReadFile(filepath.Join(b.dir, k))
		if string(x) != string(y) {
			t.Errorf("replicas serve different %s", k)
		}
	}

	clk.SetTime(renewAt(a.state().leaf))
	raced = false
	b.sync() // reads, plans a rotation, loses the write to a, adopts a's
	if !raced {
		t.Fatal("the race did not happen")
	}
	won := a.state()
	x, _ := os.ReadFile(filepath.Join(b.dir, CertKey))
	if string(x) != string(certPEM(won.leaf)) {
		t.Errorf("the losing replica does not serve the winner's certificate")
	}
	rv = a.secret().ResourceVersion
	a.sync()
	b.sync()
	if a.secret().ResourceVersion != rv {
		t.Errorf("replicas keep rewriting the Secret")
	}
}

// Replicas with different hosts (a rolling update that changes them) get a
// certificate covering both, instead of replacing each other's.
func TestCertManagerHostsChange(t *testing.T) {
	clk := clocktesting.NewFakeClock(t0)
	c := fakeClient(t, nil, webhookConfigs()...)
	a := newFixture(t, c, clk, nil)
	b := newFixture(t, c, clk, func(o *CertOptions) { o.Hosts = append(slices.Clone(testHosts), "localhost") })
	a.sync()
	b.sync()
	st := b.state()
	if !covers(st.leaf, b.m.opts.Hosts) || !covers(st.leaf, a.m.opts.Hosts) {
		t.Fatalf("certificate covers %v", leafHosts(st.leaf))
	}
	// The CA's name constraints permit both too, or one replica's certificate would not verify.
	if want := constraintSet(b.m.opts.Hosts); !subset(want, permitted(st.cas[0])) {
		t.Fatalf("CA permits %v, want %v", permitted(st.cas[0]), want)
	}
	rv := b.secret().ResourceVersion
	a.sync()
	b.sync()
	if b.secret().ResourceVersion != rv {
		t.Errorf("replicas with different hosts keep replacing the certificate")
	}
}

// A Secret someone broke is repaired, keeping a CA that is still good.
func TestCertManagerRepairsSecret(t *testing.T) {
	c := fakeClient(t, nil, webhookConfigs()...)
	f := newFixture(t, c, clocktesting.NewFakeClock(t0), nil)
	f.sync()
	first := f.state()

	sec := f.secret()
	sec.Data[CertKey] = []byte("garbage")
	if err := c.Update(context.Background(), sec); err != nil {
		t.Fatal(err)
	}
	f.sync()
	st := f.state()
	if !st.cas[0].Equal(first.cas[0]) {
		t.Errorf("the CA was replaced although only tls.crt was broken")
	}
	if st.leaf.SerialNumber.Cmp(first.leaf.SerialNumber) == 0 {
		t.Errorf("certificate not reissued")
	}

	// Without the CA key, a new CA; the old one stays trusted until it expires.
	sec = f.secret()
	delete(sec.Data, CAKeyKey)
	if err := c.Update(context.Background(), sec); err != nil {
		t.Fatal(err)
	}
	f.sync()
	st = f.state()
	if st.cas[0].Equal(first.cas[0]) || len(st.cas) != 2 {
		t.Errorf("missing CA key: bundle has %d CAs, current is the old one: %v", len(st.cas), st.cas[0].Equal(first.cas[0]))
	}
}

// A caBundle someone reset comes back on the next sync, and with a URL the
// webhooks are pointed at it, keeping their paths.
func TestCertManagerInjectsURLAndRestoresCABundle(t *testing.T) {
	c := fakeClient(t, nil, webhookConfigs()...)
	f := newFixture(t, c, clocktesting.NewFakeClock(t0), func(o *CertOptions) { o.URL = "https://127.0.0.1:9443/" })
	f.sync()
	v, mu := f.configs()
	if u := v.Webhooks[0].ClientConfig.URL; u == nil || *u != "https://127.0.0.1:9443"+validatePath || v.Webhooks[0].ClientConfig.Service != nil {
		t.Errorf("validating client config = %+v", v.Webhooks[0].ClientConfig)
	}
	if u := mu.Webhooks[0].ClientConfig.URL; u == nil || *u != "https://127.0.0.1:9443"+defaultPath {
		t.Errorf("mutating client config = %+v", mu.Webhooks[0].ClientConfig)
	}

	// envtest writes URLs with a doubled slash; they are normalised.
	mu.Webhooks[0].ClientConfig.URL = ptr.To("https://127.0.0.1:1234/" + defaultPath)
	mu.Webhooks[0].ClientConfig.CABundle = []byte("someone else's CA")
	if err := c.Update(context.Background(), mu); err != nil {
		t.Fatal(err)
	}
	f.sync()
	_, mu = f.configs()
	if u := mu.Webhooks[0].ClientConfig.URL; *u != "https://127.0.0.1:9443"+defaultPath {
		t.Errorf("url = %s", *u)
	}
	if string(mu.Webhooks[0].ClientConfig.CABundle) != string(f.secret().Data[CABundleKey]) {
		t.Errorf("caBundle not restored")
	}
}

// Missing configurations are not an error; they are looked for again soon.
func TestCertManagerMissingConfigurations(t *testing.T) {
	c := fakeClient(t, nil)
	f := newFixture(t, c, clocktesting.NewFakeClock(t0), nil)
	if next := f.sync(); !next.Equal(t0.Add(missingRetry)) {
		t.Errorf("next sync at %v, want %v", next, t0.Add(missingRetry))
	}
	for _, o := range webhookConfigs() {
		if err := c.Create(context.Background(), o); err != nil {
			t.Fatal(err)
		}
	}
	if next := f.sync(); !next.Equal(t0.Add(time.Minute)) {
		t.Errorf("next sync at %v, want the resync %v", next, t0.Add(time.Minute))
	}
	if v, _ := f.configs(); len(v.Webhooks[0].ClientConfig.CABundle) == 0 {
		t.Errorf("caBundle not injected once the configuration exists")
	}
}

// Start sleeps on the clock until a renewal is due.
func TestCertManagerStartRenewsOnTime(t *testing.T) {
	c := fakeClient(t, nil, webhookConfigs()...)
	clk := clocktesting.NewFakeClock(t0)
	f := newFixture(t, c, clk, func(o *CertOptions) { o.Resync = 365 * day })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.m.Start(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Start: %v", err)
		}
	}()
	waitFor(t, clk.HasWaiters)
	first := f.state()
	clk.SetTime(renewAt(first.leaf).Add(-time.Minute))
	waitFor(t, clk.HasWaiters)
	if f.state().leaf.SerialNumber.Cmp(first.leaf.SerialNumber) != 0 {
		t.Fatal("renewed early")
	}
	clk.SetTime(renewAt(first.leaf))
	waitFor(t, func() bool { return f.state().leaf.SerialNumber.Cmp(first.leaf.SerialNumber) != 0 })
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestNewCertManagerOptions(t *testing.T) {
	c := fakeClient(t, nil)
	ok := CertOptions{Client: c, SecretNamespace: "ns", SecretName: "s", CertDir: "/tmp/x", Hosts: []string{"h"}}
	if _, err := NewCertManager(ok); err != nil {
		t.Errorf("valid options: %v", err)
	}
	noDir := ok
	noDir.CertDir = "" // serves GetCertificate instead of files
	if _, err := NewCertManager(noDir); err != nil {
		t.Errorf("no CertDir: %v", err)
	}
	for name, mod := range map[string]func(*CertOptions){
		"no client":  func(o *CertOptions) { o.Client = nil },
		"no secret":  func(o *CertOptions) { o.SecretName = "" },
		"no hosts":   func(o *CertOptions) { o.Hosts = nil },
		"http URL":   func(o *CertOptions) { o.URL = "http://127.0.0.1:9443" },
		"bare host":  func(o *CertOptions) { o.URL = "127.0.0.1:9443" },
		"no ns":      func(o *CertOptions) { o.SecretNamespace = "" },
		"empty host": func(o *CertOptions) { o.URL = "https://" },
	} {
		o := ok
		mod(&o)
		if _, err := NewCertManager(o); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// TestCertManagerPublishesCA: with CAConfigMap (the MQTT broker's
// certificate) the trust bundle is kept in a ConfigMap for clients, follows
// a CA rotation, and comes back when changed; the CA is named for its purpose.
func TestCertManagerPublishesCA(t *testing.T) {
	c := fakeClient(t, nil)
	clk := clocktesting.NewFakeClock(t0)
	f := newFixture(t, c, clk, func(o *CertOptions) {
		o.Purpose, o.ConfigName, o.CAConfigMap, o.Resync, o.CertDir = "mqtt", "", "kubetwin-mqtt-ca", 3650*day, ""
	})
	if _, err := f.m.GetCertificate(nil); err == nil {
		t.Error("GetCertificate before the first Sync: want an error")
	}
	f.sync()

	bundle := func() string {
		cm := &corev1.ConfigMap{}
		if err := c.Get(context.Background(), client.ObjectKey{Namespace: testNS, Name: "kubetwin-mqtt-ca"}, cm); err != nil {
			t.Fatal(err)
		}
		return cm.Data[CABundleKey]
	}
	st := f.state()
	if bundle() != string(st.bundlePEM()) {
		t.Fatalf("ConfigMap ca.crt is not the trust bundle")
	}
	if cn := st.cas[0].Subject.CommonName; !strings.HasPrefix(cn, "kubetwin-mqtt-ca@") {
		t.Errorf("CA common name %q", cn)
	}
	if got := f.secret().Labels["app.kubernetes.io/component"]; got != "mqtt-certificates" {
		t.Errorf("Secret component label %q", got)
	}

	cm := &corev1.ConfigMap{}
	_ = c.Get(context.Background(), client.ObjectKey{Namespace: testNS, Name: "kubetwin-mqtt-ca"}, cm)
	cm.Data[CABundleKey] = "tampered"
	if err := c.Update(context.Background(), cm); err != nil {
		t.Fatal(err)
	}
	f.sync()
	if bundle() != string(st.bundlePEM()) {
		t.Error("a changed ConfigMap was not restored")
	}

	if c, err := f.m.GetCertificate(nil); err != nil || !c.Leaf.Equal(st.leaf) {
		t.Errorf("GetCertificate = %v, want the Secret's certificate", err)
	}

	clk.SetTime(renewAt(st.cas[0]))
	f.sync()
	next := f.state()
	if len(next.cas) != 2 || bundle() != string(next.bundlePEM()) {
		t.Errorf("after the CA rotation the ConfigMap does not hold the new bundle (%d CAs)", len(next.cas))
	}
	if c, err := f.m.GetCertificate(nil); err != nil || !c.Leaf.Equal(next.leaf) {
		t.Errorf("after the rotation GetCertificate = %v, want the new certificate", err)
	}
}

// apiService is the query API's APIService as the chart used to install
// it without a certificate: kube-apiserver does not verify the server.
func apiService(name string) *unstructured.Unstructured {
	as := &unstructured.Unstructured{Object: map[string]any{"spec": map[string]any{
		"group": "query.kubetwin.io", "version": "v1alpha1", "insecureSkipTLSVerify": true,
		"service": map[string]any{"namespace": testNS, "name": "kubetwin-query-api"},
	}}}
	as.SetGroupVersionKind(apiServiceGVK)
	as.SetName(name)
	return as
}

// TestCertManagerInjectsAPIService: with APIServiceName the APIService's
// caBundle is set to the trust bundle and insecureSkipTLSVerify cleared;
// a Sync with nothing changed writes nothing; someone else's caBundle is
// replaced; a missing APIService is looked for again soon.
func TestCertManagerInjectsAPIService(t *testing.T) {
	const name = "v1alpha1.query.kubetwin.io"
	var patches int
	c := fakeClient(t, &interceptor.Funcs{Patch: func(ctx context.Context, c client.WithWatch, o client.Object, p client.Patch, opts ...client.PatchOption) error {
		patches++
		return c.Patch(ctx, o, p, opts...)
	}})
	f := newFixture(t, c, clocktesting.NewFakeClock(t0), func(o *CertOptions) {
		o.Purpose, o.ConfigName, o.APIServiceName, o.CertDir = "query-api", "", name, ""
	})
	if next := f.sync(); !next.Equal(t0.Add(missingRetry)) {
		t.Errorf("APIService missing: next sync at %v, want %v", next, t0.Add(missingRetry))
	}
	if err := c.Create(context.Background(), apiService(name)); err != nil {
		t.Fatal(err)
	}
	get := func() (string, bool) {
		t.Helper()
		as := apiService(name)
		if err := c.Get(context.Background(), client.ObjectKey{Name: name}, as); err != nil {
			t.Fatal(err)
		}
		ca, _, _ := unstructured.NestedString(as.Object, "spec", "caBundle")
		_, insecure := as.Object["spec"].(map[string]any)["insecureSkipTLSVerify"]
		b, err := base64.StdEncoding.DecodeString(ca)
		if err != nil {
			t.Fatalf("caBundle %q: %v", ca, err)
		}
		return string(b), insecure
	}
	if next := f.sync(); !next.Equal(t0.Add(time.Minute)) {
		t.Errorf("next sync at %v, want the resync %v", next, t0.Add(time.Minute))
	}
	bundle := string(f.secret().Data[CABundleKey])
	if ca, insecure := get(); ca != bundle || insecure {
		t.Fatalf("APIService caBundle %q (want the Secret's ca.crt), insecureSkipTLSVerify present %v", ca, insecure)
	}
	if patches != 1 {
		t.Fatalf("%d patches, want 1", patches)
	}
	f.sync()
	if patches != 1 {
		t.Errorf("a Sync with nothing changed patched the APIService (%d patches)", patches)
	}
	if err := c.Patch(context.Background(), apiService(name), client.RawPatch(types.MergePatchType,
		[]byte(`{"spec":{"caBundle":"`+base64.StdEncoding.EncodeToString([]byte("someone else's CA"))+`"}}`))); err != nil {
		t.Fatal(err)
	}
	f.sync()
	if ca, _ := get(); ca != bundle {
		t.Errorf("caBundle not restored: %q", ca)
	}
}

// TestSelfSigned: the certificate verifies for each of its hosts, DNS
// names and IP addresses, against itself, and for no other name.
func TestSelfSigned(t *testing.T) {
	c, err := SelfSigned([]string{"localhost", "127.0.0.1", "Query.Example.com."}, day)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(c.Leaf)
	for _, h := range []string{"localhost", "127.0.0.1", "query.example.com"} {
		if _, err := c.Leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: h}); err != nil {
			t.Errorf("%s: %v", h, err)
		}
	}
	if _, err := c.Leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: "other.example.com"}); err == nil {
		t.Error("verifies for a name it does not carry")
	}
	if d := time.Until(c.Leaf.NotAfter); d <= day-time.Minute || d > day {
		t.Errorf("valid for %s more, want a day", d)
	}
}
