package bus

// This file bounds what a client, authenticated or not, can cost the
// embedded broker: how many connections there are (in all and per source
// address), how long a connection may take to send its CONNECT (the TLS or
// WebSocket handshake included), how large a packet may be, and how long a
// client that does not read may hold up writes to it.
//
// Every connection, whichever listener it came in on, is a limitConn: a
// net.Conn whose writes are queued (bounded) and written, each with a
// deadline, by a goroutine that runs while packets wait (an idle connection
// costs none), so that no caller of mochi's WritePacket
// (which holds the client's lock while it writes) waits for the client's
// socket: not the operator's Publish, not an Ack's PUBACK, not another
// device's forwarded message. A client whose queue overflows, or that does
// not take a packet within the write timeout, is disconnected. Its reads
// track the packets' fixed headers, so that a packet over the maximum size
// is refused from its fixed header, before its body is read or buffered.

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/kubetwin/kubetwin/internal/ratelog"
)

// Defaults of EmbeddedLimits.
const (
	DefaultMaxPacketSize       = 64 << 10
	DefaultMQTTConnectTimeout  = 10 * time.Second
	DefaultWriteTimeout        = 10 * time.Second
	DefaultMaxClientQueue      = 256
	DefaultMaxClientQueueBytes = 1 << 20
	DefaultMaxConnections      = 100000
	DefaultMaxConnectionsPerIP = 1000
)

// Reasons of kubetwin_broker_connections_refused_total and
// kubetwin_broker_slow_consumer_disconnects_total.
const (
	// ReasonMaxConnections: the broker had --mqtt-max-connections open.
	ReasonMaxConnections = "max_connections"
	// ReasonMaxConnectionsPerIP: the source address had
	// --mqtt-max-connections-per-ip open.
	ReasonMaxConnectionsPerIP = "max_connections_per_ip"
	// ReasonWriteTimeout: a packet was not taken within the write timeout.
	ReasonWriteTimeout = "write_timeout"
	// ReasonQueueFull: more packets waited for the client than its queue
	// holds.
	ReasonQueueFull = "queue_full"
)

// EmbeddedLimits bounds what clients may cost the embedded broker. A zero
// field takes its default.
type EmbeddedLimits struct {
	// MaxPacketSize is the largest packet, fixed header included, a client
	// may send, in bytes (MQTT 5 clients are told in CONNACK). A larger one
	// is refused from its fixed header: the connection is closed (MQTT 5:
	// after DISCONNECT 0x95 "packet too large"). DefaultMaxPacketSize if
	// zero.
	MaxPacketSize int
	// ConnectTimeout is how long a connection may take from accept to a
	// complete CONNECT packet, TLS or WebSocket handshake included; then
	// it is closed. DefaultMQTTConnectTimeout if zero.
	ConnectTimeout time.Duration
	// WriteTimeout bounds the write of each packet to a client; a client
	// that takes none for that long is disconnected. DefaultWriteTimeout
	// if zero.
	WriteTimeout time.Duration
	// MaxClientQueue is how many packets may wait to be written to one
	// client (in mochi's queue and, as many again, in the connection's);
	// one more disconnects it. DefaultMaxClientQueue if zero.
	MaxClientQueue int
	// MaxClientQueueBytes bounds the bytes waiting on one client's
	// connection; a packet that would pass it disconnects the client (a
	// single packet larger than it is still sent when nothing else
	// waits). It bounds what a client that stops reading makes the
	// broker hold: with 64 KiB packets, MaxClientQueue of them would be
	// 16 MiB per client. DefaultMaxClientQueueBytes if zero.
	MaxClientQueueBytes int
	// MaxConnections bounds the open connections of all listeners, from
	// accept on; one more is closed at once (WebSocket: HTTP 503).
	// DefaultMaxConnections if zero.
	MaxConnections int
	// MaxConnectionsPerIP bounds the open connections from one source
	// address, as the broker sees it. DefaultMaxConnectionsPerIP if zero.
	MaxConnectionsPerIP int
}

