package bus

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/kubetwin/kubetwin/internal/ratelog"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// lineCounter is a logger that counts the lines it writes and keeps the
// longest.
type lineCounter struct {
	mu      sync.Mutex
	lines   int
	longest string
}

func (c *lineCounter) write(prefix, args string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lines++
	if l := prefix + " " + args; len(l) > len(c.longest) {
		c.longest = l
	}
}

func (c *lineCounter) get() (int, string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lines, c.longest
}

// refusedConnect sends a CONNECT with a huge username and a bad password
// and waits for the refusing CONNACK.
func refusedConnect(addr, clientID, username string) error {
	conn, err := net.DialTimeout("tcp", addr, waitTimeout)
	if err != nil {
		return err
	}
	defer func() { _ = conn.Close() }()
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60,
			ClientIdentifier: clientID,
			UsernameFlag:     true, Username: []byte(username),
			PasswordFlag: true, Password: []byte("bad"),
		},
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		return err
	}
	_ = conn.SetDeadline(time.Now().Add(waitTimeout))
	if _, err := conn.Write(buf.Bytes()); err != nil {
		return err
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(bufio.NewReader(conn), b); err != nil || b[0]>>4 != packets.Connack || b[3] == 0 {
		return fmt.Errorf("want a refusing CONNACK, got % x (%v)", b, err)
	}
	return nil
}

func TestEmbeddedRefusedConnectLogsAreBounded(t *testing.T) {
	const attempts = 10000
	counter := &lineCounter{}
	b, err := NewEmbedded(EmbeddedOptions{
		Listen: "127.0.0.1:0", Handler: func(Message) {}, Auth: &fakeAuth{},
		Logger:     funcr.New(counter.write, funcr.Options{}), // V(0): what production logs
		LogLimiter: ratelog.New(ratelog.DefaultRate),
	})
	if err != nil {
		t.Fatal(err)
	}
	runBus(t, b)
	<-b.Ready()
	before, _ := counter.get()

	start := time.Now()
	username := strings.Repeat("u", 56<<10) // with the client id, under the packet size limit
	clientID := strings.Repeat("c", 2<<10)
	work := make(chan struct{})
	var wg sync.WaitGroup
	var failures atomic.Int64
	var firstErr atomic.Value
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range work {
				if err := refusedConnect(b.Addr(), clientID, username); err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		}()
	}
	for range attempts {
		work <- struct{}{}
	}
	close(work)
	wg.Wait()
	elapsed := time.Since(start)
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d CONNECTs were not refused with a CONNACK, e.g.: %v", n, firstErr.Load())
	}

	lines, longest := counter.get()
	lines -= before
	// Per kind: the burst, the rate over the run, and as many "suppressed"
	// lines; a refused CONNECT makes at most three kinds (ours, mochi's
	// listener's, and one spare).
	perKind := 2*ratelog.DefaultRate + int(elapsed.Seconds()*ratelog.DefaultRate) + 1
	if bound := 3 * 2 * perKind; lines > bound {
		t.Errorf("%d refused CONNECTs in %s logged %d lines, want at most %d", attempts, elapsed, lines, bound)
	}
	if len(longest) > 2048 {
		t.Errorf("a log line has %d bytes: %.300s", len(longest), longest)
	}
	t.Logf("%d refused CONNECTs in %s: %d log lines, the longest %d bytes", attempts, elapsed, lines, len(longest))
}

func TestEmbeddedDroppedMessageLogsAreBounded(t *testing.T) {
	const published = 2000
	counter := &lineCounter{}
	b, err := NewEmbedded(EmbeddedOptions{
		Listen: "127.0.0.1:0", Handler: func(Message) {},
		Logger:     funcr.New(counter.write, funcr.Options{}),
		LogLimiter: ratelog.New(ratelog.DefaultRate),
		Sessions:   SessionOptions{MaxQueue: 64},
	})
	if err != nil {
		t.Fatal(err)
	}
	runBus(t, b)
	<-b.Ready()

	// A device that subscribes and then never acknowledges: after 64
	// messages in flight mochi drops every further one with a warning.
	dev := dialRaw(t, b.Addr(), "silent", 4)
	var buf bytes.Buffer
	sub := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		PacketID:    1,
		Filters:     packets.Subscriptions{{Filter: protocol.DesiredFilter("silent"), Qos: 1}},
	}
	sub.ProtocolVersion = 4
	if err := sub.SubscribeEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := dev.conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	if ack := dev.read(waitTimeout); len(ack) == 0 || ack[0]>>4 != packets.Suback {
		t.Fatalf("SUBACK: got % x", ack)
	}
	before, _ := counter.get()
	start := time.Now()
	for v := range published {
		if err := b.Publish(context.Background(), protocol.DesiredPatchTopic("silent"), fmt.Appendf(nil, `{"$version":%d}`, v), false); err != nil {
			t.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	lines, longest := counter.get()
	lines -= before
	if dropped := atomic.LoadInt64(&b.server.Info.InflightDropped); dropped < published-64 {
		t.Fatalf("mochi dropped %d messages, want at least %d", dropped, published-64)
	}
	if bound := 2 * (2*ratelog.DefaultRate + int(elapsed.Seconds()*ratelog.DefaultRate) + 1); lines > bound {
		t.Errorf("%d dropped messages in %s logged %d lines, want at most %d", published-64, elapsed, lines, bound)
	}
	if len(longest) > 2048 {
		t.Errorf("a log line has %d bytes", len(longest))
	}
}
