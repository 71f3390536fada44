package bus

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// Defaults of EmbeddedOptions.
const (
	// DefaultListen is the default listen address of the embedded broker.
	DefaultListen = ":1883"
	// DefaultAckTimeout is how long the embedded broker waits by default for
	// the operator to acknowledge a device's QoS 1 message.
	DefaultAckTimeout = 30 * time.Second
)

const (
	embeddedHookID     = "kubetwin-bus"
	embeddedListenerID = "kubetwin-tcp"
	// closedPollInterval is how often a publish waiting for its Ack checks
	// whether its connection was closed (mochi has no channel for that).
	closedPollInterval = 100 * time.Millisecond
)

// errAckTimeout is the stop cause of a device connection whose message the
// operator did not acknowledge in time.
var errAckTimeout = errors.New("operator did not acknowledge the message in time")

// EmbeddedOptions configures NewEmbedded.
type EmbeddedOptions struct {
	// Listen is the TCP address the broker listens on; DefaultListen if
	// empty. Use "127.0.0.1:0" for a free port and read it with Addr.
	Listen string
	// Handler receives every message a device publishes on a kubetwin
	// topic. Required.
	Handler Handler
	// Presence receives connects and disconnects of clients. Optional.
	Presence PresenceHandler
	// Logger receives the bus's logs and, at V(1), the broker's.
	Logger logr.Logger
	// AckTimeout bounds how long a device's QoS 1 message waits for Ack
	// before the broker drops it without PUBACK and disconnects the device,
	// which then resends it when it reconnects. DefaultAckTimeout if zero.
	// Keep it below the devices' keepalive plus ping timeout: a device
	// cannot get a PINGRESP while its message waits.
	AckTimeout time.Duration
}

// Embedded is a Bus that runs a mochi-mqtt broker inside the operator.
// Devices connect to it directly; a device's QoS 1 message is handed to the
// Handler and the device gets its PUBACK only after Ack.
//
// While a message waits for Ack, the broker reads nothing else from that
// device's connection (mochi processes each connection's packets one at a
// time), so each device has at most one unacknowledged message. Other
// devices are not affected.
//
// The Handler is called from the goroutines of many connections at once.
//
// Every client may connect and use every topic; device authentication is
// not done yet. Only the client id "inline", which mochi reserves for its
// own in-process client, is refused.
type Embedded struct {
	listen     string
	handler    Handler
	presence   PresenceHandler
	log        logr.Logger
	ackTimeout time.Duration

	server   *mqtt.Server
	started  atomic.Bool
	running  atomic.Bool
	ready    chan struct{} // closed once the listener is bound
	stopping chan struct{} // closed when Start's ctx ends, before the server closes
	addr     string        // written before ready is closed

	mu    sync.Mutex
	conns map[string]*mqtt.Client // live connection per client id, for presence
}

var _ Bus = (*Embedded)(nil)

// NewEmbedded returns an embedded broker. It does not listen until Start.
func NewEmbedded(o EmbeddedOptions) (*Embedded, error) {
	if o.Handler == nil {
		return nil, errors.New("embedded bus: Handler is required")
	}
	if o.Listen == "" {
		o.Listen = DefaultListen
	}
	if o.AckTimeout <= 0 {
		o.AckTimeout = DefaultAckTimeout
	}
	e := &Embedded{
		listen:     o.Listen,
		handler:    o.Handler,
		presence:   o.Presence,
		log:        o.Logger,
		ackTimeout: o.AckTimeout,
		ready:      make(chan struct{}),
		stopping:   make(chan struct{}),
		conns:      map[string]*mqtt.Client{},
	}
	e.server = mqtt.New(&mqtt.Options{
		InlineClient: true,
		// The broker logs at Info what the operator only wants at V(1);
		// its warnings and errors still come out at V(0).
		Logger: slog.New(logr.ToSlogHandler(o.Logger.WithName("mochi").V(1))),
	})
	if err := e.server.AddHook(&embeddedHook{e: e}, nil); err != nil {
		return nil, fmt.Errorf("embedded bus: add hook: %w", err)
	}
	return e, nil
}