// withDefaults returns l with its zero fields set to their defaults, or an
// error naming a negative field.
func (l EmbeddedLimits) withDefaults() (EmbeddedLimits, error) {
	for _, f := range []struct {
		name string
		v    int64
	}{
		{"MaxPacketSize", int64(l.MaxPacketSize)},
		{"ConnectTimeout", int64(l.ConnectTimeout)},
		{"WriteTimeout", int64(l.WriteTimeout)},
		{"MaxClientQueue", int64(l.MaxClientQueue)},
		{"MaxClientQueueBytes", int64(l.MaxClientQueueBytes)},
		{"MaxConnections", int64(l.MaxConnections)},
		{"MaxConnectionsPerIP", int64(l.MaxConnectionsPerIP)},
	} {
		if f.v < 0 {
			return l, fmt.Errorf("embedded bus: Limits.%s must not be negative, got %d", f.name, f.v)
		}
	}
	// The largest size the fixed header's remaining length can express.
	if l.MaxPacketSize > 1+4+268435455 {
		return l, fmt.Errorf("embedded bus: Limits.MaxPacketSize %d is beyond what MQTT can express (256 MiB)", l.MaxPacketSize)
	}
	if l.MaxClientQueue > 1<<30 {
		return l, fmt.Errorf("embedded bus: Limits.MaxClientQueue %d is too large", l.MaxClientQueue)
	}
	if l.MaxPacketSize == 0 {
		l.MaxPacketSize = DefaultMaxPacketSize
	}
	if l.ConnectTimeout == 0 {
		l.ConnectTimeout = DefaultMQTTConnectTimeout
	}
	if l.WriteTimeout == 0 {
		l.WriteTimeout = DefaultWriteTimeout
	}
	if l.MaxClientQueue == 0 {
		l.MaxClientQueue = DefaultMaxClientQueue
	}
	if l.MaxClientQueueBytes == 0 {
		l.MaxClientQueueBytes = DefaultMaxClientQueueBytes
	}
	if l.MaxConnections == 0 {
		l.MaxConnections = DefaultMaxConnections
	}
	if l.MaxConnectionsPerIP == 0 {
		l.MaxConnectionsPerIP = DefaultMaxConnectionsPerIP
	}
	return l, nil
}

// applyTo sets mochi's capabilities that enforce l. mochi checks the
// packet size itself too, from the fixed header; the connection checks it
// first (see packetSizer) so that an MQTT 5 client is told why.
func (l EmbeddedLimits) applyTo(c *mqtt.Capabilities) {
	c.MaximumPacketSize = uint32(l.MaxPacketSize)
	c.MaximumClientWritesPending = int32(l.MaxClientQueue)
}

var (
	// BrokerConnections is the number of open connections.
	BrokerConnections = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "kubetwin", Subsystem: "broker", Name: "connections",
		Help: "Open network connections of the embedded broker (TCP, TLS, WebSocket), from accept to close, authenticated or not.",
	})
	// BrokerConnectionsRefused counts connections closed at accept.
	BrokerConnectionsRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "broker", Name: "connections_refused_total",
		Help: "Connections the embedded broker closed at accept because of a connection limit, by reason (max_connections, max_connections_per_ip).",
	}, []string{"reason"})
	// BrokerConnectTimeouts counts connections closed for not sending
	// CONNECT in time.
	BrokerConnectTimeouts = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "broker", Name: "connect_timeouts_total",
		Help: "Connections the embedded broker closed because they did not complete their handshake and CONNECT within the connect timeout.",
	})
	// BrokerOversizedPackets counts connections closed for a packet over
	// the maximum size.
	BrokerOversizedPackets = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "broker", Name: "oversized_packets_total",
		Help: "Packets over the maximum packet size the embedded broker refused from their fixed header (closing the connection).",
	})
	// BrokerSlowConsumerDisconnects counts clients disconnected because
	// they did not read.
	BrokerSlowConsumerDisconnects = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "broker", Name: "slow_consumer_disconnects_total",
		Help: "Clients the embedded broker disconnected because they did not read what it sent them, by reason (write_timeout, queue_full).",
	}, []string{"reason"})
)

