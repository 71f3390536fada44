package bus

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/go-logr/logr"

	"github.com/kubetwin/kubetwin/internal/testutil/mqttwire"
	"github.com/kubetwin/kubetwin/internal/testutil/selfsigned"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// grantAll grants every client the device named by its client id, with a
// credential of an hour, as the SAS authenticator grants a device.
type grantAll struct{}

func (grantAll) Authenticate(_ context.Context, clientID, _ string, _ []byte) (Grant, error) {
	return Grant{DeviceID: clientID, Expires: time.Now().Add(time.Hour)}, nil
}

// rawDevice is a device connection spoken by hand, so that the test's
// own side costs one socket and no goroutine.
type rawDevice struct {
	conn net.Conn
	r    *bufio.Reader
}

// connectRawDevice connects as pkg/device does: MQTT 3.1.1, clean=false,
// a retained last will on the presence topic, the three twin
// subscriptions, and a retained birth message, acknowledged.
func connectRawDevice(addr, id string, tlsConfig *tls.Config) (*rawDevice, error) {
	var c net.Conn
	var err error
	if tlsConfig != nil {
		c, err = tls.DialWithDialer(&net.Dialer{Timeout: waitTimeout}, "tcp", addr, tlsConfig)
	} else {
		c, err = net.DialTimeout("tcp", addr, waitTimeout)
	}
	if err != nil {
		return nil, err
	}
	d := &rawDevice{conn: c, r: bufio.NewReaderSize(c, 64)}
	offline, online := []byte(`{"online":false}`), []byte(`{"online":true}`)
	presence := protocol.PresenceTopic(id)

	// CONNECT: will flag, will QoS 1, will retain; clean=false; keepalive 30 s.
	body := append(mqttwire.AppendString(nil, "MQTT"), 4, 0x04|0x08|0x20, 0, 30)
	body = append(body, mqttwire.AppendString(nil, id)...)
	body = append(body, mqttwire.AppendString(nil, presence)...)
	body = append(body, mqttwire.AppendString(nil, string(offline))...)
	if err := d.send(mqttwire.Packet(0x10, body)); err != nil {
		return d, err
	}
	if err := d.await(0x20); err != nil {
		return d, fmt.Errorf("CONNACK: %w", err)
	}
	body = []byte{0, 1}
	for _, f := range []string{protocol.ResponseFilter(id), protocol.DesiredFilter(id), presence} {
		body = append(append(body, mqttwire.AppendString(nil, f)...), 1)
	}
	if err := d.send(mqttwire.Packet(0x82, body)); err != nil {
		return d, err
	}
	if err := d.await(0x90); err != nil {
		return d, fmt.Errorf("SUBACK: %w", err)
	}
	body = append(append(mqttwire.AppendString(nil, presence), 0, 2), online...)
	if err := d.send(mqttwire.Packet(0x33, body)); err != nil {
		return d, err
	}
	if err := d.await(0x40); err != nil {
		return d, fmt.Errorf("PUBACK: %w", err)
	}
	// The birth comes back on the presence subscription; a device acknowledges it.
	if err := d.await(0x30); err != nil {
		return d, fmt.Errorf("own birth message: %w", err)
	}
	return d, nil
}

func (d *rawDevice) send(p []byte) error {
	_ = d.conn.SetWriteDeadline(time.Now().Add(waitTimeout))
	_, err := d.conn.Write(p)
	return err
}