// Start listens, serves devices until ctx ends, then closes the broker and
// every connection. It binds the listener before it blocks: once Ready is
// closed, Addr is the bound address. Start may be called once.
func (e *Embedded) Start(ctx context.Context) error {
	if !e.started.CompareAndSwap(false, true) {
		return errors.New("embedded bus: already started")
	}
	l := listeners.NewTCP(listeners.Config{ID: embeddedListenerID, Address: e.listen})
	// AddListener calls l.Init, which binds; after it l.Address is the
	// bound address (port 0 resolved).
	if err := e.server.AddListener(l); err != nil {
		return fmt.Errorf("embedded bus: listen on %s: %w", e.listen, err)
	}
	if err := e.server.Serve(); err != nil {
		_ = e.server.Close()
		return fmt.Errorf("embedded bus: serve: %w", err)
	}
	e.addr = l.Address()
	e.running.Store(true)
	close(e.ready)
	e.log.Info("embedded broker listening", "address", e.addr)

	<-ctx.Done()

	e.log.Info("embedded broker stopping", "address", e.addr)
	e.running.Store(false)
	// Release publishes waiting for Ack first: Server.Close waits for every
	// connection's goroutine, which includes those blocked in our hook.
	close(e.stopping)
	if err := e.server.Close(); err != nil {
		return fmt.Errorf("embedded bus: close: %w", err)
	}
	return nil
}

// Ready is closed once Start has bound the listener.
func (e *Embedded) Ready() <-chan struct{} { return e.ready }

// Addr is the address the broker listens on, with the port resolved, or ""
// before Ready is closed.
func (e *Embedded) Addr() string {
	select {
	case <-e.ready:
		return e.addr
	default:
		return ""
	}
}

// Publish sends payload on topic to the subscribed devices through the
// broker's in-process client, with QoS 1; with retained set the broker also
// keeps it for devices that subscribe later. It returns once the message is
// queued for every connected subscriber; for a device that is offline with a
// persistent session the broker keeps it until the device returns.
func (e *Embedded) Publish(ctx context.Context, topic string, payload []byte, retained bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if !e.running.Load() {
		return fmt.Errorf("publish %s: %w", topic, ErrNotConnected)
	}
	if err := e.server.Publish(topic, payload, retained, 1); err != nil {
		return fmt.Errorf("publish %s: %w", topic, err)
	}
	return nil
}

// Connected reports whether the broker is serving.
func (e *Embedded) Connected() bool { return e.running.Load() }

// NeedLeaderElection makes the manager start the broker only on the leader.
func (e *Embedded) NeedLeaderElection() bool { return true }

// deliver hands a device message to the Handler and, for QoS 1 and 2, waits
// for its Ack. It returns an error when the message must be dropped
// without acknowledging it to the device.
func (e *Embedded) deliver(cl *mqtt.Client, in protocol.Inbound, pk packets.Packet) error {
	msg := Message{
		Inbound:  in,
		Payload:  bytes.Clone(pk.Payload),
		Received: time.Now(),
		Ack:      func() {},
	}
	if pk.FixedHeader.Qos == 0 {
		e.handler(msg)
		return nil
	}
	acked := make(chan struct{})
	var once sync.Once
	msg.Ack = func() { once.Do(func() { close(acked) }) }
	e.handler(msg)

	timeout := time.NewTimer(e.ackTimeout)
	defer timeout.Stop()
	poll := time.NewTicker(closedPollInterval)
	defer poll.Stop()
	for {
		select {
		case <-acked:
			// mochi set the connection's read and write deadline to 1.5 x
			// keepalive before it read this packet; waiting may have used it
			// up, and then the PUBACK write would fail.
			refreshDeadline(cl)
			return nil
		case <-timeout.C:
			e.log.Error(errAckTimeout, "device message not acknowledged; disconnecting device so it resends",
				"clientID", cl.ID, "deviceID", in.DeviceID, "kind", in.Kind, "requestID", in.RequestID,
				"ackTimeout", e.ackTimeout)
			e.disconnect(cl)
			return errAckTimeout
		case <-e.stopping:
			return errors.New("broker is stopping")
		case <-poll.C:
			// The device reconnected (session take-over) or the server
			// closed the connection: the PUBACK can no longer be sent.
			if cl.Closed() {
				return errors.New("connection closed")
			}
		}
	}
}

