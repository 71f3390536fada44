package bus

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// embeddedWSListenerID names the connections that come in through
// WebSocketHandler.
const embeddedWSListenerID = "kubetwin-ws"

// WebSocketPath is where Azure IoT device SDKs look for MQTT over
// WebSockets: wss://<hub>:443/$iothub/websocket.
const WebSocketPath = "/$iothub/websocket"

// wsHandshakeTimeout bounds the WebSocket upgrade.
const wsHandshakeTimeout = 10 * time.Second

// WebSocketHandler serves MQTT over WebSockets (subprotocol "mqtt", binary
// frames) with the embedded broker, as IoT Hub does on
// wss://<hub>:443/$iothub/websocket for devices whose network lets only
// HTTPS out (the Azure IoT SDKs' MqttWs transports). Mount it on an HTTPS
// server at WebSocketPath; TLS is that server's. A connection is an MQTT
// client like any other: the same authentication, topics, IoT Hub dialect
// and presence. While the broker is not running (this replica is not the
// leader, or it is stopping) the handler answers 503.
func (e *Embedded) WebSocketHandler() http.Handler {
	up := &websocket.Upgrader{
		HandshakeTimeout: wsHandshakeTimeout,
		Subprotocols:     []string{"mqtt"},
		// Devices are not browsers; what they may do is decided by their
		// MQTT credentials.
		CheckOrigin: func(*http.Request) bool { return true },
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !e.running.Load() {
			http.Error(w, "the MQTT broker is not running on this replica", http.StatusServiceUnavailable)
			return
		}
		if !websocket.IsWebSocketUpgrade(r) {
			http.Error(w, "MQTT over WebSockets: send a WebSocket upgrade (subprotocol mqtt)", http.StatusBadRequest)
			return
		}
		ip, ok := e.limiter.admit(embeddedWSListenerID, r.RemoteAddr)
		if !ok {
			http.Error(w, "the MQTT broker has too many connections", http.StatusServiceUnavailable)
			return
		}
		c, err := up.Upgrade(w, r, nil) // writes the error reply itself
		if err != nil {
			e.limiter.release(ip)
			e.log.V(1).Info("WebSocket upgrade failed", "remote", r.RemoteAddr, "reason", err.Error())
			return
		}
		// Replaces the HTTP server's deadlines with the connect timeout;
		// after CONNECT the broker sets the read deadline (the client's
		// keepalive) and every write gets the write timeout.
		conn := e.limiter.wrap(&wsConn{Conn: c.UnderlyingConn(), ws: c}, nil, ip, embeddedWSListenerID)
		defer func() { _ = conn.Close() }()
		// Serves the client until it disconnects.
		if err := e.server.EstablishConnection(embeddedWSListenerID, conn); err != nil && !errors.Is(err, io.EOF) {
			e.log.V(1).Info("WebSocket MQTT connection ended", "remote", r.RemoteAddr, "reason", err.Error())
		}
	})
}

// wsListener registers WebSocket connections with the broker, so that they
// are closed with it; the connections themselves come from
// WebSocketHandler.
type wsListener struct {
	lim        *connLimiter
	disconnect func(listener string) // see limitListener
}

func (wsListener) Init(*slog.Logger) error     { return nil }
func (wsListener) Serve(listeners.EstablishFn) {}
func (wsListener) ID() string                  { return embeddedWSListenerID }
func (wsListener) Address() string             { return WebSocketPath }
func (wsListener) Protocol() string            { return "wss" }
func (l wsListener) Close(listeners.CloseFn) {
	l.disconnect(embeddedWSListenerID)
	l.lim.closeListener(embeddedWSListenerID) // those that sent no CONNECT
}

// wsConn is a WebSocket connection as the byte stream MQTT runs on: each
// write is one binary message, and reads run through the binary messages
// in order. Write deadlines go through the websocket.Conn, which sets its
// own on the underlying connection before every write.
type wsConn struct {
	net.Conn // addresses and read deadlines of the underlying connection
	ws       *websocket.Conn
	r        io.Reader
	wmu      sync.Mutex
}

func (c *wsConn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			typ, r, err := c.ws.NextReader()
			if err != nil {
				return 0, err
			}
			if typ != websocket.BinaryMessage {
				return 0, errors.New("MQTT over WebSockets: a text frame; MQTT goes in binary frames")
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsConn) Close() error { return c.ws.Close() }

func (c *wsConn) SetDeadline(t time.Time) error {
	return errors.Join(c.ws.SetReadDeadline(t), c.ws.SetWriteDeadline(t))
}

func (c *wsConn) SetReadDeadline(t time.Time) error  { return c.ws.SetReadDeadline(t) }
func (c *wsConn) SetWriteDeadline(t time.Time) error { return c.ws.SetWriteDeadline(t) }