// await reads packets until one of the given type arrives, acknowledging
// every QoS 1 publish (0x30 awaits one).
func (d *rawDevice) await(typ byte) error {
	_ = d.conn.SetReadDeadline(time.Now().Add(waitTimeout))
	for {
		first, err := d.r.ReadByte()
		if err != nil {
			return err
		}
		n, mul := 0, 1
		for {
			b, err := d.r.ReadByte()
			if err != nil {
				return err
			}
			n += int(b&0x7f) * mul
			mul *= 128
			if b&0x80 == 0 {
				break
			}
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(d.r, body); err != nil {
			return err
		}
		if first&0xf0 == 0x30 && first&0x06 == 0x02 { // PUBLISH QoS 1
			tl := int(binary.BigEndian.Uint16(body))
			if err := d.send(mqttwire.Packet(0x40, body[2+tl:4+tl])); err != nil {
				return err
			}
			if typ == 0x30 {
				return nil
			}
			continue
		}
		if first&0xf0 == typ {
			if typ == 0x20 && (n < 2 || body[1] != 0) {
				return fmt.Errorf("refused: return code %d", body[1])
			}
			return nil
		}
	}
}

// deviceMem is what n connected devices cost the process.
type deviceMem struct {
	n                int
	heapInuse        float64 // bytes of heap spans in use per device, after a GC
	heapLive         float64 // bytes of live heap objects per device, after a GC
	objects          float64 // live heap objects per device
	stack            float64 // bytes of goroutine stacks per device
	goroutines       float64 // goroutines per device
	connectAllocated float64 // bytes allocated per device while it connected
}

func (m deviceMem) String() string {
	return fmt.Sprintf("%d devices: heap in use %.0f B, live %.0f B in %.1f objects, stacks %.0f B in %.2f goroutines, allocated while connecting %.0f B (per device)",
		m.n, m.heapInuse, m.heapLive, m.objects, m.stack, m.goroutines, m.connectAllocated)
}

// measureDeviceMem starts an embedded broker with o (its listener,
// handler and authenticator set here), connects n devices as pkg/device
// does (over TLS with useTLS) and measures what they cost, all of them
// still connected. The figures include the test's own side of each
// connection (one socket; with TLS, its client state).
func measureDeviceMem(tb testing.TB, n int, useTLS bool, o EmbeddedOptions) deviceMem {
	tb.Helper()
	if os.Getenv("KUBETWIN_DEVICEMEM_PROFILE") != "" {
		runtime.MemProfileRate = 64 // fine enough to tell apart a device's few allocations
	}
	var clientTLS *tls.Config
	if useTLS {
		cert, pool, err := selfsigned.New()
		if err != nil {
			tb.Fatal(err)
		}
		o.TLSListen, o.TLSConfig = "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		clientTLS = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	} else {
		o.Listen = "127.0.0.1:0"
	}
	o.Auth = grantAll{}
	o.Logger = logr.Discard()
	// The operator acknowledges from its reconciler, not the connection's
	// goroutine.
	o.Handler = func(m Message) { go m.Ack() }
	// All devices come from 127.0.0.1.
	o.Limits.MaxConnectionsPerIP = n + 1
	b, err := NewEmbedded(o)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- b.Start(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-errc; err != nil {
			tb.Errorf("Start: %v", err)
		}
	})
	select {
	case <-b.Ready():
	case <-time.After(waitTimeout):
		tb.Fatal("embedded bus not ready")
	}
	// One device first, so that what the broker allocates once is not
	// counted as the devices'.
	devs := make([]*rawDevice, 0, n+1)
	tb.Cleanup(func() {
		for _, d := range devs {
			_ = d.conn.Close()
		}
	})
	connect := func(i int) {
		addr := b.Addr()
		if useTLS {
			addr = b.TLSAddr()
		}
		d, err := connectRawDevice(addr, "mem-"+strconv.Itoa(i), clientTLS)
		if d != nil {
			devs = append(devs, d)
		}
		if err != nil {
			tb.Fatalf("device %d: %v", i, err)
		}
	}
	connect(n)
	before, goBefore := memAfterGC(), runtime.NumGoroutine()
	for i := range n {
		connect(i)
	}
	// The broker's last writes to a device (the retained birth it
	// forwarded) may still be finishing: wait until the goroutines settle.
	after, goAfter := memAfterGC(), runtime.NumGoroutine()
	for deadline := time.Now().Add(waitTimeout); time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
		m, g := memAfterGC(), runtime.NumGoroutine()
		if g == goAfter {
			after = m
			break
		}
		after, goAfter = m, g
	}
	if f := os.Getenv("KUBETWIN_DEVICEMEM_PROFILE"); f != "" {
		writeProfiles(tb, f)
	}
	per := func(a, b uint64) float64 { return (float64(a) - float64(b)) / float64(n) }
	return deviceMem{
		n:                n,
		heapInuse:        per(after.HeapInuse, before.HeapInuse),
		heapLive:         per(after.HeapAlloc, before.HeapAlloc),
		objects:          per(after.HeapObjects, before.HeapObjects),
		stack:            per(after.StackInuse, before.StackInuse),
		goroutines:       float64(goAfter-goBefore) / float64(n),
		connectAllocated: per(after.TotalAlloc, before.TotalAlloc),
	}
}

