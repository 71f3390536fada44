package bus

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kubetwin/kubetwin/internal/testutil/selfsigned"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// fakeAuth accepts the password "ok-<seconds valid>" (or "ok") as the
// device named by the client id, and "admin" as an administrator.
type fakeAuth struct {
	mu    sync.Mutex
	calls int
}

func (a *fakeAuth) Authenticate(_ context.Context, clientID, _ string, password []byte) (Grant, error) {
	a.mu.Lock()
	a.calls++
	a.mu.Unlock()
	switch p := string(password); {
	case p == "admin":
		return Grant{Admin: true}, nil
	case p == "ok":
		return Grant{DeviceID: clientID}, nil
	case strings.HasPrefix(p, "ok-"):
		d, _ := time.ParseDuration(strings.TrimPrefix(p, "ok-"))
		return Grant{DeviceID: clientID, Expires: time.Now().Add(d)}, nil
	}
	return Grant{}, Refuse(ReasonBadSignature, "test refusal")
}

// selfSigned returns a TLS certificate for 127.0.0.1 and a pool trusting it.
func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	cert, pool, err := selfsigned.New()
	if err != nil {
		t.Fatal(err)
	}
	return cert, pool
}

// startSecureEmbedded runs an Embedded bus with a plain and a TLS listener
// and the fake Authenticator.
func startSecureEmbedded(t *testing.T) (*Embedded, *recorder, *x509.CertPool) {
	t.Helper()
	cert, pool := selfSigned(t)
	rec := newRecorder()
	b, err := NewEmbedded(EmbeddedOptions{
		Listen: "127.0.0.1:0", TLSListen: "127.0.0.1:0",
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		Auth:      &fakeAuth{}, Handler: rec.handle, Logger: testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	runBus(t, b)
	select {
	case <-b.Ready():
	case <-time.After(waitTimeout):
		t.Fatal("embedded bus not ready")
	}
	return b, rec, pool
}

// authDevice connects with a password and reports the CONNACK code and a
// channel closed when the connection is lost.
func authDevice(t *testing.T, o *paho.ClientOptions, password string) (paho.Client, byte, <-chan struct{}) {
	t.Helper()
	lost := make(chan struct{})
	var once sync.Once
	o.SetUsername("u").SetPassword(password).
		SetConnectionLostHandler(func(paho.Client, error) { once.Do(func() { close(lost) }) })
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(waitTimeout) {
		t.Fatal("no CONNACK")
	}
	if tok.Error() == nil {
		t.Cleanup(func() { c.Disconnect(0) })
	}
	return c, tok.(*paho.ConnectToken).ReturnCode(), lost
}

func TestNewEmbeddedTLSNeedsConfig(t *testing.T) {
	if _, err := NewEmbedded(EmbeddedOptions{TLSListen: "127.0.0.1:0", Handler: func(Message) {}}); err == nil {
		t.Fatal("TLSListen without TLSConfig: want an error")
	}
}

func TestEmbeddedTLSAndAuthentication(t *testing.T) {
	b, rec, pool := startSecureEmbedded(t)
	if b.Addr() == "" || b.TLSAddr() == "" || b.Addr() == b.TLSAddr() {
		t.Fatalf("addresses %q and %q", b.Addr(), b.TLSAddr())
	}

	// Over TLS, verified against the CA.
	o := deviceOpts(b.TLSAddr(), "dev-1")
	o.Servers = nil
	o.AddBroker("ssl://" + b.TLSAddr()).SetTLSConfig(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	c, code, _ := authDevice(t, o, "ok")
	if code != 0 {
		t.Fatalf("TLS connect: CONNACK %d", code)
	}
	pub := c.Publish(protocol.ReportedTopic("dev-1", "r1"), 1, false, `{}`)
	m := rec.next(t)
	if m.DeviceID != "dev-1" || m.Kind != protocol.KindReported {
		t.Fatalf("got %+v", m.Inbound)
	}
	m.Ack()
	waitToken(t, "publish", pub)

	// A refused client gets CONNACK 5 and is counted.
	before := testutil.ToFloat64(Refused.WithLabelValues(ReasonBadSignature))
	_, code, _ = authDevice(t, deviceOpts(b.Addr(), "dev-2"), "wrong")
	if code != 5 {
		t.Fatalf("refused client: CONNACK %d, want 5", code)
	}
	if got := testutil.ToFloat64(Refused.WithLabelValues(ReasonBadSignature)); got != before+1 {
		t.Errorf("refused_total{bad_signature} went from %v to %v", before, got)
	}
	// The reserved client id is refused, with a reason.
	before = testutil.ToFloat64(Refused.WithLabelValues(ReasonReservedClientID))
	if _, code, _ = authDevice(t, deviceOpts(b.Addr(), "inline"), "admin"); code != 5 {
		t.Errorf("client id inline: CONNACK %d, want 5", code)
	}
	if got := testutil.ToFloat64(Refused.WithLabelValues(ReasonReservedClientID)); got != before+1 {
		t.Errorf("refused_total{reserved_client_id} went from %v to %v", before, got)
	}
	// A certificate the client does not trust: the handshake fails.
	o = deviceOpts(b.TLSAddr(), "dev-1")
	o.Servers = nil
	o.AddBroker("ssl://" + b.TLSAddr()).SetTLSConfig(&tls.Config{MinVersion: tls.VersionTLS12})
	if tok := paho.NewClient(o).Connect(); !tok.WaitTimeout(waitTimeout) || tok.Error() == nil ||
		!strings.Contains(tok.Error().Error(), "certificate") {
		t.Errorf("untrusted certificate: connect error %v", tok.Error())
	}
}

func TestEmbeddedConfinesDevices(t *testing.T) {
	b, rec, _ := startSecureEmbedded(t)
	admin, code, _ := authDevice(t, deviceOpts(b.Addr(), "observer"), "admin")
	if code != 0 {
		t.Fatalf("admin: CONNACK %d", code)
	}
	seen := make(chan string, 10)
	waitToken(t, "admin subscribe", admin.Subscribe("kubetwin/v1/#", 1, func(_ paho.Client, m paho.Message) { seen <- m.Topic() }))

	dev, _, lost := authDevice(t, deviceOpts(b.Addr(), "dev-1"), "ok")
	sub := dev.SubscribeMultiple(map[string]byte{
		protocol.DesiredFilter("dev-1"): 1, protocol.ResponseFilter("dev-2"): 1, "kubetwin/v1/+/desired": 1, "$SYS/#": 1,
	}, nil)
	waitToken(t, "device subscribe", sub)
	for f, want := range map[string]byte{protocol.DesiredFilter("dev-1"): 1, protocol.ResponseFilter("dev-2"): 0x80,
		"kubetwin/v1/+/desired": 0x80, "$SYS/#": 0x80} {
		if got := sub.(*paho.SubscribeToken).Result()[f]; got != want {
			t.Errorf("SUBACK for %s = %#x, want %#x", f, got, want)
		}
	}
	// QoS 0 on another device's topic: dropped.
	denied := testutil.ToFloat64(Refused.WithLabelValues(ReasonPublishDenied))
	waitToken(t, "qos 0", dev.Publish(protocol.ReportedTopic("dev-2", "r0"), 0, false, `{}`))
	rec.none(t, 300*time.Millisecond)
	// QoS 1: dropped, and the MQTT 3.1.1 device disconnected.
	dev.Publish(protocol.ReportedTopic("dev-2", "r1"), 1, false, `{}`)
	select {
	case <-lost:
	case <-time.After(waitTimeout):
		t.Fatal("the device was not disconnected after a QoS 1 publish on another device's topic")
	}
	rec.none(t, 300*time.Millisecond)
	select {
	case topic := <-seen:
		t.Fatalf("the observer saw %s", topic)
	default:
	}
	if got := testutil.ToFloat64(Refused.WithLabelValues(ReasonPublishDenied)); got != denied+2 {
		t.Errorf("refused_total{publish_denied} went from %v to %v, want +2", denied, got)
	}
	// The operator's own publishes reach the device's own topics.
	dev2, _, _ := authDevice(t, deviceOpts(b.Addr(), "dev-3"), "ok")
	got := make(chan string, 1)
	waitToken(t, "subscribe", dev2.Subscribe(protocol.DesiredFilter("dev-3"), 1, func(_ paho.Client, m paho.Message) { got <- string(m.Payload()) }))
	if err := b.Publish(context.Background(), protocol.DesiredTopic("dev-3"), []byte(`{"$version":1}`), false); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-got:
		if p != `{"$version":1}` {
			t.Errorf("payload %s", p)
		}
	case <-time.After(waitTimeout):
		t.Fatal("the device did not get the operator's message")
	}
}

func TestEmbeddedRecheckAndExpiry(t *testing.T) {
	b, _, _ := startSecureEmbedded(t)
	_, _, lost := authDevice(t, deviceOpts(b.Addr(), "dev-1"), "ok")
	eventually(t, "dev-1 online", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.conns["dev-1"] != nil
	})
	var seen string
	if err := b.Recheck("dev-1", func(_ string, p []byte) error { seen = string(p); return nil }); err != nil {
		t.Fatal(err)
	}
	if seen != "ok" {
		t.Errorf("Recheck saw password %q, want the one the device connected with", seen)
	}
	select {
	case <-lost:
		t.Fatal("disconnected although the check passed")
	case <-time.After(200 * time.Millisecond):
	}
	if err := b.Recheck("dev-1", func(string, []byte) error { return context.DeadlineExceeded }); err == nil {
		t.Error("Recheck with a failing check: want the error")
	}
	before := testutil.ToFloat64(Refused.WithLabelValues(ReasonDisabled))
	if err := b.Recheck("dev-1", func(string, []byte) error { return Refuse(ReasonDisabled, "test") }); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost:
	case <-time.After(waitTimeout):
		t.Fatal("Recheck refused the device but it stayed connected")
	}
	if got := testutil.ToFloat64(Refused.WithLabelValues(ReasonDisabled)); got != before+1 {
		t.Errorf("refused_total{disabled} went from %v to %v", before, got)
	}
	if err := b.Recheck("nobody", func(string, []byte) error { t.Error("check called for a device that is not connected"); return nil }); err != nil {
		t.Fatal(err)
	}

	// A credential that expires ends the connection.
	_, code, lost := authDevice(t, deviceOpts(b.Addr(), "dev-2"), "ok-700ms")
	if code != 0 {
		t.Fatalf("CONNACK %d", code)
	}
	select {
	case <-lost:
	case <-time.After(waitTimeout):
		t.Fatal("the device stayed connected after its credential expired")
	}
	eventually(t, "sessions forgotten", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return len(b.sessions) == 0
	})
}
