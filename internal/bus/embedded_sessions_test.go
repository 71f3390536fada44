package bus

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// fakeClock is a settable clock for the session sweep.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }

func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// startSessionBroker runs an Embedded bus (auth may be nil) with the
// given session options, a fake clock and a fast sweep.
func startSessionBroker(t *testing.T, so SessionOptions, auth Authenticator) (*Embedded, *fakeClock, *recorder) {
	t.Helper()
	return startSessionBrokerSweeping(t, so, auth, 20*time.Millisecond)
}

// startSessionBrokerSweeping is startSessionBroker with a sweep interval.
func startSessionBrokerSweeping(t *testing.T, so SessionOptions, auth Authenticator, sweep time.Duration) (*Embedded, *fakeClock, *recorder) {
	t.Helper()
	rec := newRecorder()
	o := EmbeddedOptions{Listen: "127.0.0.1:0", Handler: rec.handle, Logger: testLogger(t), Sessions: so}
	if auth != nil {
		o.Auth = auth
	}
	b, err := NewEmbedded(o)
	if err != nil {
		t.Fatal(err)
	}
	clk := &fakeClock{t: time.Unix(1_000_000, 0)}
	b.sess.now = clk.now
	b.sess.sweepEvery = sweep
	runBus(t, b)
	select {
	case <-b.Ready():
	case <-time.After(waitTimeout):
		t.Fatal("embedded bus not ready")
	}
	return b, clk, rec
}

// hasOfflineSession reports whether the broker records an offline session
// of id.
func (e *Embedded) hasOfflineSession(id string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.sess.offline[id] != nil
}

// hasSession reports whether mochi still holds a session (client) for id
// and how many of id's desired topics the topic index still routes to it.
func hasSession(e *Embedded, id string) (held bool, subs int) {
	_, held = e.server.Clients.Get(id)
	for _, topic := range []string{protocol.DesiredTopic(id), protocol.DesiredPatchTopic(id)} {
		if _, ok := e.server.Topics.Subscribers(topic).Subscriptions[id]; ok {
			subs++
		}
	}
	return held, subs
}

// persistentDevice connects id with clean=false, subscribes to its desired
// topics and returns the client (still connected).
func persistentDevice(t *testing.T, addr, id, password string) paho.Client {
	t.Helper()
	o := deviceOpts(addr, id).SetCleanSession(false)
	if password != "" {
		o.SetUsername(id).SetPassword(password)
	}
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
		t.Fatalf("connect %s: %v", id, tok.Error())
	}
	waitToken(t, "subscribe", c.Subscribe(protocol.DesiredFilter(id), 1, func(paho.Client, paho.Message) {}))
	return c
}

func TestEmbeddedPersistentSessionsExpire(t *testing.T) {
	const n = 300
	b, clk, _ := startSessionBroker(t, SessionOptions{Expiry: time.Hour}, nil)
	expired := testutil.ToFloat64(sessionsEnded.WithLabelValues(sessionEndExpired))

	// n devices connect once with clean=false, subscribe and leave.
	ids := make(chan string, n)
	for i := range n {
		ids <- fmt.Sprintf("once-%03d", i)
	}
	close(ids)
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range ids {
				persistentDevice(t, b.Addr(), id, "").Disconnect(0)
			}
		}()
	}
	wg.Wait()
	eventually(t, "every session is recorded offline", func() bool {
		for i := range n {
			if !b.hasOfflineSession(fmt.Sprintf("once-%03d", i)) {
				return false
			}
		}
		return true
	})
	b.updateSessionMetrics()
	if got := testutil.ToFloat64(sessionsGauge.WithLabelValues("offline")); got != n {
		t.Errorf("offline sessions gauge = %v, want %d", got, n)
	}

	// Just before the expiry they are all still held.
	clk.add(time.Hour - time.Second)
	b.expireSessions()
	for i := range n {
		if held, subs := hasSession(b, fmt.Sprintf("once-%03d", i)); !held || subs == 0 {
			t.Fatalf("session of once-%03d gone before its expiry (held %v, subscriptions %d)", i, held, subs)
		}
	}

	// At the expiry they go, with their subscriptions.
	clk.add(time.Second)
	eventually(t, "every session has expired", func() bool {
		for i := range n {
			if held, subs := hasSession(b, fmt.Sprintf("once-%03d", i)); held || subs > 0 {
				return false
			}
		}
		return true
	})
	if got := testutil.ToFloat64(sessionsEnded.WithLabelValues(sessionEndExpired)) - expired; got != n {
		t.Errorf("expired sessions counted: %v, want %d", got, n)
	}
	b.updateSessionMetrics()
	if got := testutil.ToFloat64(sessionsGauge.WithLabelValues("offline")); got != 0 {
		t.Errorf("offline sessions gauge = %v after expiry, want 0", got)
	}
}