// writeProfiles writes the heap profile to path and the goroutines to
// path.goroutines, for a look at what the devices hold.
func writeProfiles(tb testing.TB, path string) {
	tb.Helper()
	for _, p := range []struct{ name, path string }{{"heap", path}, {"goroutine", path + ".goroutines"}} {
		f, err := os.Create(p.path)
		if err != nil {
			tb.Fatal(err)
		}
		debug := 0
		if p.name == "goroutine" {
			debug = 1
		}
		if err := pprof.Lookup(p.name).WriteTo(f, debug); err != nil {
			tb.Fatal(err)
		}
		if err := f.Close(); err != nil {
			tb.Fatal(err)
		}
	}
}

func memAfterGC() runtime.MemStats {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m
}

// BenchmarkConnectedDeviceHeap measures what a connected device costs the
// embedded broker (KUBETWIN_DEVICEMEM_N devices, 2,000 by default), over
// TCP and TLS, with the operator's default limits. Run it once; with
// KUBETWIN_DEVICEMEM_PROFILE=<file> it also writes the heap profile (every
// 64th byte sampled) and the goroutines, devices connected:
//
//	go test ./internal/bus/ -run '^$' -bench ConnectedDeviceHeap -benchtime 1x
func BenchmarkConnectedDeviceHeap(b *testing.B) {
	n := 2000
	if s := os.Getenv("KUBETWIN_DEVICEMEM_N"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v <= 0 {
			b.Fatalf("KUBETWIN_DEVICEMEM_N: want a positive number of devices, got %q", s)
		}
		n = v
	}
	for _, useTLS := range []bool{false, true} {
		b.Run(map[bool]string{false: "tcp", true: "tls"}[useTLS], func(b *testing.B) {
			for b.Loop() {
				m := measureDeviceMem(b, n, useTLS, EmbeddedOptions{})
				b.Log(m)
				b.ReportMetric(m.heapInuse, "heapInuse-B/device")
				b.ReportMetric(m.heapLive, "heapLive-B/device")
				b.ReportMetric(m.stack, "stack-B/device")
				b.ReportMetric(m.goroutines, "goroutines/device")
			}
		})
	}
}

// TestEmbeddedReadBufferSize checks that mochi reads each connection with
// the small buffer (its default is 2 KiB per device), and that packets of
// every size around the buffer's, sent back to back, arrive whole and in
// order.
func TestEmbeddedReadBufferSize(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	if got := f.bus.server.Options.ClientNetReadBufferSize; got != clientReadBufferSize {
		t.Fatalf("mochi's read buffer per connection is %d bytes, want %d", got, clientReadBufferSize)
	}
	dev := connectDevice(t, deviceOpts(f.bus.Addr(), "dev-buf"))
	sizes := []int{1, clientReadBufferSize - 40, clientReadBufferSize, clientReadBufferSize + 1, 2049, 60000, 3}
	toks := make([]paho.Token, len(sizes))
	for i, n := range sizes {
		payload := bytes.Repeat([]byte{byte('a' + i)}, n)
		toks[i] = dev.Publish(protocol.ReportedTopic("dev-buf", strconv.Itoa(i)), 1, false, payload)
	}
	for i, n := range sizes {
		m := f.rec.next(t)
		if m.RequestID != strconv.Itoa(i) || !bytes.Equal(m.Payload, bytes.Repeat([]byte{byte('a' + i)}, n)) {
			t.Fatalf("message %d: rid %q with %d bytes, want rid %d with %d bytes of %c", i, m.RequestID, len(m.Payload), i, n, 'a'+i)
		}
		m.Ack()
	}
	for i, tok := range toks {
		waitToken(t, "publish "+strconv.Itoa(i), tok)
	}
}
