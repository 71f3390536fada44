package abuse

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/kubetwin/kubetwin/internal/testutil/mqttwire"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// Attacker source addresses: 127.0.0.0/8 is all loopback, so each attack
// comes from an address of its own and per-IP limits do not touch the
// fleet, which connects from 127.0.0.1.
var (
	hugeSource    = net.IPv4(127, 0, 0, 2)
	silentSource  = net.IPv4(127, 0, 0, 3)
	floodSource   = net.IPv4(127, 0, 0, 4)
	logSource     = net.IPv4(127, 0, 0, 5)
	wsHugeSource  = net.IPv4(127, 0, 0, 6)
	wsQuietSource = net.IPv4(127, 0, 0, 7)
)

// quickClose is how soon a connection the broker must refuse outright has
// to be closed: well under the CONNECT deadline, so that the deadline
// cannot be what closed it.
const quickClose = 5 * time.Second

// hugeHeader is a CONNECT fixed header announcing a 200 MiB packet.
func hugeHeader() []byte { return append([]byte{pktConnect}, mqttwire.RemainingLength(200<<20)...) }

// attackHugePacket: connections that announce a 200 MiB packet before
// authenticating must be dropped at once, without the broker reserving the
// memory (the window checks the heap).
func attackHugePacket(t *testing.T, h *harness) {
	const n = 5
	conns := make([]*rawConn, 0, n)
	for range n {
		c, err := dialRaw(h.tlsAddr, dialOptions{tls: h.tlsConfig, source: hugeSource})
		if err != nil {
			t.Fatalf("dialing the TLS listener: %v", err)
		}
		t.Cleanup(func() { _ = c.Close() })
		if err := c.send(hugeHeader(), 5*time.Second); err != nil {
			t.Fatalf("sending the fixed header: %v", err)
		}
		conns = append(conns, c)
	}
	open := countOpen(conns, quickClose)
	if open > 0 {
		t.Errorf("%d of %d TLS connections that announced a 200 MiB CONNECT were still open after %s: the broker has no maximum packet size (--mqtt-max-packet-size, broker-limits, item 1)",
			open, n, quickClose)
	}
}

// countOpen returns how many connections the broker has not closed
// within d (all are watched at once).
func countOpen(conns []*rawConn, d time.Duration) int {
	var open atomic.Int32
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if !c.closedWithin(d) {
				open.Add(1)
			}
		}()
	}
	wg.Wait()
	return int(open.Load())
}

// attackSilent: connections that never send CONNECT (half of them not even
// a TLS handshake) must be closed after the CONNECT deadline, and their
// goroutines must go.
func attackSilent(t *testing.T, h *harness) {
	const n = 400
	before, _, err := h.mon.metric("go_goroutines")
	if err != nil {
		t.Fatalf("reading go_goroutines: %v", err)
	}
	conns := make([]*rawConn, 0, n)
	for i := range n {
		c, err := dialRaw(h.tlsAddr, dialOptions{tls: h.tlsConfig, source: silentSource, noHandshake: i%2 == 0})
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		t.Cleanup(func() { _ = c.Close() })
		conns = append(conns, c)
	}
	during, _, _ := h.mon.metric("go_goroutines")
	t.Logf("goroutines: %v before, %v with %d silent connections", before, during, n)
	wait := connectTimeout + 10*time.Second
	if open := countOpen(conns, wait); open > 0 {
		t.Errorf("%d of %d connections that never sent CONNECT were still open after %s: no CONNECT deadline (--mqtt-connect-timeout %s, broker-limits, item 1)",
			open, n, wait, connectTimeout)
	}
	eventually(t, 20*time.Second, "the broker's connection gauge returns to the fleet's connections", func() error {
		v, ok, err := h.mon.metric(metricConnections)
		switch {
		case err != nil:
			return err
		case !ok:
			return fmt.Errorf("the operator does not expose %s (broker-limits)", metricConnections)
		case int(v) > len(h.fleet.devs)+20:
			return fmt.Errorf("%s is %v with %d devices connected", metricConnections, v, len(h.fleet.devs))
		}
		return nil
	})
	eventually(t, 20*time.Second, "the goroutines of closed silent connections are released", func() error {
		now, _, err := h.mon.metric("go_goroutines")
		if err != nil {
			return err
		}
		if now > before+100 {
			return fmt.Errorf("go_goroutines %v, %v before the attack", now, before)
		}
		return nil
	})
}

// attackIPFlood: connections from one address beyond the per-IP cap are
// refused at once, while a device from another address still connects.
func attackIPFlood(t *testing.T, h *harness) {
	n := h.perIPCap + 200
	conns := make([]*rawConn, 0, n)
	for i := range n {
		c, err := dialRaw(h.tlsAddr, dialOptions{tls: h.tlsConfig, source: floodSource, noHandshake: true})
		if err != nil {
			// A refusal at the TCP level is a refusal too.
			continue
		}
		t.Cleanup(func() { _ = c.Close() })
		conns = append(conns, c)
		if i == h.perIPCap {
			// TCP accepts them all; the broker closes those over the cap.
			t.Logf("%d connections from %s dialed, the cap (--mqtt-max-connections-per-ip) is %d", len(conns), floodSource, h.perIPCap)
		}
	}
	ids := h.devices(t, "flood", 1, "")
	if err := probeDevice(h, t, ids[0]); err != nil {
		t.Errorf("a device from 127.0.0.1 could not connect and GET its twin during a connection flood from %s: %v", floodSource, err)
	}
	open := countOpen(conns, quickClose)
	if refused := n - open; refused < n-h.perIPCap {
		t.Errorf("only %d of %d connections from %s were refused within %s: the per-IP cap of %d is not enforced (--mqtt-max-connections-per-ip, broker-limits, item 1)",
			refused, n, floodSource, quickClose, h.perIPCap)
	}
}