func init() {
	metrics.Registry.MustRegister(BrokerConnections, BrokerConnectionsRefused, BrokerConnectTimeouts,
		BrokerOversizedPackets, BrokerSlowConsumerDisconnects)
}

var (
	// errPacketTooLarge is the read error of a connection that announced
	// a packet over the maximum size.
	errPacketTooLarge = errors.New("packet over the maximum packet size")
	// errSlowConsumer is the write error of a connection closed because
	// its client did not read.
	errSlowConsumer = errors.New("client did not read what the broker sent it")
)

// disconnectTooLarge is an MQTT 5 DISCONNECT with reason 0x95, packet too
// large, and no properties.
var disconnectTooLarge = []byte{packets.Disconnect << 4, 2, packets.ErrPacketTooLarge.Code, 0}

// connLimiter admits, tracks and configures the broker's connections.
type connLimiter struct {
	limits EmbeddedLimits
	log    ratelog.Logger // clients cause these lines

	mu    sync.Mutex
	total int
	perIP map[netip.Addr]int
	conns map[*limitConn]struct{}
}

func newConnLimiter(l EmbeddedLimits, log ratelog.Logger) *connLimiter {
	return &connLimiter{limits: l, log: log, perIP: map[netip.Addr]int{}, conns: map[*limitConn]struct{}{}}
}

// sourceIP is the address connection limits count remote by.
func sourceIP(remote string) netip.Addr {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return netip.Addr{} // all such connections share one count
	}
	return ap.Addr().Unmap()
}

// admit takes a connection slot for a connection from remote, or counts
// and logs the refusal and reports false.
func (l *connLimiter) admit(listener, remote string) (netip.Addr, bool) {
	ip := sourceIP(remote)
	reason := ""
	l.mu.Lock()
	switch {
	case l.total >= l.limits.MaxConnections:
		reason = ReasonMaxConnections
	case l.perIP[ip] >= l.limits.MaxConnectionsPerIP:
		reason = ReasonMaxConnectionsPerIP
	default:
		l.total++
		l.perIP[ip]++
	}
	l.mu.Unlock()
	if reason != "" {
		BrokerConnectionsRefused.WithLabelValues(reason).Inc()
		l.log.Info("refused connection at accept", "remote", remote, "listener", listener, "reason", reason,
			"maxConnections", l.limits.MaxConnections, "maxConnectionsPerIP", l.limits.MaxConnectionsPerIP)
		return ip, false
	}
	BrokerConnections.Inc()
	return ip, true
}

// release gives back the slot admit took.
func (l *connLimiter) release(ip netip.Addr) {
	l.mu.Lock()
	l.total--
	if l.perIP[ip]--; l.perIP[ip] <= 0 {
		delete(l.perIP, ip)
	}
	l.mu.Unlock()
	BrokerConnections.Dec()
}

// wrap makes c, admitted from ip, a limitConn: it must complete its CONNECT
// within the connect timeout. raw, if not nil, is the connection under c
// (TLS): closing it rather than c never blocks on a TLS close alert to a
// client that does not read.
func (l *connLimiter) wrap(c net.Conn, raw io.Closer, ip netip.Addr, listener string) *limitConn {
	if raw == nil {
		raw = c
	}
	lc := &limitConn{Conn: c, raw: raw, lim: l, ip: ip, listener: listener,
		sizer: packetSizer{max: uint64(l.limits.MaxPacketSize)}}
	// Reads and writes: a TLS handshake writes too.
	_ = c.SetDeadline(time.Now().Add(l.limits.ConnectTimeout))
	l.mu.Lock()
	l.conns[lc] = struct{}{}
	l.mu.Unlock()
	return lc
}

