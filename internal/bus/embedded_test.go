package bus

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

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
	m := f.rec.next(t)
	select {
	case m := <-got:
		t.Fatalf("message forwarded before Ack: %q", m.Payload())
	case <-time.After(300 * time.Millisecond):
	}
	if n := len(f.bus.server.Topics.Messages(protocol.PresenceTopic("dev-1"))); n != 0 {
		t.Fatalf("message retained before Ack (%d retained)", n)
	}
	m.Ack()
	waitToken(t, "publish", tok)
	select {
	case m := <-got:
		if string(m.Payload()) != `{"online":true}` {
			t.Errorf("payload %q", m.Payload())
		}
	case <-time.After(waitTimeout):
		t.Fatal("acked message not forwarded to subscriber")
	}
	// Retained as well: a later subscriber gets it.
	late := connectDevice(t, deviceOpts(f.bus.Addr(), "late"))
	gotLate := make(chan paho.Message, 10)
	waitToken(t, "subscribe", late.Subscribe(protocol.PresenceTopic("dev-1"), 1, func(_ paho.Client, m paho.Message) { gotLate <- m }))
	select {
	case m := <-gotLate:
		if string(m.Payload()) != `{"online":true}` || !m.Retained() {
			t.Errorf("retained %q retained=%v", m.Payload(), m.Retained())
		}
	case <-time.After(waitTimeout):
		t.Fatal("acked retained message not retained")
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

// disconnectCounter counts the connections whose OnDisconnect mochi has
// run. Added after Embedded's own hooks, it runs after them for the same
// connection, so a count of n means Embedded has handled n disconnects.
type disconnectCounter struct {
	mqtt.HookBase
	mu sync.Mutex
	n  map[string]int
}

func (d *disconnectCounter) ID() string           { return "test-disconnect-counter" }
func (d *disconnectCounter) Provides(b byte) bool { return b == mqtt.OnDisconnect }
func (d *disconnectCounter) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.n[cl.ID]++
}

func (d *disconnectCounter) of(id string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.n[id]
}

