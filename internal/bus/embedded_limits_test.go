package bus

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/gorilla/websocket"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// limitsFixture is a running Embedded bus with the given limits, a plain
// and a TLS listener and a WebSocket endpoint.
type limitsFixture struct {
	bus   *Embedded
	msgs  chan Message
	wsURL string
	tls   *tls.Config // a client configuration trusting the broker
	stop  func()
}

func startLimited(t *testing.T, l EmbeddedLimits) *limitsFixture {
	t.Helper()
	return startLimitedSessions(t, l, SessionOptions{})
}

// startLimitedSessions is startLimited with the given session bounds.
func startLimitedSessions(t *testing.T, l EmbeddedLimits, sessions SessionOptions) *limitsFixture {
	t.Helper()
	cert, pool := selfSigned(t)
	f := &limitsFixture{msgs: make(chan Message, 10000), tls: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}
	b, err := NewEmbedded(EmbeddedOptions{
		Listen: "127.0.0.1:0", TLSListen: "127.0.0.1:0",
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		Handler:   func(m Message) { f.msgs <- m },
		Logger:    testLogger(t),
		Limits:    l,
		Sessions:  sessions,
	})
	if err != nil {
		t.Fatal(err)
	}
	f.bus = b
	f.stop = runBus(t, b)
	select {
	case <-b.Ready():
	case <-time.After(waitTimeout):
		t.Fatal("embedded bus not ready")
	}
	srv := httptest.NewServer(b.WebSocketHandler())
	t.Cleanup(srv.Close)
	f.wsURL = "ws://" + strings.TrimPrefix(srv.URL, "http://") + WebSocketPath
	return f
}

// encode returns the bytes of pk in protocol version.
func encode(t *testing.T, pk packets.Packet, version byte) []byte {
	t.Helper()
	pk.ProtocolVersion = version
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	default:
		t.Fatalf("encode: packet type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func connectPacket(t *testing.T, clientID string, version byte) []byte {
	return encode(t, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect:     packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: clientID},
	}, version)
}

// readPacket reads one packet from r within d.
func readPacket(c net.Conn, r io.ByteReader, d time.Duration) (packets.FixedHeader, []byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(d))
	var fh packets.FixedHeader
	b, err := r.ReadByte()
	if err != nil {
		return fh, nil, err
	}
	if err := fh.Decode(b); err != nil {
		return fh, nil, err
	}
	n, _, err := packets.DecodeLength(r)
	if err != nil {
		return fh, nil, err
	}
	fh.Remaining = n
	body := make([]byte, n)
	for i := range body {
		if body[i], err = r.ReadByte(); err != nil {
			return fh, nil, err
		}
	}
	return fh, body, nil
}

// closedWithin reports whether the peer closes c (a read ends with an error
// other than the read deadline) within d, discarding what arrives.
func closedWithin(c net.Conn, d time.Duration) bool {
	_ = c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	return !isTimeout(err)
}

// fixedHeader is a fixed header of packet type typ announcing n bytes.
func fixedHeader(typ byte, n int) []byte {
	b := []byte{typ << 4}
	for {
		d := byte(n % 128)
		if n /= 128; n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			return b
		}
	}
}

func TestEmbeddedLimitsDefaults(t *testing.T) {
	l, err := EmbeddedLimits{}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	want := EmbeddedLimits{MaxPacketSize: 65536, ConnectTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second,
		MaxClientQueue: 256, MaxClientQueueBytes: 1 << 20, MaxConnections: 100000, MaxConnectionsPerIP: 1000}
	if l != want {
		t.Errorf("defaults %+v, want %+v", l, want)
	}
	for _, bad := range []EmbeddedLimits{{MaxPacketSize: -1}, {WriteTimeout: -time.Second}, {MaxConnectionsPerIP: -2}, {MaxPacketSize: 300 << 20}} {
		_, err := NewEmbedded(EmbeddedOptions{Handler: func(Message) {}, Limits: bad})
		if err == nil || !strings.Contains(err.Error(), "Limits.") {
			t.Errorf("%+v: error %v, want one naming the limit", bad, err)
		}
	}
}

