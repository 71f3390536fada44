package bus

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// operatorID is the operator's client id in these tests; each test has its
// own broker, so the session starts empty.
const operatorID = "kubetwin-operator-test"

// startOperator starts a Paho bus with the operator's client id and waits
// until it has subscribed. stop ends it as a process exit would.
func startOperator(t *testing.T, addr string, rec *recorder) (p *Paho, stop func()) {
	t.Helper()
	p, err := NewPaho(PahoOptions{
		BrokerURL:      "tcp://" + addr,
		ClientID:       operatorID,
		Handler:        rec.handle,
		Logger:         testLogger(t),
		ConnectTimeout: 5 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	stop = runBus(t, p)
	eventually(t, "the operator has subscribed", p.subscribed)
	if !p.Connected() {
		t.Fatal("Connected is false after subscribing")
	}
	return p, stop
}

func TestNewPahoValidates(t *testing.T) {
	if _, err := NewPaho(PahoOptions{Handler: func(Message) {}}); err == nil {
		t.Error("without BrokerURL: want error")
	}
	if _, err := NewPaho(PahoOptions{BrokerURL: "tcp://127.0.0.1:1"}); err == nil {
		t.Error("without Handler: want error")
	}
	for _, u := range []string{"127.0.0.1:1883", "tcp://", "tcp://user:secret@[::1"} {
		_, err := NewPaho(PahoOptions{BrokerURL: u, Handler: func(Message) {}})
		if err == nil {
			t.Errorf("BrokerURL %q: want error", u)
		} else if strings.Contains(err.Error(), "secret") {
			t.Errorf("error shows the password: %v", err)
		}
	}
	p, err := NewPaho(PahoOptions{BrokerURL: "tcp://127.0.0.1:1", Handler: func(Message) {}})
	if err != nil {
		t.Fatal(err)
	}
	if p.opts.ClientID != DefaultClientID {
		t.Errorf("ClientID = %q, want %q", p.opts.ClientID, DefaultClientID)
	}
	if p.Connected() {
		t.Error("Connected before Start")
	}
	if err := p.Publish(context.Background(), "a", nil, false); err == nil {
		t.Error("Publish before Start: want error")
	}
}

// attemptListener stands where a broker should be: it counts the
// connections made to it and, unlike a broker, never answers them.
type attemptListener struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

// listenAttempts starts an attemptListener on a free port of 127.0.0.1.
// With hold it keeps every connection open (a connect attempt that hangs),
// otherwise it closes it at once (a connect attempt that fails).
func listenAttempts(t *testing.T, hold bool) *attemptListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &attemptListener{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			a.mu.Lock()
			a.conns = append(a.conns, c)
			a.mu.Unlock()
			if !hold {
				_ = c.Close()
			}
		}
	}()
	t.Cleanup(a.close)
	return a
}

func (a *attemptListener) port() int { return a.ln.Addr().(*net.TCPAddr).Port }

func (a *attemptListener) attempts() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.conns)
}

// close stops listening and drops every connection.
func (a *attemptListener) close() {
	_ = a.ln.Close()
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, c := range a.conns {
		_ = c.Close()
	}
}