func TestEmbeddedPresenceTakeOver(t *testing.T) {
	for _, clean := range []bool{true, false} {
		t.Run(fmt.Sprintf("clean=%v", clean), func(t *testing.T) {
			f := startEmbedded(t, time.Minute)
			disconnects := &disconnectCounter{n: map[string]int{}}
			if err := f.bus.server.AddHook(disconnects, nil); err != nil {
				t.Fatal(err)
			}
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
				// The old connection's disconnect has run: it must not
				// have reported the device offline.
				eventually(t, "the old connection's disconnect is handled", func() bool { return disconnects.of(id) == i })
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

func TestEmbeddedQoS1ManyOutstanding(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	watcher := connectDevice(t, deviceOpts(f.bus.Addr(), "watcher"))
	got := make(chan paho.Message, 100)
	waitToken(t, "subscribe", watcher.Subscribe(protocol.Root+"/dev-m/reported/+", 1, func(_ paho.Client, m paho.Message) { got <- m }))

	dev := connectDevice(t, deviceOpts(f.bus.Addr(), "dev-m"))
	const n = 50
	toks := make([]paho.Token, n)
	for i := range n {
		toks[i] = dev.Publish(protocol.ReportedTopic("dev-m", fmt.Sprint(i)), 1, false, fmt.Appendf(nil, `{"i":%d}`, i))
	}
	// All of them reach the Handler, in order, while none is acknowledged.
	msgs := make([]Message, n)
	for i := range n {
		msgs[i] = f.rec.next(t)
		if want := fmt.Sprint(i); msgs[i].RequestID != want {
			t.Fatalf("message %d has request id %q, want %q", i, msgs[i].RequestID, want)
		}
	}
	for i, tok := range toks {
		if tok.WaitTimeout(0) {
			t.Fatalf("publish %d completed before any Ack (err %v)", i, tok.Error())
		}
	}
	select {
	case m := <-got:
		t.Fatalf("%q forwarded before Ack", m.Topic())
	case <-time.After(200 * time.Millisecond):
	}

	for _, m := range msgs {
		m.Ack()
	}
	for i, tok := range toks {
		waitToken(t, fmt.Sprintf("publish %d", i), tok)
	}
	// Forwarded in Ack order, each once.
	for i := range n {
		select {
		case m := <-got:
			if want := protocol.ReportedTopic("dev-m", fmt.Sprint(i)); m.Topic() != want {
				t.Fatalf("forwarded message %d is %q, want %q", i, m.Topic(), want)
			}
		case <-time.After(waitTimeout):
			t.Fatalf("message %d not forwarded", i)
		}
	}
	select {
	case m := <-got:
		t.Fatalf("extra forwarded message %q", m.Topic())
	case <-time.After(200 * time.Millisecond):
	}
	f.rec.none(t, 100*time.Millisecond)
}

func TestEmbeddedUnackedQoS1ResentAfterReconnect(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	watcher := connectDevice(t, deviceOpts(f.bus.Addr(), "watcher"))
	got := make(chan paho.Message, 10)
	waitToken(t, "subscribe", watcher.Subscribe(protocol.Root+"/dev-r/reported/+", 1, func(_ paho.Client, m paho.Message) { got <- m }))

	o := deviceOpts(f.bus.Addr(), "dev-r").
		SetCleanSession(false).
		SetAutoReconnect(true).
		SetMaxReconnectInterval(200 * time.Millisecond)
	dev := connectDevice(t, o)

	dev.Publish(protocol.ReportedTopic("dev-r", "r1"), 1, false, []byte(`{"a":1}`))
	first := f.rec.next(t)
	// The connection drops before the operator acknowledges: the device
	// reconnects and resends. (paho completes the device's original token,
	// without error, when it resends after a reconnect, so the token says
	// nothing here.)
	cl, ok := f.bus.server.Clients.Get("dev-r")
	if !ok {
		t.Fatal("no broker client dev-r")
	}
	cl.Stop(errors.New("test drops the connection"))
	second := f.rec.next(t)
	if second.Inbound != first.Inbound || string(second.Payload) != string(first.Payload) {
		t.Fatalf("resent message %+v %q differs from %+v %q", second.Inbound, second.Payload, first.Inbound, first.Payload)
	}
	first.Ack() // too late: neither PUBACK nor forward
	select {
	case m := <-got:
		t.Fatalf("late Ack forwarded %q", m.Topic())
	case <-time.After(300 * time.Millisecond):
	}
	second.Ack()
	select {
	case m := <-got:
		if string(m.Payload()) != `{"a":1}` {
			t.Errorf("forwarded %q", m.Payload())
		}
	case <-time.After(waitTimeout):
		t.Fatal("acknowledged resend not forwarded")
	}
	// Acknowledged this time: no further resend, once forwarded.
	f.rec.none(t, time.Second)
	select {
	case m := <-got:
		t.Fatalf("forwarded again: %q", m.Topic())
	default:
	}
	if !dev.IsConnectionOpen() {
		t.Error("device not connected")
	}
}

// rawClient is a bare MQTT connection, for what paho cannot do: MQTT 5,
// and looking at the exact bytes the broker sends.
type rawClient struct {
	t       *testing.T
	conn    net.Conn
	r       *bufio.Reader
	version byte
}

// dialRaw connects a rawClient with a clean session and checks the CONNACK.
func dialRaw(t *testing.T, addr, clientID string, version byte) *rawClient {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	c := &rawClient{t: t, conn: conn, r: bufio.NewReader(conn), version: version}
	c.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			Clean:            true,
			Keepalive:        60,
			ClientIdentifier: clientID,
		},
	})
	b := c.read(waitTimeout)
	if len(b) < 4 || b[0]>>4 != packets.Connack || b[3] != 0 { // byte 3: return (reason) code
		t.Fatalf("CONNACK: got % x", b)
	}
	return c
}

// send encodes and writes pk.
func (c *rawClient) send(pk packets.Packet) {
	c.t.Helper()
	pk.ProtocolVersion = c.version
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	default:
		c.t.Fatalf("rawClient cannot send packet type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	if _, err := c.conn.Write(buf.Bytes()); err != nil {
		c.t.Fatal(err)
	}
}

// read returns the next packet's bytes, or nil if none comes within d.
func (c *rawClient) read(d time.Duration) []byte {
	c.t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(d))
	first, err := c.r.ReadByte()
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil
		}
		c.t.Fatalf("read: %v", err)
	}
	n, _, err := packets.DecodeLength(c.r)
	if err != nil {
		c.t.Fatalf("read length: %v", err)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(c.r, body); err != nil {
		c.t.Fatalf("read body: %v", err)
	}
	return append([]byte{first, byte(n)}, body...) // n < 128 here
}