// closeListener closes the connections of listener that remain, such as
// those that never sent CONNECT (mochi knows only clients), so that the
// broker's Close, which waits for every connection, does not wait for
// their connect timeout.
func (l *connLimiter) closeListener(listener string) {
	l.mu.Lock()
	var open []*limitConn
	for c := range l.conns {
		if c.listener == listener {
			open = append(open, c)
		}
	}
	l.mu.Unlock()
	for _, c := range open {
		_ = c.Close()
	}
}

// limitConn is a broker connection with the limits applied (see the top of
// this file). mochi reads it from one goroutine; any goroutine may write.
type limitConn struct {
	net.Conn
	raw      io.Closer // what closeSocket closes
	lim      *connLimiter
	ip       netip.Addr
	listener string

	// Read side, used only by the reading goroutine.
	sizer   packetSizer
	readErr error // returned by every Read once set
	tooBig  bool  // readErr is errPacketTooLarge, not yet acted on

	connected atomic.Bool  // the CONNECT packet has been read
	version   atomic.Int32 // the client's protocol version, from CONNECT
	clientID  atomic.Pointer[string]

	mu        sync.Mutex
	queue     [][]byte  // packets waiting for the writer
	publishes int       // PUBLISH packets in queue
	bytes     int       // bytes in queue
	writing   bool      // a writer goroutine runs
	closing   bool      // Close was called: write what is queued, then close
	flushBy   time.Time // with closing: the last deadline of that
	werr      error     // the write side failed; no more writes

	closeOnce sync.Once
}

// Read reads from the connection and refuses a packet whose fixed header
// announces more than the maximum packet size: the bytes before that
// header are returned, then every Read fails.
func (c *limitConn) Read(p []byte) (int, error) {
	if c.readErr != nil {
		if c.tooBig {
			c.tooBig = false
			c.refuseTooLarge()
		}
		return 0, c.readErr
	}
	n, err := c.Conn.Read(p)
	if cut, big := c.sizer.scan(p[:n]); big {
		c.readErr, c.tooBig = errPacketTooLarge, true
		if cut > 0 {
			return cut, nil // the next Read reports it
		}
		c.tooBig = false
		c.refuseTooLarge()
		return 0, c.readErr
	}
	if err != nil && !c.connected.Load() && isTimeout(err) && !c.isClosing() {
		BrokerConnectTimeouts.Inc()
		c.lim.log.V(1).Info("closing connection that sent no CONNECT in time", "remote", c.RemoteAddr().String(),
			"listener", c.listener, "connectTimeout", c.lim.limits.ConnectTimeout)
	}
	return n, err
}

// refuseTooLarge counts and logs an oversized packet and, to an MQTT 5
// client, queues DISCONNECT 0x95 (the reading goroutine's error then ends
// the connection, which writes what is queued).
func (c *limitConn) refuseTooLarge() {
	BrokerOversizedPackets.Inc()
	if !c.connected.Load() {
		// Not authenticated: anyone can make these lines.
		c.lim.log.V(1).Info("closing connection that sent a packet over the maximum packet size before CONNECT",
			"remote", c.RemoteAddr().String(), "listener", c.listener, "maxPacketSize", c.lim.limits.MaxPacketSize)
		return
	}
	clientID := ""
	if id := c.clientID.Load(); id != nil {
		clientID = *id
	}
	c.lim.log.Info("closing connection that sent a packet over the maximum packet size", "clientID", clientID,
		"remote", c.RemoteAddr().String(), "listener", c.listener, "maxPacketSize", c.lim.limits.MaxPacketSize)
	if c.version.Load() >= 5 {
		_, _ = c.Write(disconnectTooLarge)
	}
}

