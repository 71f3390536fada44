package bus

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// presenceEvent is one PresenceHandler call.
type presenceEvent struct {
	clientID string
	online   bool
}

// presenceLog records PresenceHandler calls.
type presenceLog struct {
	mu     sync.Mutex
	events []presenceEvent
}

func (p *presenceLog) handle(clientID string, online bool, _ time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.events = append(p.events, presenceEvent{clientID, online})
}

// of returns the events of one client id.
func (p *presenceLog) of(clientID string) []presenceEvent {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []presenceEvent
	for _, e := range p.events {
		if e.clientID == clientID {
			out = append(out, e)
		}
	}
	return out
}

// last reports the last event of clientID and whether there is one.
func (p *presenceLog) last(clientID string) (online, ok bool) {
	ev := p.of(clientID)
	if len(ev) == 0 {
		return false, false
	}
	return ev[len(ev)-1].online, true
}

// embeddedFixture is a running Embedded bus on a free port.
type embeddedFixture struct {
	bus      *Embedded
	rec      *recorder
	presence *presenceLog
	stop     func()
}

func startEmbedded(t *testing.T, ackTimeout time.Duration) *embeddedFixture {
	t.Helper()
	f := &embeddedFixture{rec: newRecorder(), presence: &presenceLog{}}
	b, err := NewEmbedded(EmbeddedOptions{
		Listen:     "127.0.0.1:0",
		Handler:    f.rec.handle,
		Presence:   f.presence.handle,
		Logger:     testLogger(t),
		AckTimeout: ackTimeout,
	})
	if err != nil {
		t.Fatal(err)
	}
	if b.Addr() != "" || b.Connected() {
		t.Fatalf("before Start: Addr %q, Connected %v", b.Addr(), b.Connected())
	}
	f.bus = b
	f.stop = runBus(t, b)
	select {
	case <-b.Ready():
	case <-time.After(waitTimeout):
		t.Fatal("embedded bus not ready")
	}
	if !b.Connected() {
		t.Fatal("Connected is false after Ready")
	}
	return f
}

func TestNewEmbeddedValidates(t *testing.T) {
	if _, err := NewEmbedded(EmbeddedOptions{}); err == nil {
		t.Fatal("NewEmbedded without Handler: want error")
	}
}

func TestEmbeddedQoS1AckedOnlyAfterAck(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	dev := connectDevice(t, deviceOpts(f.bus.Addr(), "dev-1"))

	payload := []byte(`{"temp":21.5}`)
	tok := dev.Publish(protocol.ReportedTopic("dev-1", "r1"), 1, false, payload)

	m := f.rec.next(t)
	want := protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindReported, RequestID: "r1"}
	if m.Inbound != want {
		t.Errorf("Inbound = %+v, want %+v", m.Inbound, want)
	}
	if string(m.Payload) != string(payload) {
		t.Errorf("Payload = %q, want %q", m.Payload, payload)
	}
	if m.Received.IsZero() || time.Since(m.Received) > time.Minute {
		t.Errorf("Received = %v", m.Received)
	}

	// The durability guarantee: no PUBACK before Ack.
	if tok.WaitTimeout(500 * time.Millisecond) {
		t.Fatalf("device's publish completed before Ack (err %v)", tok.Error())
	}
	m.Ack()
	m.Ack() // a second Ack is harmless
	waitToken(t, "publish after Ack", tok)
}

func TestEmbeddedEscapedDeviceID(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	dev := connectDevice(t, deviceOpts(f.bus.Addr(), "any"))
	id := "room/1+#%"
	tok := dev.Publish(protocol.GetTopic(id, "g1"), 1, false, []byte{})
	m := f.rec.next(t)
	if m.DeviceID != id || m.Kind != protocol.KindGet || m.RequestID != "g1" {
		t.Errorf("Inbound = %+v", m.Inbound)
	}
	m.Ack()
	waitToken(t, "publish", tok)
}

func TestEmbeddedQoS0DoesNotWait(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	dev := connectDevice(t, deviceOpts(f.bus.Addr(), "dev-1"))

	waitToken(t, "qos0 publish", dev.Publish(protocol.AckTopic("dev-1"), 0, false, []byte(`{"$version":3}`)))
	m := f.rec.next(t)
	if m.Kind != protocol.KindAck || string(m.Payload) != `{"$version":3}` {
		t.Errorf("message = %+v %q", m.Inbound, m.Payload)
	}
	// Never acked. The connection must still be read: a QoS 1 message
	// that follows arrives and completes once acked.
	tok := dev.Publish(protocol.ReportedTopic("dev-1", "r2"), 1, false, []byte(`{}`))
	m2 := f.rec.next(t)
	if m2.RequestID != "r2" {
		t.Fatalf("second message = %+v", m2.Inbound)
	}
	m2.Ack()
	waitToken(t, "qos1 publish", tok)
	m.Ack() // no-op for QoS 0
}