// publishQoS1 sends a QoS 1 PUBLISH with the given packet id.
func (c *rawClient) publishQoS1(topic string, id uint16, payload []byte) {
	c.t.Helper()
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		TopicName:   topic,
		PacketID:    id,
		Payload:     payload,
	}
	if c.version == 5 {
		// mochi's own PUBACK would echo these.
		pk.Properties.User = []packets.UserProperty{{Key: "k", Val: "v"}}
		pk.Properties.ContentType = "application/json"
	}
	c.send(pk)
}

func TestEmbeddedRawPubackInAckOrder(t *testing.T) {
	for _, version := range []byte{4, 5} {
		t.Run(fmt.Sprintf("version=%d", version), func(t *testing.T) {
			f := startEmbedded(t, time.Minute)
			c := dialRaw(t, f.bus.Addr(), "dev-v", version)
			const n = 5
			for id := uint16(1); id <= n; id++ {
				c.publishQoS1(protocol.ReportedTopic("dev-v", fmt.Sprint(id)), id, []byte(`{}`))
			}
			msgs := make([]Message, n)
			for i := range msgs {
				msgs[i] = f.rec.next(t)
			}
			if b := c.read(300 * time.Millisecond); b != nil {
				t.Fatalf("got % x before any Ack", b)
			}
			// Acked in arrival order, but one at a time: each PUBACK is out
			// before the next Ack.
			for i, m := range msgs {
				m.Ack()
				b := c.read(waitTimeout)
				// PUBACK, remaining length 2, packet id; an MQTT 5 PUBACK
				// with reason Success and no properties may omit both.
				if want := []byte{packets.Puback << 4, 2, 0, byte(i + 1)}; !bytes.Equal(b, want) {
					t.Fatalf("after Ack %d: got % x, want % x", i, b, want)
				}
			}
			if b := c.read(200 * time.Millisecond); b != nil {
				t.Fatalf("extra packet % x", b)
			}
		})
	}
}

func TestEmbeddedQoS1BeyondReceiveMaximum(t *testing.T) {
	// mochi counts a client's unacknowledged QoS messages against its
	// receive maximum (1024) and disconnects a client that exceeds it, even
	// an MQTT 3.1.1 one. Messages waiting for Ack must not count.
	f := startEmbedded(t, time.Minute)
	c := dialRaw(t, f.bus.Addr(), "dev-q", 4)
	const n = 1100
	msgs := make(chan Message, n)
	go func() {
		for range n {
			select {
			case m := <-f.rec.ch:
				msgs <- m
			case <-time.After(waitTimeout):
				close(msgs)
				return
			}
		}
	}()
	for id := uint16(1); id <= n; id++ {
		c.publishQoS1(protocol.ReportedTopic("dev-q", "r"), id, []byte(`{}`))
	}
	var got []Message
	for m := range msgs {
		got = append(got, m)
		if len(got) == n {
			break
		}
	}
	if len(got) != n {
		t.Fatalf("Handler got %d messages, want %d", len(got), n)
	}
	for _, m := range got {
		m.Ack()
	}
	for id := 1; id <= n; id++ {
		b := c.read(waitTimeout)
		if want := []byte{packets.Puback << 4, 2, byte(id >> 8), byte(id)}; !bytes.Equal(b, want) {
			t.Fatalf("PUBACK %d: got % x, want % x", id, b, want)
		}
	}
}