// probeDevice connects as a device over TLS and GETs its twin.
func probeDevice(h *harness, t *testing.T, id string) error {
	c, err := dialRaw(h.tlsAddr, dialOptions{tls: h.tlsConfig})
	if err != nil {
		return err
	}
	defer c.Close()
	user, pw := h.credentials(t, id)
	if _, code, err := c.connect(id, user, pw, true); err != nil || code != 0 {
		return fmt.Errorf("CONNECT: return code %d, %v", code, err)
	}
	if g, err := c.subscribe(1, protocol.ResponseFilter(id), 1); err != nil || g > 2 {
		return fmt.Errorf("SUBSCRIBE: granted %d, %v", g, err)
	}
	r, err := request(c, id, protocol.KindGet, h.rid("p1"), nil)
	if err != nil {
		return err
	}
	if r.Status != 200 {
		return fmt.Errorf("GET answered %d: %s", r.Status, r.Error)
	}
	return nil
}

// dialWS opens an MQTT-over-WebSockets connection to the service API port.
func dialWS(h *harness, source net.IP) (*websocket.Conn, error) {
	d := websocket.Dialer{
		TLSClientConfig:  h.tlsConfig,
		Subprotocols:     []string{"mqtt"},
		HandshakeTimeout: 10 * time.Second,
		NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			nd := net.Dialer{LocalAddr: &net.TCPAddr{IP: source}}
			return nd.DialContext(ctx, network, addr)
		},
	}
	c, resp, err := d.Dial("wss://"+h.svcAddr+"/$iothub/websocket", nil)
	if resp != nil && resp.Body != nil {
		_ = resp.Body.Close()
	}
	if err != nil {
		status := ""
		if resp != nil {
			status = " (" + resp.Status + ")"
		}
		return nil, fmt.Errorf("WebSocket upgrade%s: %w", status, err)
	}
	return c, nil
}

// wsClosedWithin reports whether the server closes a WebSocket within d.
func wsClosedWithin(c *websocket.Conn, d time.Duration) bool {
	_ = c.SetReadDeadline(time.Now().Add(d))
	for {
		if _, _, err := c.NextReader(); err != nil {
			var ne net.Error
			return !(errors.As(err, &ne) && ne.Timeout())
		}
	}
}

// attackWebSocket repeats the pre-authentication attacks over MQTT over
// WebSockets, which the service API's HTTPS server hands to the broker.
func attackWebSocket(t *testing.T, h *harness) {
	var huge []*websocket.Conn
	for range 3 {
		c, err := dialWS(h, wsHugeSource)
		if err != nil {
			t.Fatalf("%v", err)
		}
		t.Cleanup(func() { _ = c.Close() })
		if err := c.WriteMessage(websocket.BinaryMessage, hugeHeader()); err != nil {
			t.Fatalf("sending the fixed header: %v", err)
		}
		huge = append(huge, c)
	}
	const quiet = 200
	var silent []*websocket.Conn
	for i := range quiet {
		c, err := dialWS(h, wsQuietSource)
		if err != nil {
			t.Fatalf("WebSocket %d: %v", i, err)
		}
		t.Cleanup(func() { _ = c.Close() })
		silent = append(silent, c)
	}
	countWSOpen := func(cs []*websocket.Conn, d time.Duration) int {
		var open atomic.Int32
		var wg sync.WaitGroup
		for _, c := range cs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if !wsClosedWithin(c, d) {
					open.Add(1)
				}
			}()
		}
		wg.Wait()
		return int(open.Load())
	}
	if open := countWSOpen(huge, quickClose); open > 0 {
		t.Errorf("%d of %d WebSocket connections that announced a 200 MiB CONNECT were still open after %s: no maximum packet size over WebSockets (broker-limits, item 1)",
			open, len(huge), quickClose)
	}
	wait := connectTimeout + 10*time.Second
	if open := countWSOpen(silent, wait); open > 0 {
		t.Errorf("%d of %d WebSocket connections that never sent CONNECT were still open after %s: the WebSocket path has no CONNECT deadline (broker-limits, item 1)",
			open, quiet, wait)
	}
	// The HTTPS server itself must still answer.
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: h.tlsConfig}}
	resp, err := hc.Get("https://" + h.svcAddr + "/$iothub/websocket")
	if err != nil {
		t.Errorf("the service API's HTTPS server stopped answering after the WebSocket attacks: %v", err)
	} else {
		_ = resp.Body.Close()
	}
}
