package certs

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	clocktesting "k8s.io/utils/clock/testing"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

var oidNameConstraints = asn1.ObjectIdentifier{2, 5, 29, 30}

// mint signs a serving certificate for hosts with the CA of st, as anyone
// holding the CA key could.
func mint(t *testing.T, st *certState, hosts ...string) *x509.Certificate {
	t.Helper()
	leaf, _, err := newLeaf(t0, 30*day, hosts, st.cas[0], st.caKey)
	if err != nil {
		t.Fatal(err)
	}
	return leaf
}

// notAuthorized reports whether err is Go's refusal of a name the CA's
// name constraints do not permit.
func notAuthorized(err error) bool {
	var inv x509.CertificateInvalidError
	return errors.As(err, &inv) && inv.Reason == x509.CANotAuthorizedForThisName
}

// TestCACarriesNameConstraints: the CA's critical name constraints permit
// the hosts only, so a certificate its key signs for any other name or
// address fails verification, while the serving certificate verifies.
func TestCACarriesNameConstraints(t *testing.T) {
	c := fakeClient(t, nil, webhookConfigs()...)
	f := newFixture(t, c, clocktesting.NewFakeClock(t0), nil)
	f.sync()
	st := f.state()
	ca := st.cas[0]

	critical := false
	for _, e := range ca.Extensions {
		if e.Id.Equal(oidNameConstraints) {
			critical = e.Critical
		}
	}
	if !critical || !ca.PermittedDNSDomainsCritical {
		t.Errorf("CA name constraints are not critical (extension critical %v)", critical)
	}
	if !slices.Equal(ca.PermittedDNSDomains, testHosts[:1]) || len(ca.PermittedIPRanges) != 1 ||
		ca.PermittedIPRanges[0].String() != "127.0.0.1/32" {
		t.Errorf("CA permits DNS %v, IP %v; want %v and 127.0.0.1/32", ca.PermittedDNSDomains, ca.PermittedIPRanges, testHosts[:1])
	}
	bundle := st.bundlePEM()
	for _, h := range testHosts {
		if err := verifies(bundle, st.leaf, h, t0); err != nil {
			t.Errorf("serving certificate for %s: %v", h, err)
		}
	}
	for _, h := range []string{"evil.example.com", "kubernetes.default.svc", "10.0.0.1", "::1"} {
		err := verifies(bundle, mint(t, st, h), h, t0)
		if !notAuthorized(err) {
			t.Errorf("a certificate for %s signed by the CA: %v, want CANotAuthorizedForThisName", h, err)
		}
	}
	// A certificate that adds another name to the hub's is refused too.
	if err := verifies(bundle, mint(t, st, testHosts[0], "evil.example.com"), testHosts[0], t0); !notAuthorized(err) {
		t.Errorf("a certificate for the hub and another name: %v, want CANotAuthorizedForThisName", err)
	}
}

// With hosts of one kind only, the other kind is excluded altogether (an
// empty permitted list would permit every name of that kind).
func TestCANameConstraintsOneKind(t *testing.T) {
	for name, c := range map[string]struct {
		hosts    []string
		refused  string
		accepted string
	}{
		"DNS names only":    {[]string{"hub.example.com", "HUB2.example.com."}, "10.0.0.1", "hub2.example.com"},
		"IP addresses only": {[]string{"10.1.2.3", "fd00::1"}, "hub.example.com", "fd00::1"},
	} {
		t.Run(name, func(t *testing.T) {
			f := newFixture(t, fakeClient(t, nil), clocktesting.NewFakeClock(t0), func(o *CertOptions) {
				o.Hosts, o.ConfigName = c.hosts, ""
			})
			f.sync()
			st := f.state()
			bundle := st.bundlePEM()
			if err := verifies(bundle, st.leaf, c.accepted, t0); err != nil {
				t.Errorf("serving certificate for %s: %v", c.accepted, err)
			}
			if err := verifies(bundle, mint(t, st, c.refused), c.refused, t0); !notAuthorized(err) {
				t.Errorf("a certificate for %s: %v, want CANotAuthorizedForThisName", c.refused, err)
			}
		})
	}
}

// TestCAReissuedWhenNamesChange: a host the CA does not permit gets a new
// CA at once; a CA that permits a name no longer served is replaced once
// the rolling-update grace has passed, and leaves the trust bundle.
func TestCAReissuedWhenNamesChange(t *testing.T) {
	c := fakeClient(t, nil, webhookConfigs()...)
	clk := clocktesting.NewFakeClock(t0)
	newFixture(t, c, clk, nil).sync()
	first := newFixture(t, c, clk, nil).state()

	clk.SetTime(t0.Add(time.Hour))
	more := append(slices.Clone(testHosts), "hub.example.com")
	f := newFixture(t, c, clk, func(o *CertOptions) { o.Hosts = more })
	f.sync()
	added := f.state()
	if added.cas[0].Equal(first.cas[0]) {
		t.Fatal("the CA was kept although it does not permit hub.example.com")
	}
	if err := verifies(added.bundlePEM(), added.leaf, "hub.example.com", clk.Now()); err != nil {
		t.Errorf("serving certificate for the added name: %v", err)
	}
	// The replaced CA permits nothing the new one does not: it stays trusted.
	if len(added.cas) != 2 || !added.cas[1].Equal(first.cas[0]) {
		t.Errorf("after adding a name the bundle holds %d CAs, want the new and the replaced", len(added.cas))
	}

	// 127.0.0.1 removed: within the grace the CA (which permits it) stays,
	// after it a CA for the remaining name replaces it, alone in the bundle.
	fewer := testHosts[:1]
	g := newFixture(t, c, clk, func(o *CertOptions) { o.Hosts = fewer; o.Resync = 365 * day })
	clk.SetTime(issuedAt(added.cas[0]).Add(namesGrace - time.Second))
	if next, end := g.sync(), issuedAt(added.cas[0]).Add(namesGrace); !next.Equal(end) {
		t.Errorf("next sync at %v, want the end of the grace %v", next, end)
	}
	if !g.state().cas[0].Equal(added.cas[0]) {
		t.Fatal("the CA was replaced within the grace of a rolling update")
	}
	clk.SetTime(issuedAt(added.cas[0]).Add(namesGrace))
	g.sync()
	removed := g.state()
	if removed.cas[0].Equal(added.cas[0]) {
		t.Fatal("the CA still permits names no longer served after the grace")
	}
	if !slices.Equal(permitted(removed.cas[0]), fewer) || len(removed.cas) != 1 {
		t.Errorf("CA permits %v with %d CAs in the bundle; want %v alone", permitted(removed.cas[0]), len(removed.cas), fewer)
	}
	if err := verifies(removed.bundlePEM(), mint(t, removed, "127.0.0.1"), "127.0.0.1", clk.Now()); !notAuthorized(err) {
		t.Errorf("a certificate for the removed 127.0.0.1: %v, want CANotAuthorizedForThisName", err)
	}
}