func TestPacketSizer(t *testing.T) {
	pub := func(n int) []byte { return append(fixedHeader(packets.Publish, n), make([]byte, n)...) }
	for name, tc := range map[string]struct {
		stream  []byte
		chunk   int // bytes per scan call; 0: all at once
		wantCut int // -1: not refused
	}{
		"small packets":            {bytes.Repeat(pub(10), 5), 0, -1},
		"exactly the maximum":      {pub(100 - 2), 0, -1},
		"one byte over":            {pub(100 - 1), 0, 0},
		"after two packets":        {append(append(pub(10), pub(20)...), fixedHeader(packets.Publish, 200<<20)...), 0, 12 + 22},
		"split into single bytes":  {append(pub(50), fixedHeader(packets.Publish, 1000)...), 1, 0},
		"body split across reads":  {append(pub(90), fixedHeader(packets.Publish, 1000)...), 7, 1},
		"four-byte length, 200MiB": {fixedHeader(packets.Connect, 200<<20), 0, 0},
	} {
		t.Run(name, func(t *testing.T) {
			s := packetSizer{max: 100}
			chunk := tc.chunk
			if chunk == 0 {
				chunk = len(tc.stream)
			}
			for i := 0; i < len(tc.stream); i += chunk {
				p := tc.stream[i:min(i+chunk, len(tc.stream))]
				if cut, big := s.scan(p); big {
					if tc.wantCut < 0 || cut != tc.wantCut {
						t.Fatalf("refused at offset %d of the scan at %d; want cut %d", cut, i, tc.wantCut)
					}
					return
				}
			}
			if tc.wantCut >= 0 {
				t.Fatal("not refused")
			}
		})
	}
}

// TestEmbeddedOversizedBeforeConnect: connections that announce a 200 MiB
// packet are closed from the fixed header, on TCP, TLS and WebSockets,
// and the broker does not allocate for them.
func TestEmbeddedOversizedBeforeConnect(t *testing.T) {
	f := startLimited(t, EmbeddedLimits{})
	before := testutil.ToFloat64(BrokerOversizedPackets)
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	heapBefore := ms.HeapAlloc

	header := fixedHeader(packets.Connect, 200<<20)
	var conns []net.Conn
	for i := range 3 {
		c, err := net.Dial("tcp", f.bus.Addr())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		if _, err := c.Write(append(header, fmt.Sprint(i)...)); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	tc, err := tls.Dial("tcp", f.bus.TLSAddr(), f.tls)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tc.Close() })
	if _, err := tc.Write(header); err != nil {
		t.Fatal(err)
	}
	conns = append(conns, tc)
	for i, c := range conns {
		if !closedWithin(c, waitTimeout) {
			t.Fatalf("connection %d announcing 200 MiB was not closed", i)
		}
	}

	ws, _, err := (&websocket.Dialer{Subprotocols: []string{"mqtt"}}).Dial(f.wsURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ws.Close() })
	if err := ws.WriteMessage(websocket.BinaryMessage, header); err != nil {
		t.Fatal(err)
	}
	_ = ws.SetReadDeadline(time.Now().Add(waitTimeout))
	if _, _, err := ws.ReadMessage(); err == nil || isTimeout(err) {
		t.Fatalf("WebSocket connection announcing 200 MiB: read %v, want it closed", err)
	}

	if got := testutil.ToFloat64(BrokerOversizedPackets) - before; got != 5 {
		t.Errorf("kubetwin_broker_oversized_packets_total rose by %v, want 5", got)
	}
	runtime.GC()
	runtime.ReadMemStats(&ms)
	if grew := int64(ms.HeapAlloc) - int64(heapBefore); grew > 32<<20 {
		t.Errorf("heap grew by %d MiB", grew>>20)
	}
}