func TestEmbeddedResumedSessionDoesNotExpire(t *testing.T) {
	b, clk, _ := startSessionBroker(t, SessionOptions{Expiry: time.Hour}, nil)
	persistentDevice(t, b.Addr(), "back", "").Disconnect(0)
	eventually(t, "the session is offline", func() bool { return b.hasOfflineSession("back") })
	clk.add(30 * time.Minute)

	// The device returns and stays: its session is no longer offline.
	c := persistentDevice(t, b.Addr(), "back", "")
	t.Cleanup(func() { c.Disconnect(0) })
	clk.add(2 * time.Hour)
	b.expireSessions()
	if held, subs := hasSession(b, "back"); !held || subs == 0 {
		t.Fatalf("the session of a connected device expired (held %v, subscriptions %d)", held, subs)
	}
	if !c.IsConnectionOpen() {
		t.Fatal("the connected device was disconnected")
	}
}

func TestEmbeddedSessionQueueIsCapped(t *testing.T) {
	b, _, _ := startSessionBroker(t, SessionOptions{Expiry: time.Hour, MaxQueue: 64}, nil)
	dropped := testutil.ToFloat64(sessionQueueDropped)
	persistentDevice(t, b.Addr(), "away", "").Disconnect(0)
	eventually(t, "the session is offline", func() bool { return b.hasOfflineSession("away") })

	// 200 desired patches for the offline device: only 64 are kept.
	for v := range 200 {
		if err := b.Publish(context.Background(), protocol.DesiredPatchTopic("away"), fmt.Appendf(nil, `{"$version":%d}`, v+1), false); err != nil {
			t.Fatal(err)
		}
	}
	cl, ok := b.server.Clients.Get("away")
	if !ok {
		t.Fatal("no session")
	}
	if got := cl.State.Inflight.Len(); got != 64 {
		t.Fatalf("%d messages queued for the offline session, want 64", got)
	}
	b.updateSessionMetrics()
	if got := testutil.ToFloat64(sessionQueueDropped) - dropped; got != 136 {
		t.Errorf("dropped messages counted: %v, want 136", got)
	}

	// The device gets the 64 kept when it returns.
	got := make(chan struct{}, 200)
	o := deviceOpts(b.Addr(), "away").SetCleanSession(false).
		SetDefaultPublishHandler(func(paho.Client, paho.Message) { got <- struct{}{} })
	c := connectDevice(t, o)
	_ = c
	for i := range 64 {
		select {
		case <-got:
		case <-time.After(waitTimeout):
			t.Fatalf("got %d queued messages, want 64", i)
		}
	}
}

// refuseAs returns a Recheck check that refuses with reason.
func refuseAs(reason string) func(string, []byte) error {
	return func(string, []byte) error { return Refuse(reason, "test") }
}

func TestEmbeddedRemovedDeviceSessionEndsAtOnce(t *testing.T) {
	b, _, _ := startSessionBroker(t, SessionOptions{Expiry: time.Hour}, &fakeAuth{})
	removed := testutil.ToFloat64(sessionsEnded.WithLabelValues(sessionEndDeviceRemoved))

	// Offline devices: a deleted and a disabled one lose their sessions
	// at once; a re-keyed one keeps it (it reconnects with a new token).
	for _, id := range []string{"deleted", "disabled", "rekeyed"} {
		persistentDevice(t, b.Addr(), id, "ok").Disconnect(0)
		eventually(t, id+" is offline", func() bool { return b.hasOfflineSession(id) })
	}
	for id, reason := range map[string]string{"deleted": ReasonUnknownDevice, "disabled": ReasonDisabled, "rekeyed": ReasonBadSignature} {
		if err := b.Recheck(id, refuseAs(reason)); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"deleted", "disabled"} {
		if held, subs := hasSession(b, id); held || subs > 0 {
			t.Errorf("offline %s device: session still held (%v, %d subscriptions)", id, held, subs)
		}
	}
	if held, _ := hasSession(b, "rekeyed"); !held {
		t.Error("the re-keyed device's session ended")
	}

	// A connected device that is deleted: disconnected, session gone.
	lost := make(chan struct{})
	o := deviceOpts(b.Addr(), "live").SetCleanSession(false).SetUsername("live").SetPassword("ok").
		SetConnectionLostHandler(func(paho.Client, error) { close(lost) })
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
		t.Fatalf("connect: %v", tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(0) })
	waitToken(t, "subscribe", c.Subscribe(protocol.DesiredFilter("live"), 1, func(paho.Client, paho.Message) {}))
	if err := b.Recheck("live", refuseAs(ReasonUnknownDevice)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost:
	case <-time.After(waitTimeout):
		t.Fatal("deleted device not disconnected")
	}
	eventually(t, "the deleted device's session is gone", func() bool {
		held, subs := hasSession(b, "live")
		return !held && subs == 0
	})
	if got := testutil.ToFloat64(sessionsEnded.WithLabelValues(sessionEndDeviceRemoved)) - removed; got != 3 {
		t.Errorf("removed sessions counted: %v, want 3", got)
	}
}