// foreignCA is a CA someone else made: unconstrained, as an organisation's
// root or a CA from an earlier certificate in the same Secret would be.
func foreignCA(t *testing.T, cn string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serialNumber(), Subject: pkix.Name{CommonName: cn},
		NotBefore: t0.Add(-day), NotAfter: t0.Add(3650 * day),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true, IsCA: true,
	}
	ca, _, err := sign(tmpl, tmpl, key, key)
	if err != nil {
		t.Fatal(err)
	}
	return ca, key
}

// TestTrustBundlePublishesOnlyTheOperatorsCA: a CA someone put into the
// Secret's ca.crt is dropped from the Secret and never reaches the
// published ConfigMap (devices trust what it holds process-wide).
func TestTrustBundlePublishesOnlyTheOperatorsCA(t *testing.T) {
	c := fakeClient(t, nil)
	f := newFixture(t, c, clocktesting.NewFakeClock(t0), func(o *CertOptions) {
		o.Purpose, o.ConfigName, o.CAConfigMap, o.CertDir = "mqtt", "", "kubetwin-mqtt-ca", ""
	})
	f.sync()
	own := f.state().cas[0]

	extra, _ := foreignCA(t, "Example Corp Root CA")
	lookalike, _ := foreignCA(t, caNamePrefix("mqtt")+"1") // our name, no constraints
	sec := f.secret()
	sec.Data[CABundleKey] = append(append(sec.Data[CABundleKey], certPEM(extra)...), certPEM(lookalike)...)
	if err := c.Update(context.Background(), sec); err != nil {
		t.Fatal(err)
	}
	f.sync()

	cm := &corev1.ConfigMap{}
	if err := c.Get(context.Background(), client.ObjectKey{Namespace: testNS, Name: "kubetwin-mqtt-ca"}, cm); err != nil {
		t.Fatal(err)
	}
	for where, bundle := range map[string]string{"ConfigMap": cm.Data[CABundleKey], "Secret": string(f.secret().Data[CABundleKey])} {
		published := parseCerts([]byte(bundle))
		if len(published) != 1 || !published[0].Equal(own) {
			var names []string
			for _, p := range published {
				names = append(names, p.Subject.CommonName)
			}
			t.Errorf("the %s's ca.crt holds %v, want only the operator's CA %s", where, names, own.Subject.CommonName)
		}
	}
}

// A Secret whose current CA has no name constraints (written before they
// existed, or replaced by someone) gets a constrained CA, and the old one
// is not kept in the trust bundle.
func TestUnconstrainedCAReplaced(t *testing.T) {
	c := fakeClient(t, nil, webhookConfigs()...)
	clk := clocktesting.NewFakeClock(t0)
	f := newFixture(t, c, clk, nil)
	ca, key := foreignCA(t, caNamePrefix("webhook")+"1")
	leaf, leafKey, err := newLeaf(t0, 30*day, testHosts, ca, key)
	if err != nil {
		t.Fatal(err)
	}
	sec := &corev1.Secret{Type: corev1.SecretTypeTLS, Data: map[string][]byte{
		CABundleKey: certPEM(ca), CAKeyKey: keyPEM(key), CertKey: certPEM(leaf), KeyKey: keyPEM(leafKey),
	}}
	sec.Namespace, sec.Name = testNS, testSecret
	if err := c.Create(context.Background(), sec); err != nil {
		t.Fatal(err)
	}
	f.sync()
	st := f.state()
	if st.cas[0].Equal(ca) || len(st.cas) != 1 || !st.cas[0].PermittedDNSDomainsCritical {
		t.Errorf("bundle of %d CAs, current replaced %v, constrained %v; want one new constrained CA",
			len(st.cas), !st.cas[0].Equal(ca), st.cas[0].PermittedDNSDomainsCritical)
	}
}

func TestNewCertManagerRefusesBadHost(t *testing.T) {
	o := CertOptions{Client: fakeClient(t, nil), SecretNamespace: "ns", SecretName: "s", Purpose: "mqtt",
		Hosts: []string{"hub.example.com", "hub example"}}
	_, err := NewCertManager(o)
	if err == nil || !strings.Contains(err.Error(), `host "hub example" is neither an IP address nor a DNS name`) {
		t.Errorf("error %v, want one naming the bad host", err)
	}
}