// Write queues p for the connection's writer and returns at once. It
// fails once the connection is closing or failed, and disconnects the
// client (failing) when its queue is full: MaxClientQueue PUBLISH packets
// (as mochi's own queue), or MaxClientQueueBytes bytes of any packets (a
// client that publishes or pings and does not read fills it with
// acknowledgements). Other packets count only by bytes: a burst of PUBACKs
// to a client that reads must not disconnect it.
func (c *limitConn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	publish := len(p) > 0 && p[0]>>4 == packets.Publish
	c.mu.Lock()
	switch {
	case c.werr != nil:
		err := c.werr
		c.mu.Unlock()
		return 0, err
	case c.closing:
		c.mu.Unlock()
		return 0, net.ErrClosed
	case len(c.queue) > 0 && (publish && c.publishes >= c.lim.limits.MaxClientQueue ||
		c.bytes+len(p) > c.lim.limits.MaxClientQueueBytes):
		c.mu.Unlock()
		c.abort(ReasonQueueFull)
		return 0, errSlowConsumer
	}
	if publish {
		c.publishes++
	}
	c.bytes += len(p)
	c.queue = append(c.queue, append([]byte(nil), p...))
	if !c.writing {
		c.writing = true
		go c.writeLoop()
	}
	c.mu.Unlock()
	return len(p), nil
}

// writeLoop writes the queued packets, each with the write deadline, and
// ends when the queue is empty; it closes the connection when Close was
// called or a write failed.
func (c *limitConn) writeLoop() {
	for {
		c.mu.Lock()
		if c.werr != nil || len(c.queue) == 0 {
			c.writing = false
			done := c.closing || c.werr != nil
			c.mu.Unlock()
			if done {
				c.closeSocket()
			}
			return
		}
		p := c.queue[0]
		c.queue[0] = nil
		c.queue = c.queue[1:]
		c.bytes -= len(p)
		if p[0]>>4 == packets.Publish {
			c.publishes--
		}
		deadline := time.Now().Add(c.lim.limits.WriteTimeout)
		if c.closing && c.flushBy.Before(deadline) {
			deadline = c.flushBy
		}
		c.mu.Unlock()
		_ = c.Conn.SetWriteDeadline(deadline)
		if _, err := c.Conn.Write(p); err != nil {
			c.writeFailed(err)
		}
	}
}

// writeFailed ends the write side after a failed write; a write that timed
// out is a slow consumer.
func (c *limitConn) writeFailed(err error) {
	c.mu.Lock()
	first := c.werr == nil
	if first {
		c.werr = err
	}
	closing := c.closing
	c.mu.Unlock()
	if first && isTimeout(err) && !closing {
		c.slowConsumer(ReasonWriteTimeout)
	}
	c.closeSocket()
}

// abort disconnects a slow consumer at once, dropping what is queued.
func (c *limitConn) abort(reason string) {
	c.mu.Lock()
	first := c.werr == nil
	if first {
		c.werr = errSlowConsumer
	}
	c.queue, c.publishes, c.bytes = nil, 0, 0
	c.mu.Unlock()
	if first {
		c.slowConsumer(reason)
	}
	c.closeSocket()
}

// slowConsumer counts and logs the disconnect of a client that does not
// read.
func (c *limitConn) slowConsumer(reason string) {
	BrokerSlowConsumerDisconnects.WithLabelValues(reason).Inc()
	clientID := ""
	if id := c.clientID.Load(); id != nil {
		clientID = *id
	}
	c.lim.log.Info("disconnecting client that does not read what the broker sends", "clientID", clientID,
		"remote", c.RemoteAddr().String(), "listener", c.listener, "reason", reason,
		"writeTimeout", c.lim.limits.WriteTimeout, "maxClientQueue", c.lim.limits.MaxClientQueue, "maxClientQueueBytes", c.lim.limits.MaxClientQueueBytes)
}

