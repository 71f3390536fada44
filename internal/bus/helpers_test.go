package bus

import (
	"bytes"
	"context"
	"runtime/pprof"
	"sync"
	"testing"
	"time"

	"github.com/kubetwin/kubetwin/internal/testutil/mosquitto"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
)

// waitTimeout bounds every wait for something that should happen.
const waitTimeout = 10 * time.Second

// testLogger logs through t.Log (verbose enough to debug a failure with -v).
func testLogger(t *testing.T) logr.Logger {
	t.Helper()
	var mu sync.Mutex
	done := false
	t.Cleanup(func() { mu.Lock(); done = true; mu.Unlock() })
	return funcr.New(func(prefix, args string) {
		mu.Lock()
		defer mu.Unlock()
		if !done { // t.Log after the test ends panics
			t.Log(prefix, args)
		}
	}, funcr.Options{Verbosity: 1})
}

// recorder is a Handler that keeps what it receives.
type recorder struct {
	ch chan Message
}

func newRecorder() *recorder { return &recorder{ch: make(chan Message, 100)} }

func (r *recorder) handle(m Message) { r.ch <- m }

// next waits for the next message.
func (r *recorder) next(t *testing.T) Message {
	t.Helper()
	select {
	case m := <-r.ch:
		return m
	case <-time.After(waitTimeout):
		t.Fatal("timed out waiting for a message")
		return Message{}
	}
}

// none asserts that no message arrives within d.
func (r *recorder) none(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case m := <-r.ch:
		t.Fatalf("unexpected message %+v (payload %q)", m.Inbound, m.Payload)
	case <-time.After(d):
	}
}

// eventually polls cond until it holds or waitTimeout passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// progressing polls n until it reaches want, failing once waitTimeout
// passes without n rising, or when n reports an error: work that is slow
// but goes on (CPU-bound, under the race detector on a loaded machine)
// passes, work that has stopped fails.
func progressing(t *testing.T, what string, want int, n func() (int, error)) {
	t.Helper()
	last, deadline := -1, time.Time{}
	for {
		got, err := n()
		if err != nil {
			t.Fatalf("waiting until %s: %v", what, err)
		}
		if got >= want {
			return
		}
		if got > last {
			last, deadline = got, time.Now().Add(waitTimeout)
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s: %d of %d, none more for %v", what, got, want, waitTimeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runBus starts b in the background and stops it (waiting for Start to
// return) when the test ends or when the returned stop is called.
func runBus(t *testing.T, b Bus) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- b.Start(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-errc:
				if err != nil {
					t.Errorf("Start: %v", err)
				}
			case <-time.After(waitTimeout):
				// The stacks show what the broker's Close is waiting for.
				var buf bytes.Buffer
				_ = pprof.Lookup("goroutine").WriteTo(&buf, 1)
				t.Errorf("Start did not return after its context ended; goroutines:\n%s", buf.String())
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// deviceOpts are the client options of a test device.
func deviceOpts(brokerAddr, clientID string) *paho.ClientOptions {
	return paho.NewClientOptions().
		AddBroker("tcp://" + brokerAddr).
		SetClientID(clientID).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectTimeout(5 * time.Second).
		SetWriteTimeout(5 * time.Second)
}

// connectDevice connects a device client and disconnects it when the test
// ends.
func connectDevice(t *testing.T, o *paho.ClientOptions) paho.Client {
	t.Helper()
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
		t.Fatalf("device connect: %v", tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c
}

// waitToken waits for a token and fails on error.
func waitToken(t *testing.T, what string, tok paho.Token) {
	t.Helper()
	if !tok.WaitTimeout(waitTimeout) {
		t.Fatalf("%s: timed out", what)
	}
	if err := tok.Error(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// startMosquitto runs a Mosquitto broker on a free port of 127.0.0.1 for
// the rest of the test and returns its address.
func startMosquitto(t *testing.T) string {
	t.Helper()
	return mosquitto.Start(t, "allow_anonymous true\n")
}

// startMosquittoOn is startMosquitto on a given port.
func startMosquittoOn(t *testing.T, port int) string {
	t.Helper()
	addr, log, err := mosquitto.StartOn(t, port, "allow_anonymous true\n")
	if err != nil {
		t.Fatalf("%v\n%s", err, log)
	}
	return addr
}