// TestEmbeddedConnectTimeout: a connection that does not complete its
// CONNECT (nothing sent, half a CONNECT, no TLS handshake, a WebSocket
// without MQTT) is closed after the connect timeout; one that connects in
// time is served past it.
func TestEmbeddedConnectTimeout(t *testing.T) {
	const timeout = 500 * time.Millisecond
	f := startLimited(t, EmbeddedLimits{ConnectTimeout: timeout})
	before := testutil.ToFloat64(BrokerConnectTimeouts)

	good := connectDevice(t, deviceOpts(f.bus.Addr(), "dev-ok").SetKeepAlive(0))

	dial := func(addr string) net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	start := time.Now()
	silent := dial(f.bus.Addr())
	half := dial(f.bus.Addr())
	if _, err := half.Write(connectPacket(t, "slow", 4)[:5]); err != nil {
		t.Fatal(err)
	}
	noHandshake := dial(f.bus.TLSAddr())
	for name, c := range map[string]net.Conn{"silent": silent, "half a CONNECT": half, "no TLS handshake": noHandshake} {
		if !closedWithin(c, waitTimeout) {
			t.Errorf("%s: not closed", name)
		}
	}
	if d := time.Since(start); d < timeout {
		t.Errorf("closed after %v, before the connect timeout", d)
	}
	ws, _, err := (&websocket.Dialer{Subprotocols: []string{"mqtt"}}).Dial(f.wsURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ws.Close() })
	_ = ws.SetReadDeadline(time.Now().Add(waitTimeout))
	if _, _, err := ws.ReadMessage(); err == nil || isTimeout(err) {
		t.Errorf("WebSocket without CONNECT: read %v, want it closed", err)
	}
	if got := testutil.ToFloat64(BrokerConnectTimeouts) - before; got != 4 {
		t.Errorf("kubetwin_broker_connect_timeouts_total rose by %v, want 4", got)
	}

	// Connected in time, keepalive 0: no deadline after CONNECT.
	waitToken(t, "publish after the connect timeout", good.Publish(protocol.ReportedTopic("dev-ok", "r1"), 0, false, "{}"))
	if m := <-f.msgs; m.DeviceID != "dev-ok" {
		t.Errorf("got %+v", m.Inbound)
	}
}

// TestEmbeddedStopsWithOpenConnections: a connection that never sent
// CONNECT does not hold up the broker's shutdown.
func TestEmbeddedStopsWithOpenConnections(t *testing.T) {
	f := startLimited(t, EmbeddedLimits{ConnectTimeout: time.Hour})
	c, err := net.Dial("tcp", f.bus.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	eventually(t, "the connection is counted", func() bool { return f.bus.limiter.open() == 1 })
	done := make(chan struct{})
	go func() { f.stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(waitTimeout):
		t.Fatal("the broker did not stop while a connection without CONNECT was open")
	}
	if !closedWithin(c, waitTimeout) {
		t.Error("connection not closed at shutdown")
	}
}

// open is the number of admitted connections not yet closed.
func (l *connLimiter) open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total
}

// TestEmbeddedConnectionLimits: beyond the per-source and the total cap a
// connection is closed at once (WebSocket: 503), and counted; closing one
// makes room.
func TestEmbeddedConnectionLimits(t *testing.T) {
	f := startLimited(t, EmbeddedLimits{MaxConnectionsPerIP: 2, MaxConnections: 3, ConnectTimeout: time.Minute})
	perIP := testutil.ToFloat64(BrokerConnectionsRefused.WithLabelValues(ReasonMaxConnectionsPerIP))
	total := testutil.ToFloat64(BrokerConnectionsRefused.WithLabelValues(ReasonMaxConnections))
	dialFrom := func(src, addr string) net.Conn {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	a1 := dialFrom("127.0.0.1", f.bus.Addr())
	dialFrom("127.0.0.1", f.bus.TLSAddr())
	eventually(t, "two connections are counted", func() bool { return f.bus.limiter.open() == 2 })
	if got := testutil.ToFloat64(BrokerConnections); got < 2 {
		t.Errorf("kubetwin_broker_connections = %v, want at least 2", got)
	}

	third := dialFrom("127.0.0.1", f.bus.Addr())
	if !closedWithin(third, waitTimeout) {
		t.Fatal("a third connection from one address was not closed")
	}
	if got := testutil.ToFloat64(BrokerConnectionsRefused.WithLabelValues(ReasonMaxConnectionsPerIP)) - perIP; got != 1 {
		t.Errorf("refused per IP rose by %v, want 1", got)
	}
	if _, resp, err := (&websocket.Dialer{Subprotocols: []string{"mqtt"}}).Dial(f.wsURL, nil); err == nil ||
		resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("WebSocket from the same address: %v, want HTTP 503", err)
	}

	// Another source address (all of 127/8 is loopback) may connect, up to
	// the total.
	other := dialFrom("127.0.0.2", f.bus.Addr())
	eventually(t, "three connections are counted", func() bool { return f.bus.limiter.open() == 3 })
	fourth := dialFrom("127.0.0.3", f.bus.Addr())
	if !closedWithin(fourth, waitTimeout) {
		t.Fatal("a connection beyond the total was not closed")
	}
	if got := testutil.ToFloat64(BrokerConnectionsRefused.WithLabelValues(ReasonMaxConnections)) - total; got != 1 {
		t.Errorf("refused for the total rose by %v, want 1", got)
	}

	// Room again once one closes: an MQTT client from the first address.
	_ = a1.Close()
	_ = other.Close()
	eventually(t, "closed connections are released", func() bool { return f.bus.limiter.open() == 1 })
	connectDevice(t, deviceOpts(f.bus.Addr(), "dev-1"))
}