func TestEmbeddedOtherTopicsPassThrough(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	sub := connectDevice(t, deviceOpts(f.bus.Addr(), "watcher"))
	got := make(chan paho.Message, 10)
	waitToken(t, "subscribe", sub.Subscribe("#", 1, func(_ paho.Client, m paho.Message) { got <- m }))

	dev := connectDevice(t, deviceOpts(f.bus.Addr(), "dev-1"))
	for _, topic := range []string{
		"other/topic",
		protocol.Root + "/dev-1/reported",    // no request id
		protocol.Root + "/dev-1/unknown/x",   // no such kind
		protocol.ResponseTopic("dev-1", "1"), // operator-to-device topic
	} {
		// Completes without any Ack from the operator.
		waitToken(t, "publish "+topic, dev.Publish(topic, 1, false, []byte("x")))
		select {
		case m := <-got:
			if m.Topic() != topic {
				t.Errorf("subscriber got %q, want %q", m.Topic(), topic)
			}
		case <-time.After(waitTimeout):
			t.Fatalf("message on %q not forwarded", topic)
		}
	}
	f.rec.none(t, 200*time.Millisecond)
}

func TestEmbeddedAckedMessageIsForwarded(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	sub := connectDevice(t, deviceOpts(f.bus.Addr(), "watcher"))
	got := make(chan paho.Message, 10)
	waitToken(t, "subscribe", sub.Subscribe(protocol.PresenceTopic("dev-1"), 1, func(_ paho.Client, m paho.Message) { got <- m }))

	dev := connectDevice(t, deviceOpts(f.bus.Addr(), "dev-1"))
	tok := dev.Publish(protocol.PresenceTopic("dev-1"), 1, true, []byte(`{"online":true}`))
	f.rec.next(t).Ack()
	waitToken(t, "publish", tok)
	select {
	case m := <-got:
		if string(m.Payload()) != `{"online":true}` {
			t.Errorf("payload %q", m.Payload())
		}
	case <-time.After(waitTimeout):
		t.Fatal("acked message not forwarded to subscriber")
	}
}

func TestEmbeddedPublishRetained(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	ctx := context.Background()
	doc := []byte(`{"fan":"on","$version":7}`)
	if err := f.bus.Publish(ctx, protocol.DesiredTopic("dev-1"), doc, true); err != nil {
		t.Fatal(err)
	}
	if err := f.bus.Publish(ctx, protocol.DesiredPatchTopic("dev-1"), []byte(`{"$version":7}`), false); err != nil {
		t.Fatal(err)
	}
	f.rec.none(t, 100*time.Millisecond) // the operator's own messages are not delivered back

	// A device that subscribes later gets the retained document only.
	dev := connectDevice(t, deviceOpts(f.bus.Addr(), "dev-1"))
	got := make(chan paho.Message, 10)
	waitToken(t, "subscribe", dev.Subscribe(protocol.DesiredFilter("dev-1"), 1, func(_ paho.Client, m paho.Message) { got <- m }))
	select {
	case m := <-got:
		if m.Topic() != protocol.DesiredTopic("dev-1") || string(m.Payload()) != string(doc) || !m.Retained() || m.Qos() != 1 {
			t.Errorf("got %q %q retained=%v qos=%d", m.Topic(), m.Payload(), m.Retained(), m.Qos())
		}
	case <-time.After(waitTimeout):
		t.Fatal("retained desired document not delivered")
	}

	// A live publish reaches the subscribed device at QoS 1.
	if err := f.bus.Publish(ctx, protocol.DesiredPatchTopic("dev-1"), []byte(`{"fan":"off","$version":8}`), false); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		if m.Topic() != protocol.DesiredPatchTopic("dev-1") || m.Retained() || m.Qos() != 1 {
			t.Errorf("got %q retained=%v qos=%d", m.Topic(), m.Retained(), m.Qos())
		}
	case <-time.After(waitTimeout):
		t.Fatal("desired patch not delivered")
	}
	select {
	case m := <-got:
		t.Errorf("unexpected %q", m.Topic())
	case <-time.After(100 * time.Millisecond):
	}
}

func TestEmbeddedPublishWhenStopped(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	f.stop()
	if f.bus.Connected() {
		t.Error("Connected after stop")
	}
	if err := f.bus.Publish(context.Background(), protocol.DesiredTopic("d"), []byte("{}"), true); err == nil {
		t.Error("Publish after stop: want error")
	}
	if err := f.bus.Start(context.Background()); err == nil {
		t.Error("second Start: want error")
	}
}

func TestEmbeddedPresence(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	dev := connectDevice(t, deviceOpts(f.bus.Addr(), "dev-p"))
	eventually(t, "dev-p is online", func() bool { on, ok := f.presence.last("dev-p"); return ok && on })
	dev.Disconnect(0)
	eventually(t, "dev-p is offline", func() bool { on, ok := f.presence.last("dev-p"); return ok && !on })
	if ev := f.presence.of("dev-p"); len(ev) != 2 {
		t.Errorf("events = %+v, want online then offline", ev)
	}
	if ev := f.presence.of(""); len(ev) != 0 {
		t.Errorf("events without client id: %+v", ev)
	}
}