// disconnect closes a device connection. An MQTT 5 client is told why; an
// MQTT 3.1.1 one has no DISCONNECT from the server and is just closed.
func (e *Embedded) disconnect(cl *mqtt.Client) {
	if cl.Properties.ProtocolVersion >= 5 {
		_ = e.server.DisconnectClient(cl, packets.ErrServerBusy)
		return
	}
	cl.Stop(errAckTimeout)
}

// refreshDeadline does what mochi does before it reads each packet
// (mochi clients.go refreshDeadline).
func refreshDeadline(cl *mqtt.Client) {
	if cl.Net.Conn == nil {
		return
	}
	var deadline time.Time
	if ka := cl.State.Keepalive; ka > 0 {
		deadline = time.Now().Add(time.Duration(ka+ka/2) * time.Second)
	}
	_ = cl.Net.Conn.SetDeadline(deadline)
}

// online records cl as the live connection of its client id and reports it.
func (e *Embedded) online(cl *mqtt.Client) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.conns[cl.ID] = cl
	if e.presence != nil {
		e.presence(cl.ID, true, time.Now())
	}
}

// offline reports cl gone unless a newer connection with the same client id
// has been established: on a session take-over mochi runs the old
// connection's OnDisconnect concurrently with the new connection's setup,
// often after its OnSessionEstablished.
func (e *Embedded) offline(cl *mqtt.Client) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if cur, ok := e.conns[cl.ID]; !ok || cur != cl {
		return
	}
	delete(e.conns, cl.ID)
	if e.presence != nil {
		e.presence(cl.ID, false, time.Now())
	}
}

// embeddedHook is the mochi hook through which Embedded sees the broker.
type embeddedHook struct {
	mqtt.HookBase
	e *Embedded
}

// ID names the hook.
func (h *embeddedHook) ID() string { return embeddedHookID }

// Provides lists the hook methods mochi calls on this hook.
func (h *embeddedHook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnectAuthenticate, mqtt.OnACLCheck,
		mqtt.OnPublish, mqtt.OnPacketProcessed,
		mqtt.OnSessionEstablished, mqtt.OnDisconnect:
		return true
	}
	return false
}

// OnConnectAuthenticate allows every client except one that claims the id
// of mochi's inline client, which would take over its session.
func (h *embeddedHook) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	if cl.ID == mqtt.InlineClientId {
		h.e.log.Info("refused reserved client id", "clientID", cl.ID, "remote", cl.Net.Remote)
		return false
	}
	return true
}

// OnACLCheck allows every topic.
func (h *embeddedHook) OnACLCheck(*mqtt.Client, string, bool) bool { return true }

// OnPublish delivers device messages on kubetwin topics and, for QoS 1 and
// 2, returns only once they are acknowledged. It runs on the publishing
// connection's read goroutine, so waiting stalls only that connection.
// Returning packets.ErrRejectPacket makes mochi drop the message without
// PUBACK and without forwarding it (mochi server.go processPublish).
func (h *embeddedHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	in, err := protocol.ParseInbound(pk.TopicName)
	if err != nil {
		return pk, nil
	}
	if err := h.e.deliver(cl, in, pk); err != nil {
		return pk, fmt.Errorf("%w: %w", packets.ErrRejectPacket, err)
	}
	return pk, nil
}

// OnPacketProcessed completes a SUBSCRIBE with the retained messages mochi
// misses (see embedded_retained.go).
func (h *embeddedHook) OnPacketProcessed(cl *mqtt.Client, pk packets.Packet, err error) {
	if err != nil || cl.Net.Inline || pk.FixedHeader.Type != packets.Subscribe {
		return
	}
	h.e.sendParentRetained(cl, pk)
}

// OnSessionEstablished reports a client online.
func (h *embeddedHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	if cl.Net.Inline {
		return
	}
	h.e.online(cl)
}

// OnDisconnect reports a client offline.
func (h *embeddedHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	if cl.Net.Inline {
		return
	}
	h.e.offline(cl)
}