// TestEmbeddedOversizedPublish: an authenticated client's packet over the
// maximum never reaches the Handler; the client is disconnected, an MQTT 5
// one with DISCONNECT 0x95, and told the maximum in its CONNACK. A packet
// of exactly the maximum goes through.
func TestEmbeddedOversizedPublish(t *testing.T) {
	const max = 1024
	f := startLimited(t, EmbeddedLimits{MaxPacketSize: max})
	for _, version := range []byte{4, 5} {
		t.Run(fmt.Sprintf("version=%d", version), func(t *testing.T) {
			id := fmt.Sprintf("dev-%d", version)
			c, err := net.Dial("tcp", f.bus.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			r := bufio.NewReader(c)
			if _, err := c.Write(connectPacket(t, id, version)); err != nil {
				t.Fatal(err)
			}
			fh, body, err := readPacket(c, r, waitTimeout)
			if err != nil || fh.Type != packets.Connack {
				t.Fatalf("CONNACK: %v %v", fh, err)
			}
			if version == 5 {
				ack := packets.Packet{FixedHeader: fh, ProtocolVersion: 5}
				if err := ack.ConnackDecode(body); err != nil {
					t.Fatal(err)
				}
				if ack.Properties.MaximumPacketSize != max {
					t.Errorf("CONNACK maximum packet size %d, want %d", ack.Properties.MaximumPacketSize, max)
				}
			}

			topic := protocol.ReportedTopic(id, "r1")
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: topic}
			size := max - len(encode(t, pk, version))
			pk.Payload = bytes.Repeat([]byte("x"), size)
			// The remaining length takes a second byte.
			size -= len(encode(t, pk, version)) - max
			pk.Payload = pk.Payload[:size]
			if n := len(encode(t, pk, version)); n != max {
				t.Fatalf("packet of %d bytes, want %d", n, max)
			}
			if _, err := c.Write(encode(t, pk, version)); err != nil {
				t.Fatal(err)
			}
			select {
			case m := <-f.msgs:
				if len(m.Payload) != size {
					t.Errorf("payload of %d bytes, want %d", len(m.Payload), size)
				}
			case <-time.After(waitTimeout):
				t.Fatal("a packet of the maximum size did not reach the Handler")
			}

			before := testutil.ToFloat64(BrokerOversizedPackets)
			big := append(fixedHeader(packets.Publish, 48<<20), encode(t, packets.Packet{
				FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: protocol.ReportedTopic(id, "r2"),
				Payload: bytes.Repeat([]byte("y"), 4096),
			}, version)[2:]...)
			_, _ = c.Write(big) // the broker may close before it has read all
			if version == 5 {
				fh, body, err := readPacket(c, r, waitTimeout)
				if err != nil || fh.Type != packets.Disconnect || len(body) == 0 || body[0] != packets.ErrPacketTooLarge.Code {
					t.Errorf("want DISCONNECT 0x95, got %v % x %v", fh, body, err)
				}
			}
			if !closedWithin(c, waitTimeout) {
				t.Fatal("client that sent 48 MiB was not disconnected")
			}
			if got := testutil.ToFloat64(BrokerOversizedPackets) - before; got != 1 {
				t.Errorf("oversized packets rose by %v, want 1", got)
			}
			select {
			case m := <-f.msgs:
				t.Fatalf("the oversized publish reached the Handler: %+v (%d bytes)", m.Inbound, len(m.Payload))
			default:
			}
		})
	}
}

// TestEmbeddedSlowConsumer: a device that subscribes, floods requests and
// never reads its socket holds up neither the operator's Publish and Ack,
// for it or for another device, nor the other device's answers; it is
// disconnected within about the write timeout. The same in the IoT Hub
// dialect, whose responses the broker translates.
func TestEmbeddedSlowConsumer(t *testing.T) {
	t.Run("kubetwin", func(t *testing.T) {
		testSlowConsumer(t, 400, 256<<10, protocol.ResponseFilter("stuck"), func(rid string) string { return protocol.GetTopic("stuck", rid) })
	})
	t.Run("iothub", func(t *testing.T) {
		// Smaller: the broker translates each response, which is slow
		// under the race detector.
		testSlowConsumer(t, 200, 64<<10, protocol.IoTHubResponseFilter, func(rid string) string { return "$iothub/twin/GET/?$rid=" + rid })
	})
}