func TestEmbeddedPresenceTakeOver(t *testing.T) {
	for _, clean := range []bool{true, false} {
		t.Run(fmt.Sprintf("clean=%v", clean), func(t *testing.T) {
			f := startEmbedded(t, time.Minute)
			const id = "dev-t"
			var last paho.Client
			for i := range 5 {
				// Each new connection takes over the session of the one
				// before, whose disconnect mochi reports afterwards.
				c := connectDevice(t, deviceOpts(f.bus.Addr(), id).SetCleanSession(clean))
				last = c
				eventually(t, "the new connection is reported", func() bool {
					ev := f.presence.of(id)
					n := 0
					for _, e := range ev {
						if e.online {
							n++
						}
					}
					return n == i+1
				})
				time.Sleep(100 * time.Millisecond) // let the old connection's disconnect run
				if on, _ := f.presence.last(id); !on {
					t.Fatalf("after take-over %d: last event is offline; events %+v", i, f.presence.of(id))
				}
			}
			last.Disconnect(0)
			eventually(t, "offline after the last connection ends", func() bool {
				on, ok := f.presence.last(id)
				return ok && !on
			})
		})
	}
}

func TestEmbeddedRefusesInlineClientID(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	c := paho.NewClient(deviceOpts(f.bus.Addr(), "inline"))
	tok := c.Connect()
	if !tok.WaitTimeout(waitTimeout) {
		t.Fatal("connect timed out")
	}
	if tok.Error() == nil {
		c.Disconnect(0)
		t.Fatal("client id \"inline\" was accepted")
	}
}

func TestEmbeddedAckTimeoutMakesDeviceResend(t *testing.T) {
	f := startEmbedded(t, 300*time.Millisecond)
	o := deviceOpts(f.bus.Addr(), "dev-r").
		SetCleanSession(false).
		SetAutoReconnect(true).
		SetMaxReconnectInterval(200 * time.Millisecond)
	dev := connectDevice(t, o)

	dev.Publish(protocol.ReportedTopic("dev-r", "r1"), 1, false, []byte(`{"a":1}`))
	first := f.rec.next(t)
	// Not acked in time: the broker drops it, without PUBACK, and closes
	// the connection; the device reconnects and resends. (paho completes
	// the device's original token, without error, when it resends after a
	// reconnect, so the token says nothing here.)
	second := f.rec.next(t)
	if second.Inbound != first.Inbound || string(second.Payload) != string(first.Payload) {
		t.Fatalf("resent message %+v %q differs from %+v %q", second.Inbound, second.Payload, first.Inbound, first.Payload)
	}
	first.Ack() // too late: no effect
	second.Ack()
	// Acknowledged this time: no further resend.
	f.rec.none(t, time.Second)
	if !dev.IsConnectionOpen() {
		t.Error("device not connected")
	}
}

func TestEmbeddedLateAckBeyondKeepalive(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	// mochi's read/write deadline is 1.5 x keepalive (3s) from when it
	// started reading: an Ack after that must still get the PUBACK out.
	o := deviceOpts(f.bus.Addr(), "dev-k").
		SetKeepAlive(2 * time.Second).
		SetPingTimeout(10 * time.Second)
	dev := connectDevice(t, o)
	tok := dev.Publish(protocol.ReportedTopic("dev-k", "r1"), 1, false, []byte(`{}`))
	m := f.rec.next(t)
	time.Sleep(3500 * time.Millisecond)
	m.Ack()
	waitToken(t, "publish", tok)
	if !dev.IsConnectionOpen() {
		t.Error("device lost its connection")
	}
	f.rec.none(t, 300*time.Millisecond)
}

func TestEmbeddedStopReleasesWaitingPublish(t *testing.T) {
	f := startEmbedded(t, time.Hour)
	dev := connectDevice(t, deviceOpts(f.bus.Addr(), "dev-s"))
	tok := dev.Publish(protocol.ReportedTopic("dev-s", "r1"), 1, false, []byte(`{}`))
	m := f.rec.next(t)
	start := time.Now()
	f.stop() // fails the test if Start does not return
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("stop took %v", d)
	}
	m.Ack() // after stop: harmless
	if tok.WaitTimeout(200*time.Millisecond) && tok.Error() == nil {
		t.Error("publish acknowledged although the broker stopped before Ack")
	}
}

func TestEmbeddedListenError(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	b, err := NewEmbedded(EmbeddedOptions{Listen: f.bus.Addr(), Handler: func(Message) {}, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(context.Background()); err == nil {
		t.Fatal("Start on a busy address: want error")
	}
}