// Close ends the connection: the reading goroutine's Read returns at once,
// and what is queued is still written (the last packets before a close
// are often a CONNACK or DISCONNECT that says why), for at most the write
// timeout, before the socket closes. It does not wait for that.
func (c *limitConn) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return nil
	}
	c.closing = true
	c.flushBy = time.Now().Add(c.lim.limits.WriteTimeout)
	writing := c.writing
	c.mu.Unlock()
	// A deadline in the past: the reader returns now.
	_ = c.Conn.SetReadDeadline(time.Unix(1, 0))
	if !writing {
		c.closeSocket()
	}
	return nil
}

func (c *limitConn) isClosing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closing
}

// closeSocket closes the underlying connection and gives back its slot.
func (c *limitConn) closeSocket() {
	c.closeOnce.Do(func() {
		_ = c.raw.Close()
		c.lim.mu.Lock()
		delete(c.lim.conns, c)
		c.lim.mu.Unlock()
		c.lim.release(c.ip)
	})
}

// SetDeadline sets the read deadline only: mochi sets both from the
// client's keepalive before each packet it reads, and writes have their
// own deadline (the write timeout).
func (c *limitConn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }

// SetWriteDeadline is ignored: every write gets the write timeout.
func (c *limitConn) SetWriteDeadline(time.Time) error { return nil }

// connectRead notes that cl's CONNECT has been read: from now on mochi
// sets the read deadline (from the keepalive), and an oversized packet
// gets an MQTT 5 client a DISCONNECT.
func (c *limitConn) connectRead(cl *mqtt.Client, pk packets.Packet) {
	id := cl.ID
	c.clientID.Store(&id)
	c.version.Store(int32(pk.ProtocolVersion))
	c.connected.Store(true)
}

// isTimeout reports whether err is a deadline's.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// packetSizer follows the MQTT packets of a byte stream (fixed header:
// one byte, then the remaining length in 1 to 4 bytes; then that many
// bytes) to find a packet over max bytes as soon as its fixed header is
// complete.
type packetSizer struct {
	max      uint64
	skip     uint64 // bytes of the current packet's body still to come
	inHeader bool   // the first byte of a fixed header has been seen
	length   uint64 // remaining length decoded so far
	lenBytes int    // remaining-length bytes seen so far
	broken   bool   // a malformed length: left to mochi, which closes
}

// scan follows p, the next bytes of the stream. With big, cut is how many
// bytes of p precede the oversized packet's fixed header (0 if it began in
// an earlier call).
func (s *packetSizer) scan(p []byte) (cut int, big bool) {
	start := 0
	for i := 0; i < len(p) && !s.broken; {
		switch {
		case s.skip > 0:
			n := min(s.skip, uint64(len(p)-i))
			s.skip -= n
			i += int(n)
		case !s.inHeader:
			s.inHeader, s.length, s.lenBytes = true, 0, 0
			start = i
			i++
		default:
			b := p[i]
			i++
			s.length |= uint64(b&0x7f) << (7 * s.lenBytes)
			s.lenBytes++
			switch {
			case b&0x80 == 0:
				s.inHeader = false
				if 1+uint64(s.lenBytes)+s.length > s.max {
					return start, true
				}
				s.skip = s.length
			case s.lenBytes == 4:
				s.broken = true
			}
		}
	}
	return 0, false
}

// limitListener is a mochi listener on a TCP address, with TLS if
// configured, whose connections are limitConns.
type limitListener struct {
	id, address string
	tlsConfig   *tls.Config
	lim         *connLimiter
	log         ratelog.Logger
	ln          net.Listener
	closed      atomic.Bool
	// disconnect ends the broker's clients of a listener
	// (Embedded.closeListenerClients).
	disconnect func(listener string)
}

// Init binds the address.
func (l *limitListener) Init(*slog.Logger) error {
	ln, err := net.Listen("tcp", l.address)
	if err != nil {
		return err
	}
	l.ln = ln
	return nil
}