func TestPahoStartRetriesUntilBrokerUp(t *testing.T) {
	// No broker yet: every connect attempt fails.
	l := listenAttempts(t, false)
	port := l.port()
	rec := newRecorder()
	p, err := NewPaho(PahoOptions{
		BrokerURL:      fmt.Sprintf("tcp://127.0.0.1:%d", port),
		ClientID:       operatorID,
		Handler:        rec.handle,
		Logger:         testLogger(t),
		ConnectTimeout: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	runBus(t, p)
	eventually(t, "a failed attempt and a retry", func() bool { return l.attempts() >= 2 })
	if p.Connected() {
		t.Fatal("connected without a broker")
	}
	l.close()
	startMosquittoOn(t, port)
	eventually(t, "the operator has subscribed", p.subscribed)
}

func TestPahoStartReturnsWhileConnecting(t *testing.T) {
	// A broker that never answers CONNECT: the attempt hangs for a minute.
	l := listenAttempts(t, true)
	p, err := NewPaho(PahoOptions{
		BrokerURL:      fmt.Sprintf("tcp://127.0.0.1:%d", l.port()),
		Handler:        func(Message) {},
		Logger:         testLogger(t),
		ConnectTimeout: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := runBus(t, p)
	eventually(t, "a connect attempt under way", func() bool { return l.attempts() >= 1 })
	stop() // fails the test if Start does not return within waitTimeout
	if err := p.Start(context.Background()); err == nil {
		t.Error("second Start: want error")
	}
}

func TestPahoDeliversReports(t *testing.T) {
	addr := startMosquitto(t)
	rec := newRecorder()
	startOperator(t, addr, rec)

	dev := connectDevice(t, deviceOpts(addr, "dev-1"))
	// An invalid request id matches the operator's filter but not the
	// protocol: it is acknowledged and dropped.
	long := strings.Repeat("x", protocol.MaxRequestIDLength+1)
	waitToken(t, "publish invalid", dev.Publish(protocol.Root+"/dev-1/reported/"+long, 1, false, []byte(`{}`)))
	// Not a kubetwin topic: the operator does not subscribe to it.
	waitToken(t, "publish other", dev.Publish("other/topic", 1, false, []byte(`{}`)))

	payload := []byte(`{"temp":21.5}`)
	waitToken(t, "publish", dev.Publish(protocol.ReportedTopic("dev-1", "r1"), 1, false, payload))
	m := rec.next(t)
	want := protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindReported, RequestID: "r1"}
	if m.Inbound != want || string(m.Payload) != string(payload) {
		t.Errorf("got %+v %q, want %+v %q", m.Inbound, m.Payload, want, payload)
	}
	if m.Received.IsZero() {
		t.Error("Received is zero")
	}
	m.Ack()

	for _, topic := range []string{protocol.GetTopic("dev-1", "g"), protocol.AckTopic("dev-1"), protocol.PresenceTopic("dev-1")} {
		waitToken(t, "publish", dev.Publish(topic, 1, false, []byte(`{}`)))
		m := rec.next(t)
		if m.DeviceID != "dev-1" {
			t.Errorf("%s: %+v", topic, m.Inbound)
		}
		m.Ack()
	}
	rec.none(t, 200*time.Millisecond)
}

func TestPahoRedeliversUnacked(t *testing.T) {
	addr := startMosquitto(t)
	rec := newRecorder()
	_, stop := startOperator(t, addr, rec)

	dev := connectDevice(t, deviceOpts(addr, "dev-1"))
	long := strings.Repeat("x", protocol.MaxRequestIDLength+1)
	waitToken(t, "publish invalid", dev.Publish(protocol.Root+"/dev-1/reported/"+long, 1, false, []byte(`{}`)))
	waitToken(t, "publish", dev.Publish(protocol.ReportedTopic("dev-1", "r1"), 1, false, []byte(`{"a":1}`)))
	m := rec.next(t)
	if m.RequestID != "r1" {
		t.Fatalf("got %+v", m.Inbound)
	}
	// The operator goes away before it acknowledges.
	stop()

	// The next operator process gets the message again.
	rec2 := newRecorder()
	_, stop2 := startOperator(t, addr, rec2)
	m2 := rec2.next(t)
	if m2.Inbound != m.Inbound || string(m2.Payload) != `{"a":1}` {
		t.Fatalf("redelivered %+v %q, want %+v", m2.Inbound, m2.Payload, m.Inbound)
	}
	m.Ack() // the first process's Ack: its connection is gone, so no effect
	m2.Ack()
	rec2.none(t, 300*time.Millisecond) // the invalid message was acknowledged at once
	stop2()

	// Everything was acknowledged: a third process gets nothing.
	rec3 := newRecorder()
	startOperator(t, addr, rec3)
	rec3.none(t, time.Second)
}

func TestPahoQueuesWhileOffline(t *testing.T) {
	addr := startMosquitto(t)
	rec := newRecorder()
	_, stop := startOperator(t, addr, rec) // creates the persistent session
	stop()

	dev := connectDevice(t, deviceOpts(addr, "dev-1"))
	for _, rid := range []string{"r1", "r2", "r3"} {
		waitToken(t, "publish", dev.Publish(protocol.ReportedTopic("dev-1", rid), 1, false, []byte(`{}`)))
	}

	// The broker sends the queued messages right after CONNACK, before the
	// new process subscribes again; none may be lost.
	rec2 := newRecorder()
	startOperator(t, addr, rec2)
	got := map[string]bool{}
	for range 3 {
		m := rec2.next(t)
		got[m.RequestID] = true
		m.Ack()
	}
	if !got["r1"] || !got["r2"] || !got["r3"] {
		t.Errorf("got %v, want r1, r2, r3", got)
	}
	rec2.none(t, 300*time.Millisecond)
}

func TestPahoPublish(t *testing.T) {
	addr := startMosquitto(t)
	rec := newRecorder()
	p, _ := startOperator(t, addr, rec)
	ctx := context.Background()

	doc := []byte(`{"fan":"on","$version":7}`)
	if err := p.Publish(ctx, protocol.DesiredTopic("dev-1"), doc, true); err != nil {
		t.Fatal(err)
	}
	// A device that subscribes later gets the retained document.
	dev := connectDevice(t, deviceOpts(addr, "dev-1"))
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

	if err := p.Publish(ctx, protocol.ResponseTopic("dev-1", "r1"), []byte(`{"status":204}`), false); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		t.Errorf("unexpected %q", m.Topic())
	case <-time.After(100 * time.Millisecond):
	}

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := p.Publish(cctx, protocol.DesiredTopic("dev-1"), doc, true); err == nil {
		t.Error("Publish with a cancelled context: want error")
	}
	rec.none(t, 100*time.Millisecond)
}

// One device's messages reach the Handler in the order the device sent
// them, even when the Handler is slow and several devices interleave.
func TestPahoKeepsPerDeviceOrder(t *testing.T) {
	addr := startMosquitto(t)
	const devices, perDevice = 4, 100
	var mu sync.Mutex
	seen := map[string][]int{}
	done := make(chan struct{})
	total := 0
	p, err := NewPaho(PahoOptions{BrokerURL: "tcp://" + addr, ClientID: "op-order", Logger: testLogger(t), Handler: func(m Message) {
		var n int
		_, _ = fmt.Sscanf(m.RequestID, "r%d", &n)
		time.Sleep(time.Duration(n%3) * time.Millisecond) // uneven handling time
		mu.Lock()
		seen[m.DeviceID] = append(seen[m.DeviceID], n)
		total++
		if total == devices*perDevice {
			close(done)
		}
		mu.Unlock()
		m.Ack()
	}})
	if err != nil {
		t.Fatal(err)
	}
	runBus(t, p)
	eventually(t, "operator subscribed", p.subscribed)
	var wg sync.WaitGroup
	for d := range devices {
		id := fmt.Sprintf("ord-%d", d)
		dev := connectDevice(t, deviceOpts(addr, id))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perDevice {
				dev.Publish(protocol.ReportedTopic(id, fmt.Sprintf("r%d", i)), 1, false, []byte(`{}`)).Wait()
			}
		}()
	}
	wg.Wait()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("handler got %d of %d messages", total, devices*perDevice)
	}
	for id, ns := range seen {
		for i, n := range ns {
			if n != i {
				t.Fatalf("device %s: message %d handled at position %d: %v", id, n, i, ns)
			}
		}
	}
}