func TestEmbeddedAckInsideHandler(t *testing.T) {
	// The operator acknowledges a message it refuses from inside the
	// Handler, while mochi is still processing the PUBLISH.
	b, err := NewEmbedded(EmbeddedOptions{
		Listen:  "127.0.0.1:0",
		Handler: func(m Message) { m.Ack() },
		Logger:  testLogger(t),
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
	watcher := connectDevice(t, deviceOpts(b.Addr(), "watcher"))
	got := make(chan paho.Message, 10)
	waitToken(t, "subscribe", watcher.Subscribe(protocol.Root+"/dev-i/#", 1, func(_ paho.Client, m paho.Message) { got <- m }))
	dev := connectDevice(t, deviceOpts(b.Addr(), "dev-i"))
	for _, qos := range []byte{0, 1, 2} {
		topic := protocol.ReportedTopic("dev-i", fmt.Sprint(qos))
		waitToken(t, "publish", dev.Publish(topic, qos, false, []byte(`{}`)))
		select {
		case m := <-got:
			if m.Topic() != topic {
				t.Errorf("forwarded %q, want %q", m.Topic(), topic)
			}
		case <-time.After(waitTimeout):
			t.Fatalf("QoS %d message not forwarded", qos)
		}
	}
}

func TestEmbeddedQoS2AckTimeoutMakesDeviceResend(t *testing.T) {
	f := startEmbedded(t, 300*time.Millisecond)
	o := deviceOpts(f.bus.Addr(), "dev-r").
		SetCleanSession(false).
		SetAutoReconnect(true).
		SetMaxReconnectInterval(200 * time.Millisecond)
	dev := connectDevice(t, o)

	tok := dev.Publish(protocol.ReportedTopic("dev-r", "r1"), 2, false, []byte(`{"a":1}`))
	first := f.rec.next(t)
	// Not acked in time: the broker drops it, without PUBREC, and closes
	// the connection; the device reconnects and resends.
	second := f.rec.next(t)
	if second.Inbound != first.Inbound || string(second.Payload) != string(first.Payload) {
		t.Fatalf("resent message %+v %q differs from %+v %q", second.Inbound, second.Payload, first.Inbound, first.Payload)
	}
	first.Ack() // too late: no effect
	second.Ack()
	waitToken(t, "publish", tok)
	// Acknowledged this time: no further resend.
	f.rec.none(t, time.Second)
	if !dev.IsConnectionOpen() {
		t.Error("device not connected")
	}
}

func TestEmbeddedLateAckBeyondKeepalive(t *testing.T) {
	for _, qos := range []byte{1, 2} {
		t.Run(fmt.Sprintf("qos=%d", qos), func(t *testing.T) {
			f := startEmbedded(t, time.Minute)
			// mochi's read/write deadline is 1.5 x keepalive (3s) from when
			// it started reading: an Ack after that must still get the
			// PUBACK (PUBREC) out.
			o := deviceOpts(f.bus.Addr(), "dev-k").
				SetKeepAlive(2 * time.Second).
				SetPingTimeout(10 * time.Second)
			dev := connectDevice(t, o)
			tok := dev.Publish(protocol.ReportedTopic("dev-k", "r1"), qos, false, []byte(`{}`))
			m := f.rec.next(t)
			// Not synchronisation: the time passing is what is tested.
			time.Sleep(3500 * time.Millisecond)
			m.Ack()
			waitToken(t, "publish", tok)
			if !dev.IsConnectionOpen() {
				t.Error("device lost its connection")
			}
			f.rec.none(t, 300*time.Millisecond)
		})
	}
}

func TestEmbeddedStopReleasesWaitingPublish(t *testing.T) {
	for _, qos := range []byte{1, 2} {
		t.Run(fmt.Sprintf("qos=%d", qos), func(t *testing.T) {
			f := startEmbedded(t, time.Hour)
			dev := connectDevice(t, deviceOpts(f.bus.Addr(), "dev-s"))
			tok := dev.Publish(protocol.ReportedTopic("dev-s", "r1"), qos, false, []byte(`{}`))
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
		})
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
