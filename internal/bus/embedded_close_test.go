package bus

import (
	"bytes"
	"context"
	"errors"
	"io"
	"runtime/pprof"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestEmbeddedStopsWhileClientsComeAndGo: the broker's Close returns while
// clients connect and disconnect. mochi's Clients.GetByListener, which its
// listener close path calls, takes the client map's read lock twice; a
// client added or removed in between (its write lock waiting) deadlocked
// Close for good (1 run in about 100 of the small embedded tests under
// -race; here at the first stop). Here the map's writers never stop while
// the broker stops.
func TestEmbeddedStopsWhileClientsComeAndGo(t *testing.T) {
	for i := range 20 {
		b, err := NewEmbedded(EmbeddedOptions{Listen: "127.0.0.1:0", Handler: func(Message) {}, Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() { errc <- b.Start(ctx) }()
		select {
		case <-b.Ready():
		case <-time.After(waitTimeout):
			t.Fatal("embedded bus not ready")
		}
		// What a connection's start and end do to the map, as fast as the
		// lock allows.
		stop := make(chan struct{})
		var wg sync.WaitGroup
		// On failure the writers stay blocked in the deadlock: the
		// cleanup only tells them to stop.
		stopOnce := sync.OnceFunc(func() { close(stop) })
		t.Cleanup(stopOnce)
		for w := range 2 {
			wg.Go(func() {
				cl := b.server.NewClient(nil, embeddedListenerID, string(rune('a'+w)), false)
				for {
					select {
					case <-stop:
						return
					default:
					}
					b.server.Clients.Add(cl)
					b.server.Clients.Delete(cl.ID)
				}
			})
		}
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(waitTimeout):
			var buf bytes.Buffer
			_ = pprof.Lookup("goroutine").WriteTo(&buf, 1)
			t.Fatalf("stop %d: Start did not return after its context ended; goroutines:\n%s", i, buf.String())
		}
		stopOnce()
		wg.Wait()
	}
}

// TestEmbeddedStopTellsMQTT5Clients: a stopping broker still tells an MQTT 5
// client why (DISCONNECT 0x8B, server shutting down), as mochi's own
// listener close does, then closes the connection.
func TestEmbeddedStopTellsMQTT5Clients(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	c := dialRaw(t, f.bus.Addr(), "dev-stop", 5)
	f.stop()
	b := c.read(waitTimeout)
	if len(b) < 3 || b[0] != packets.Disconnect<<4 || b[2] != packets.ErrServerShuttingDown.Code {
		t.Fatalf("got % x, want DISCONNECT with reason %#x", b, packets.ErrServerShuttingDown.Code)
	}
	_ = c.conn.SetReadDeadline(time.Now().Add(waitTimeout))
	if _, err := c.r.ReadByte(); !errors.Is(err, io.EOF) {
		t.Fatalf("after DISCONNECT: %v, want the connection closed (EOF)", err)
	}
}
