package bus_test

import (
	"context"
	"errors"
	"net/url"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/go-logr/logr/testr"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/deviceauth"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// The embedded broker with the real SAS Authenticator: what a device
// sends, what it gets.

const sasHub = "hub.example"

// startSASBroker runs an embedded broker that knows the given device ids,
// all with key, and bounds token lifetimes to a year.
func startSASBroker(t *testing.T, key string, ids ...string) *bus.Embedded {
	t.Helper()
	known := map[string]bool{}
	for _, id := range ids {
		known[id] = true
	}
	auth := &deviceauth.Authenticator{HubHostname: sasHub, MaxTokenLifetime: sas.DefaultMaxLifetime,
		Lookup: func(_ context.Context, id string) (deviceauth.Device, error) {
			if !known[id] {
				return deviceauth.Device{}, errors.New("unknown device")
			}
			return deviceauth.Device{ID: id, PrimaryKey: key}, nil
		}}
	b, err := bus.NewEmbedded(bus.EmbeddedOptions{Listen: "127.0.0.1:0", Auth: auth, Handler: func(m bus.Message) { m.Ack() },
		Logger: testr.New(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Start(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-b.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("embedded bus not ready")
	}
	return b
}

// connack connects as id with the IoT Hub username and a password, and
// returns the CONNACK code.
func connack(t *testing.T, b *bus.Embedded, id, password string) byte {
	t.Helper()
	o := paho.NewClientOptions().AddBroker("tcp://" + b.Addr()).SetClientID(id).SetProtocolVersion(4).
		SetUsername(sasHub + "/" + id + "/?api-version=2021-04-12").SetPassword(password).
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		t.Fatalf("%s: no CONNACK", id)
	}
	if tok.Error() == nil {
		c.Disconnect(0)
	}
	return tok.(*paho.ConnectToken).ReturnCode()
}

// TestEmbeddedSASTokenLifetime: a device token that expires further ahead
// than the bound gets CONNACK 5 (not authorized) and is counted under its
// reason; one within it connects.
func TestEmbeddedSASTokenLifetime(t *testing.T) {
	key := sas.NewKey()
	b := startSASBroker(t, key, "dev-1")
	sign := func(valid time.Duration) string {
		tok, err := sas.SignDevice(sasHub, "dev-1", key, time.Now().Add(valid))
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	before := testutil.ToFloat64(bus.Refused.WithLabelValues(bus.ReasonTokenLifetime))
	if code := connack(t, b, "dev-1", sign(100*365*24*time.Hour)); code != 5 {
		t.Errorf("100-year token: CONNACK %d, want 5", code)
	}
	if got := testutil.ToFloat64(bus.Refused.WithLabelValues(bus.ReasonTokenLifetime)); got != before+1 {
		t.Errorf("refused_total{%s} went from %v to %v, want +1", bus.ReasonTokenLifetime, before, got)
	}
	if code := connack(t, b, "dev-1", sign(364*24*time.Hour)); code != 0 {
		t.Errorf("364-day token: CONNACK %d, want 0", code)
	}
}

// TestEmbeddedEscapedDeviceIDs: devices whose ids hold "%XX" or "+"
// connect with tokens signed the documented way (sr is the URL-encoded
// "<host>/devices/<id>") and with the id encoded once more.
func TestEmbeddedEscapedDeviceIDs(t *testing.T) {
	key := sas.NewKey()
	ids := []string{"a%41", "a%2Fb", "a+b"}
	b := startSASBroker(t, key, ids...)
	k, _ := sas.DecodeKey(key)
	exp := time.Now().Add(time.Hour)
	for _, id := range ids {
		if code := connack(t, b, id, sas.Sign(sas.DeviceResource(sasHub, id), k, exp, "")); code != 0 {
			t.Errorf("%s, documented token: CONNACK %d, want 0", id, code)
		}
		if code := connack(t, b, id, sas.Sign(sas.DeviceResource(sasHub, url.QueryEscape(id)), k, exp, "")); code != 0 {
			t.Errorf("%s, id encoded twice: CONNACK %d, want 0", id, code)
		}
	}
}