func TestSessionOptionsValidate(t *testing.T) {
	for _, o := range []SessionOptions{{Expiry: time.Millisecond}, {Expiry: -time.Hour}, {MaxQueue: -1}, {MaxQueue: 70000}} {
		if _, err := NewEmbedded(EmbeddedOptions{Handler: func(Message) {}, Sessions: o}); err == nil {
			t.Errorf("%+v: want an error", o)
		}
	}
	o, err := SessionOptions{}.withDefaults()
	if err != nil || o.Expiry != DefaultSessionExpiry || o.MaxQueue != DefaultMaxSessionQueue {
		t.Errorf("defaults: %+v %v", o, err)
	}
}

func TestEmbeddedMQTT5SessionExpiryIsCapped(t *testing.T) {
	b, clk, _ := startSessionBroker(t, SessionOptions{Expiry: time.Hour}, nil)
	conn, err := net.DialTimeout("tcp", b.Addr(), waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	c := &rawClient{t: t, conn: conn, r: bufio.NewReader(conn), version: 5}
	// An MQTT 5 client asks to be kept forever.
	c.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect:     packets.ConnectParams{ProtocolName: []byte("MQTT"), Keepalive: 60, ClientIdentifier: "v5"},
		Properties:  packets.Properties{SessionExpiryInterval: math.MaxUint32, SessionExpiryIntervalFlag: true},
	})
	raw := c.read(waitTimeout)
	connack := packets.Packet{ProtocolVersion: 5, FixedHeader: packets.FixedHeader{Type: packets.Connack}}
	if len(raw) < 4 || raw[0]>>4 != packets.Connack {
		t.Fatalf("CONNACK: got % x", raw)
	}
	if err := connack.ConnackDecode(raw[2:]); err != nil {
		t.Fatal(err)
	}
	want := uint32((time.Hour + sessionExpirySlack).Seconds())
	if p := connack.Properties; !p.SessionExpiryIntervalFlag || p.SessionExpiryInterval != want {
		t.Errorf("CONNACK session expiry %d (flag %v), want %d", p.SessionExpiryInterval, p.SessionExpiryIntervalFlag, want)
	}
	_ = conn.Close()
	eventually(t, "the session is offline", func() bool { return b.hasOfflineSession("v5") })
	clk.add(time.Hour)
	eventually(t, "the session has expired", func() bool {
		_, held := b.server.Clients.Get("v5")
		return !held
	})
}

func TestEmbeddedSessionExpiryRacesReconnects(t *testing.T) {
	const devices, rounds = 20, 10
	// Sweeps all the time while devices reconnect.
	b, clk, _ := startSessionBrokerSweeping(t, SessionOptions{Expiry: time.Hour}, nil, time.Millisecond)
	for round := range rounds {
		var wg sync.WaitGroup
		clients := make([]paho.Client, devices)
		for i := range devices {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id := fmt.Sprintf("race-%02d", i)
				if round > 0 {
					clk.add(time.Hour / devices) // sessions fall due while others connect
				}
				clients[i] = persistentDevice(t, b.Addr(), id, "")
			}()
		}
		wg.Wait()
		// Every connected device is registered with the broker (an expiry
		// never removes a resumed session) and gets what is published to it.
		for i, c := range clients {
			id := fmt.Sprintf("race-%02d", i)
			cl, ok := b.server.Clients.Get(id)
			if !ok || cl.Closed() {
				t.Fatalf("round %d: connected device %s is not registered", round, id)
			}
			if held, subs := hasSession(b, id); !held || subs == 0 {
				t.Fatalf("round %d: device %s lost its subscriptions", round, id)
			}
			c.Disconnect(0)
		}
		eventually(t, "every session is offline", func() bool {
			for i := range devices {
				if !b.hasOfflineSession(fmt.Sprintf("race-%02d", i)) {
					return false
				}
			}
			return true
		})
	}
}

func TestEmbeddedSessionNotExpiredWhileBeingResumed(t *testing.T) {
	b, clk, _ := startSessionBroker(t, SessionOptions{Expiry: time.Hour}, nil)
	persistentDevice(t, b.Addr(), "resuming", "").Disconnect(0)
	eventually(t, "the session is offline", func() bool { return b.hasOfflineSession("resuming") })

	// A connection for the same client id is between OnSessionEstablish
	// and OnSessionEstablished (mochi is handing it the session) when the
	// session falls due: the sweep must leave it alone.
	conn, peer := net.Pipe()
	t.Cleanup(func() { _ = conn.Close(); _ = peer.Close() })
	resuming := b.server.NewClient(conn, "test", "resuming", false)
	(&sessionsHook{e: b}).OnSessionEstablish(resuming, packets.Packet{})
	clk.add(2 * time.Hour)
	b.expireSessions()
	if held, subs := hasSession(b, "resuming"); !held || subs == 0 {
		t.Fatal("the session expired while a connection was resuming it")
	}

	// That connection fails before CONNACK: the session expires after all.
	resuming.Stop(nil)
	b.expireSessions()
	if held, subs := hasSession(b, "resuming"); held || subs > 0 {
		t.Fatal("the session was kept after the resuming connection failed")
	}
}