// Serve accepts connections until Close and hands the admitted ones to
// the broker. The TLS handshake runs on the connection's own goroutine,
// within the connect timeout.
func (l *limitListener) Serve(establish listeners.EstablishFn) {
	backoff := time.Duration(0)
	for {
		c, err := l.ln.Accept()
		if err != nil {
			if l.closed.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// E.g. out of file descriptors: keep serving once it passes.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.log.Error(err, "accepting connection failed", "listener", l.id, "retryIn", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		remote := c.RemoteAddr().String()
		ip, ok := l.lim.admit(l.id, remote)
		if !ok {
			_ = c.Close()
			continue
		}
		var raw io.Closer
		if l.tlsConfig != nil {
			raw, c = c, tls.Server(c, l.tlsConfig)
		}
		lc := l.lim.wrap(c, raw, ip, l.id)
		go func() {
			if err := establish(l.id, lc); err != nil && !errors.Is(err, io.EOF) {
				l.log.V(1).Info("MQTT connection ended", "remote", remote, "listener", l.id, "reason", err.Error())
			}
			_ = lc.Close()
		}()
	}
}

// ID names the listener.
func (l *limitListener) ID() string { return l.id }

// Address is the bound address once Init has run.
func (l *limitListener) Address() string {
	if l.ln != nil {
		return l.ln.Addr().String()
	}
	return l.address
}

// Protocol is "tcp", or "tls" with a TLS configuration.
func (l *limitListener) Protocol() string {
	if l.tlsConfig != nil {
		return "tls"
	}
	return "tcp"
}

// Close stops accepting and closes the listener's connections. It ends the
// clients through disconnect, not mochi's closeClients (see
// closeListenerClients).
func (l *limitListener) Close(listeners.CloseFn) {
	if !l.closed.CompareAndSwap(false, true) {
		return
	}
	if l.ln != nil {
		_ = l.ln.Close()
	}
	l.disconnect(l.id)
	l.lim.closeListener(l.id)
}

// closeListenerClients ends the clients of listener as mochi's own
// closeListenerClients does (DISCONNECT "server shutting down" to MQTT 5
// clients), but from a copy of the client map: mochi's
// Clients.GetByListener takes the map's read lock twice, and a client
// connecting or disconnecting in between (its write lock waiting between
// the two) deadlocked the broker's Close for good (mochi-mqtt/server issue
// 488, unfixed in v2.7.9).
func (e *Embedded) closeListenerClients(listener string) {
	for _, cl := range e.server.Clients.GetAll() {
		if cl.Net.Listener == listener && !cl.Closed() {
			_ = e.server.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}
	}
}

// limitsHook is the mochi hook of the limits.
type limitsHook struct {
	mqtt.HookBase
	e *Embedded
}

// ID names the hook.
func (h *limitsHook) ID() string { return embeddedHookID + "-limits" }

// Provides lists the hook methods mochi calls on this hook.
func (h *limitsHook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnPacketEncode, mqtt.OnPublishDropped:
		return true
	}
	return false
}

// OnConnect tells the connection its CONNECT has been read.
func (h *limitsHook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	if lc, ok := cl.Net.Conn.(*limitConn); ok {
		lc.connectRead(cl, pk)
	}
	return nil
}

// OnPacketEncode tells MQTT 5 clients the maximum packet size in a
// successful CONNACK (mochi does not).
func (h *limitsHook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Connack && pk.ReasonCode == packets.CodeSuccess.Code && cl.Properties.ProtocolVersion >= 5 {
		pk.Properties.MaximumPacketSize = uint32(h.e.limits.MaxPacketSize)
	}
	return pk
}

// OnPublishDropped disconnects a client whose outbound queue in mochi is
// full, instead of dropping the message (mochi's default): the client
// resumes its session, and gets its messages, when it reads again.
func (h *limitsHook) OnPublishDropped(cl *mqtt.Client, _ packets.Packet) {
	lc, ok := cl.Net.Conn.(*limitConn)
	if !ok {
		return
	}
	cl.Stop(errSlowConsumer) // first: the cause
	lc.abort(ReasonQueueFull)
}