func testSlowConsumer(t *testing.T, requests, size int, responseFilter string, getTopic func(rid string) string) {
	const (
		writeTimeout = 6 * time.Second
		prompt       = 2 * time.Second // well under the write timeout, with room for the race detector
	)
	f := startLimited(t, EmbeddedLimits{WriteTimeout: writeTimeout, MaxClientQueue: 64})
	slow := testutil.ToFloat64(BrokerSlowConsumerDisconnects.WithLabelValues(ReasonWriteTimeout)) +
		testutil.ToFloat64(BrokerSlowConsumerDisconnects.WithLabelValues(ReasonQueueFull))

	// The operator: answers every GET, timing each Publish and Ack; one
	// worker per device, as the bridge works on devices independently.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	var slowest time.Duration
	var blocked error
	answered := 0 // the stuck device's requests
	big := []byte(`{"status":200,"desired":{"pad":"` + strings.Repeat("z", size) + `","$version":1},"reported":{"$version":1}}`)
	answer := func(m Message) bool {
		payload := []byte(`{"status":200}`)
		if m.DeviceID == "stuck" {
			payload = big
		}
		for _, call := range []struct {
			name string
			fn   func()
		}{
			{"Publish", func() {
				pctx, pcancel := context.WithTimeout(ctx, waitTimeout)
				defer pcancel()
				_ = f.bus.Publish(pctx, protocol.ResponseTopic(m.DeviceID, m.RequestID), payload, false)
			}},
			{"Ack", m.Ack},
		} {
			start := time.Now()
			done := make(chan struct{})
			go func() { call.fn(); close(done) }()
			select {
			case <-done:
			case <-time.After(prompt):
				mu.Lock()
				blocked = fmt.Errorf("%s for %s %s blocked for more than %v", call.name, m.DeviceID, m.RequestID, prompt)
				mu.Unlock()
				return false
			}
			mu.Lock()
			slowest = max(slowest, time.Since(start))
			if m.DeviceID == "stuck" && call.name == "Ack" {
				answered++
			}
			mu.Unlock()
		}
		return true
	}
	// The stuck device's answers wait until the broker has read its whole
	// flood: once they fill its queue the broker closes the connection, and
	// the requests it had not read by then never reach the Handler (the
	// device would resend them on reconnecting), so "every request
	// answered" below could not be reached when the broker's reading fell
	// behind the answers, as it did under load.
	floodRead := make(chan struct{})
	go func() {
		workers := map[string]chan Message{}
		stuckRead := 0
		for {
			var m Message
			select {
			case m = <-f.msgs:
			case <-ctx.Done():
				return
			}
			if m.Kind != protocol.KindGet {
				continue // an IoT Hub device's desired version
			}
			if m.DeviceID == "stuck" {
				if stuckRead++; stuckRead == requests {
					close(floodRead)
				}
			}
			w, ok := workers[m.DeviceID]
			if !ok {
				w = make(chan Message, requests)
				workers[m.DeviceID] = w
				go func() {
					for m := range w {
						if m.DeviceID == "stuck" {
							select {
							case <-floodRead:
							case <-ctx.Done():
								return
							}
						}
						if !answer(m) {
							return
						}
					}
				}()
			}
			w <- m
		}
	}()
	failed := func() error {
		mu.Lock()
		defer mu.Unlock()
		return blocked
	}
	stuckAnswered := func() (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return answered, blocked
	}

	answers := make(chan string, 100)
	good := connectDevice(t, deviceOpts(f.bus.Addr(), "good"))
	waitToken(t, "subscribe", good.Subscribe(protocol.ResponseFilter("good"), 1, func(_ paho.Client, m paho.Message) {
		answers <- m.Topic()
	}))

	// The stuck device: keepalive 0 (no read deadline), a small receive
	// buffer, subscribed with QoS 1; it sends and never reads.
	stuck, err := net.Dial("tcp", f.bus.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close()
	_ = stuck.(*net.TCPConn).SetReadBuffer(4096)
	var flood bytes.Buffer
	flood.Write(connectPacket(t, "stuck", 4))
	flood.Write(encode(t, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: responseFilter, Qos: 1}},
	}, 4))
	for i := range requests {
		flood.Write(encode(t, packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: uint16(i + 1),
			TopicName: getTopic(fmt.Sprintf("s%d", i)), Payload: []byte{},
		}, 4))
	}
	floodStart := time.Now()
	go func() { _, _ = stuck.Write(flood.Bytes()) }()
	select {
	case <-floodRead:
	case <-time.After(waitTimeout):
		t.Fatalf("the broker did not read the stuck device's %d requests", requests)
	}
	// Answers are being written to the stuck device, soon more than the
	// sockets' buffers hold.
	progressing(t, "the stuck device's requests are being answered", 40, stuckAnswered)

	// The well-behaved device keeps getting its answers.
	for i := range 20 {
		rid := fmt.Sprintf("g%d", i)
		if tok := good.Publish(protocol.GetTopic("good", rid), 1, false, []byte{}); !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
			t.Fatalf("good device GET %s: not acknowledged (%v; operator: %v)", rid, tok.Error(), failed())
		}
		select {
		case topic := <-answers:
			if want := protocol.ResponseTopic("good", rid); topic != want {
				t.Fatalf("good device got %s, want %s", topic, want)
			}
		case <-time.After(waitTimeout):
			t.Fatalf("good device got no answer to %s (%v)", rid, failed())
		}
		if err := failed(); err != nil {
			t.Fatal(err)
		}
	}

	// Answering is CPU-bound (in the IoT Hub dialect the broker translates
	// each response, even for a device it has disconnected): under the race
	// detector on a loaded machine 200 answers took more than waitTimeout
	// in all, each call still well within prompt.
	progressing(t, "every request of the stuck device is answered", requests, stuckAnswered)
	allAnswered := time.Now()
	t.Logf("stuck device's %d requests answered %v after its flood began", requests, allAnswered.Sub(floodStart))
	eventually(t, "the stuck device is disconnected", func() bool {
		return testutil.ToFloat64(BrokerSlowConsumerDisconnects.WithLabelValues(ReasonWriteTimeout))+
			testutil.ToFloat64(BrokerSlowConsumerDisconnects.WithLabelValues(ReasonQueueFull)) > slow
	})
	// The last answer's write, at the latest, times out.
	if d := time.Since(allAnswered); d > writeTimeout+2*time.Second {
		t.Errorf("stuck device disconnected %v after its last answer, write timeout %v", d, writeTimeout)
	}
	t.Logf("stuck device disconnected %v after its flood began", time.Since(floodStart))
	if err := failed(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	t.Logf("slowest Publish or Ack: %v", slowest)
	mu.Unlock()
	eventually(t, "only the good device's connection is open", func() bool { return f.bus.limiter.open() == 1 })
}

// TestEmbeddedSlowConsumerWriteTimeout: a device that takes nothing is
// disconnected after the write timeout although its queue has room.
func TestEmbeddedSlowConsumerWriteTimeout(t *testing.T) {
	const writeTimeout = 2 * time.Second
	// Every message is written, none held back by the session's cap of
	// unacknowledged QoS 1 messages (64 by default: 3.75 MiB of these,
	// which a send buffer autotuned to tcp_wmem's 4 MiB may take in
	// without blocking).
	f := startLimitedSessions(t, EmbeddedLimits{WriteTimeout: writeTimeout, MaxClientQueue: 100000, MaxClientQueueBytes: 64 << 20},
		SessionOptions{MaxQueue: 1000})
	before := testutil.ToFloat64(BrokerSlowConsumerDisconnects.WithLabelValues(ReasonWriteTimeout))
	subscribedStuck(t, f, "stuck")
	payload := bytes.Repeat([]byte("z"), 60<<10)
	done := make(chan error, 1)
	go func() {
		for range 200 { // 12 MiB: well more than the sockets' buffers
			if err := f.bus.Publish(context.Background(), protocol.ResponseTopic("stuck", "r"), payload, false); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(writeTimeout):
		t.Fatal("publishing to a device that does not read blocked")
	}
	eventually(t, "the device is disconnected for the write timeout", func() bool {
		return testutil.ToFloat64(BrokerSlowConsumerDisconnects.WithLabelValues(ReasonWriteTimeout)) > before
	})
	eventually(t, "the connection is closed", func() bool { return f.bus.limiter.open() == 0 })
}

// TestEmbeddedSlowConsumerQueueFull: a device whose queue overflows is
// disconnected at once, long before the write timeout.
func TestEmbeddedSlowConsumerQueueFull(t *testing.T) {
	f := startLimited(t, EmbeddedLimits{WriteTimeout: time.Hour, MaxClientQueue: 8})
	before := testutil.ToFloat64(BrokerSlowConsumerDisconnects.WithLabelValues(ReasonQueueFull))
	subscribedStuck(t, f, "stuck")
	payload := bytes.Repeat([]byte("z"), 60<<10)
	for range 300 {
		if err := f.bus.Publish(context.Background(), protocol.ResponseTopic("stuck", "r"), payload, false); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "the device is disconnected for its full queue", func() bool {
		return testutil.ToFloat64(BrokerSlowConsumerDisconnects.WithLabelValues(ReasonQueueFull)) > before
	})
	eventually(t, "the connection is closed", func() bool { return f.bus.limiter.open() == 0 })
}

// TestEmbeddedSlowConsumerQueueBytes: a device whose queue holds few
// messages but many bytes is disconnected at once: what a stalled client
// makes the broker hold is bounded in bytes, not only in messages.
func TestEmbeddedSlowConsumerQueueBytes(t *testing.T) {
	f := startLimited(t, EmbeddedLimits{WriteTimeout: time.Hour, MaxClientQueue: 100000, MaxClientQueueBytes: 256 << 10})
	before := testutil.ToFloat64(BrokerSlowConsumerDisconnects.WithLabelValues(ReasonQueueFull))
	subscribedStuck(t, f, "stuck")
	payload := bytes.Repeat([]byte("z"), 60<<10)
	for range 300 { // 18 MiB: the sockets' buffers and then the queue fill
		if err := f.bus.Publish(context.Background(), protocol.ResponseTopic("stuck", "r"), payload, false); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "the device is disconnected for the bytes in its queue", func() bool {
		return testutil.ToFloat64(BrokerSlowConsumerDisconnects.WithLabelValues(ReasonQueueFull)) > before
	})
	eventually(t, "the connection is closed", func() bool { return f.bus.limiter.open() == 0 })
}

// subscribedStuck connects a client that subscribes to its responses with
// QoS 1, keepalive 0, and then reads nothing.
func subscribedStuck(t *testing.T, f *limitsFixture, id string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", f.bus.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.(*net.TCPConn).SetReadBuffer(4096)
	r := bufio.NewReader(c)
	if _, err := c.Write(connectPacket(t, id, 4)); err != nil {
		t.Fatal(err)
	}
	if fh, _, err := readPacket(c, r, waitTimeout); err != nil || fh.Type != packets.Connack {
		t.Fatalf("CONNACK: %v %v", fh, err)
	}
	if _, err := c.Write(encode(t, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: protocol.ResponseFilter(id), Qos: 1}},
	}, 4)); err != nil {
		t.Fatal(err)
	}
	if fh, _, err := readPacket(c, r, waitTimeout); err != nil || fh.Type != packets.Suback {
		t.Fatalf("SUBACK: %v %v", fh, err)
	}
	return c
}

// TestLimitsHookPublishDropped: when mochi's own queue for a client is
// full, the client is disconnected rather than losing the message.
func TestLimitsHookPublishDropped(t *testing.T) {
	f := startLimited(t, EmbeddedLimits{})
	stuck := subscribedStuck(t, f, "stuck")
	var cl *mqtt.Client
	eventually(t, "the client is known", func() bool {
		var ok bool
		cl, ok = f.bus.server.Clients.Get("stuck")
		return ok
	})
	before := testutil.ToFloat64(BrokerSlowConsumerDisconnects.WithLabelValues(ReasonQueueFull))
	(&limitsHook{e: f.bus}).OnPublishDropped(cl, packets.Packet{})
	if got := testutil.ToFloat64(BrokerSlowConsumerDisconnects.WithLabelValues(ReasonQueueFull)) - before; got != 1 {
		t.Errorf("slow consumer disconnects rose by %v, want 1", got)
	}
	if !closedWithin(stuck, waitTimeout) {
		t.Error("connection still open")
	}
	if !errors.Is(cl.StopCause(), errSlowConsumer) {
		t.Errorf("stop cause %v", cl.StopCause())
	}
}
