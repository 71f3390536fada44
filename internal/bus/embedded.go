package bus

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/kubetwin/kubetwin/internal/ratelog"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// Defaults of EmbeddedOptions.
const (
	// DefaultListen is the default listen address of the embedded broker.
	DefaultListen = ":1883"
	// DefaultAckTimeout is how long the embedded broker waits by default for
	// the operator to acknowledge a device's QoS 2 message.
	DefaultAckTimeout = 30 * time.Second
)

const (
	embeddedHookID        = "kubetwin-bus"
	embeddedListenerID    = "kubetwin-tcp"
	embeddedTLSListenerID = "kubetwin-tls"
	// authTimeout bounds one Authenticator call.
	authTimeout = 10 * time.Second
	// clientReadBufferSize is mochi's read buffer per connection, held as
	// long as the device is connected (mochi's default: 2 KiB). A device's
	// packets are mostly a few hundred bytes; a larger one takes at most
	// one more read from the socket (past the buffer, the rest is read
	// straight into the packet).
	clientReadBufferSize = 512
	// closedPollInterval is how often a QoS 2 publish waiting for its Ack
	// checks whether its connection was closed (mochi has no channel for
	// that).
	closedPollInterval = 100 * time.Millisecond
)

// errAckTimeout is the stop cause of a device connection whose QoS 2
// message the operator did not acknowledge in time.
var errAckTimeout = errors.New("operator did not acknowledge the message in time")

// EmbeddedOptions configures NewEmbedded.
type EmbeddedOptions struct {
	// Listen is the TCP address of the plain MQTT listener; DefaultListen
	// if both it and TLSListen are empty, none if only it is empty. Use
	// "127.0.0.1:0" for a free port and read it with Addr.
	Listen string
	// TLSListen is the TCP address of the MQTT-over-TLS listener (none if
	// empty); TLSConfig is then required. Read the bound address with
	// TLSAddr.
	TLSListen string
	// TLSConfig is the TLS listener's configuration: its certificate
	// (Certificates or GetCertificate, which may rotate it).
	TLSConfig *tls.Config
	// Auth authenticates every client at CONNECT and so decides what it
	// may do (see Grant); devices are confined to their own topics. Nil
	// lets every client connect and use every topic (development only).
	Auth Authenticator
	// Handler receives every message a device publishes on a kubetwin
	// topic. Required.
	Handler Handler
	// Presence receives connects and disconnects of clients. Optional.
	Presence PresenceHandler
	// Logger receives the bus's logs and, at V(1), the broker's.
	Logger logr.Logger
	// AckTimeout bounds how long a device's QoS 2 message waits for Ack
	// before the broker drops it without PUBREC and disconnects the device,
	// which then resends it when it reconnects. DefaultAckTimeout if zero.
	// Keep it below the devices' keepalive plus ping timeout: a device
	// cannot get a PINGRESP while its QoS 2 message waits. QoS 1 messages
	// (all the kubetwin protocol uses) have no such bound: they wait for
	// Ack without holding up the connection; see Embedded.
	AckTimeout time.Duration
	// Limits bounds what clients may cost the broker (connections, packet
	// size, time to CONNECT, slow readers); zero fields take their
	// defaults. See embedded_limits.go.
	Limits EmbeddedLimits
	// Sessions bounds persistent sessions (expiry, queued messages); zero
	// fields take their defaults. See embedded_sessions.go.
	Sessions SessionOptions
	// LogLimiter rate-limits the log lines clients can cause (refused
	// connections, mochi's warnings); ratelog.DefaultRate if nil.
	LogLimiter *ratelog.Limiter
}

// Embedded is a Bus that runs a mochi-mqtt broker inside the operator.
// Devices connect to it directly; a device's QoS 1 or 2 message on a kubetwin
// topic is handed to the Handler and the device gets its PUBACK (PUBREC)
// only after Ack.
//
// QoS 1: the broker goes on reading the device's connection while messages
// wait for Ack, so one device can have many unacknowledged messages at once
// (up to its own in-flight limit) and the operator can store a burst of them
// together. Ack writes the PUBACK itself, in the order of the Ack calls;
// only then does the broker retain the message (if flagged) and forward it
// to subscribers. If the connection has ended by then, Ack does neither: the
// device resends the message when it resumes its session, and the operator
// gets it again.
//
// QoS 2 (not used by the kubetwin protocol): while a message waits for Ack,
// the broker reads nothing else from that device's connection (mochi
// processes each connection's packets one at a time), for at most
// AckTimeout. Other devices are not affected.
//
// QoS 0 messages are handed to the Handler with an Ack that does nothing.
//
// Nothing the broker writes to a device waits for the device: writes are
// queued per connection and written with a deadline (see Limits), so Ack,
// Publish and other devices' messages never block on a device that does
// not read; such a device is disconnected.
//
// The Handler is called from the goroutines of many connections at once,
// for each connection in the order its messages arrive.
//
// With an Authenticator (EmbeddedOptions.Auth) every CONNECT is checked
// (a refusal is CONNACK "not authorized", 5 in MQTT 3.1.1), and a device
// may then publish and subscribe only on its own topics: mochi refuses a
// subscription with SUBACK failure (0x80), drops a QoS 0 publish and
// disconnects an MQTT 3.1.1 client that sends a QoS 1 or 2 publish it may
// not send (an MQTT 5 one gets PUBACK "not authorized"). A device is
// disconnected when its credential expires, and when Recheck finds it no
// longer valid (the device was disabled, deleted or re-keyed). Every
// refusal is logged and counted in kubetwin_broker_refused_total. The
// operator's own in-process client is not checked. Without an
// Authenticator every client may connect and use every topic, but for the
// IoT Hub dialect's and the broker's own namespaces (see the package
// documentation). The client id "inline", which mochi reserves for its own
// in-process client, and client ids in the broker's namespace ("$kubetwin"
// and below) are always refused.
type Embedded struct {
	listen     string
	tlsListen  string
	tlsConfig  *tls.Config
	auth       Authenticator
	handler    Handler
	presence   PresenceHandler
	log        logr.Logger
	ackTimeout time.Duration
	limits     EmbeddedLimits
	limiter    *connLimiter
	sess       sessionKeeper  // guarded by mu
	rlog       ratelog.Logger // for lines clients can cause

	server   *mqtt.Server
	started  atomic.Bool
	running  atomic.Bool
	ready    chan struct{} // closed once the listener is bound
	stopping chan struct{} // closed when Start's ctx ends, before the server closes
	addr     string        // written before ready is closed
	tlsAddr  string        // written before ready is closed

	mu           sync.Mutex
	conns        map[string]*mqtt.Client      // live connection per client id, for presence
	pending      map[*mqtt.Client]*deviceConn // connections that published QoS 1 messages
	sessions     map[*mqtt.Client]*session    // what each authenticated connection may do
	lostSessions map[*mqtt.Client]struct{}    // clean=false connections whose session the broker lacked
	authing      authWindow                   // connections not yet registered in conns (embedded_auth.go)

	// iothubRequests are the requests that arrived in the IoT Hub dialect
	// and wait for their response (see embedded_iothub.go).
	iothubRequests iothubRequests

	// forwarders are inline clients through which an acknowledged QoS 1
	// message is published to subscribers (see forward).
	forwarders sync.Pool
}

var _ Bus = (*Embedded)(nil)

// NewEmbedded returns an embedded broker. It does not listen until Start.
func NewEmbedded(o EmbeddedOptions) (*Embedded, error) {
	if o.Handler == nil {
		return nil, errors.New("embedded bus: Handler is required")
	}
	if o.Listen == "" && o.TLSListen == "" {
		o.Listen = DefaultListen
	}
	if o.TLSListen != "" && o.TLSConfig == nil {
		return nil, errors.New("embedded bus: TLSListen needs a TLSConfig")
	}
	if o.AckTimeout <= 0 {
		o.AckTimeout = DefaultAckTimeout
	}
	limits, err := o.Limits.withDefaults()
	if err != nil {
		return nil, err
	}
	sessOpts, err := o.Sessions.withDefaults()
	if err != nil {
		return nil, err
	}
	if o.LogLimiter == nil {
		o.LogLimiter = ratelog.New(ratelog.DefaultRate)
	}
	e := &Embedded{
		listen:       o.Listen,
		tlsListen:    o.TLSListen,
		tlsConfig:    o.TLSConfig,
		auth:         o.Auth,
		handler:      o.Handler,
		presence:     o.Presence,
		log:          o.Logger,
		ackTimeout:   o.AckTimeout,
		limits:       limits,
		limiter:      newConnLimiter(limits, ratelog.NewLogger(o.Logger, o.LogLimiter)),
		sess:         newSessionKeeper(sessOpts),
		rlog:         ratelog.NewLogger(o.Logger, o.LogLimiter),
		ready:        make(chan struct{}),
		stopping:     make(chan struct{}),
		conns:        map[string]*mqtt.Client{},
		pending:      map[*mqtt.Client]*deviceConn{},
		sessions:     map[*mqtt.Client]*session{},
		lostSessions: map[*mqtt.Client]struct{}{},
	}
	caps := mqtt.NewDefaultServerCapabilities()
	limits.applyTo(caps)
	sessOpts.applyTo(caps)
	e.server = mqtt.New(&mqtt.Options{
		InlineClient:            true,
		Capabilities:            caps,
		ClientNetReadBufferSize: clientReadBufferSize,
		// The broker logs at Info what the operator only wants at V(1);
		// its warnings and errors still come out at V(0), rate-limited.
		Logger: slog.New(ratelog.SlogHandler(logr.ToSlogHandler(o.Logger.WithName("mochi").V(1)), o.LogLimiter)),
	})
	// Before embeddedHook: see sessionsHook.
	if err := e.server.AddHook(&sessionsHook{e: e}, nil); err != nil {
		return nil, fmt.Errorf("embedded bus: add hook: %w", err)
	}
	if err := e.server.AddHook(&embeddedHook{e: e}, nil); err != nil {
		return nil, fmt.Errorf("embedded bus: add hook: %w", err)
	}
	if err := e.server.AddHook(&limitsHook{e: e}, nil); err != nil {
		return nil, fmt.Errorf("embedded bus: add hook: %w", err)
	}
	e.forwarders.New = func() any { return e.server.NewClient(nil, mqtt.LocalListener, "", true) }
	return e, nil
}

// Start listens, serves devices until ctx ends, then closes the broker and
// every connection. It binds the listeners before it blocks: once Ready is
// closed, Addr and TLSAddr are the bound addresses. Start may be called once.
func (e *Embedded) Start(ctx context.Context) error {
	if !e.started.CompareAndSwap(false, true) {
		return errors.New("embedded bus: already started")
	}
	// AddListener calls l.Init, which binds; after it l.Address is the
	// bound address (port 0 resolved).
	var plain, secure *limitListener
	if e.listen != "" {
		plain = &limitListener{id: embeddedListenerID, address: e.listen, lim: e.limiter, log: e.rlog, disconnect: e.closeListenerClients}
		if err := e.server.AddListener(plain); err != nil {
			return fmt.Errorf("embedded bus: listen on %s: %w", e.listen, err)
		}
	}
	if e.tlsListen != "" {
		secure = &limitListener{id: embeddedTLSListenerID, address: e.tlsListen, tlsConfig: e.tlsConfig, lim: e.limiter, log: e.rlog,
			disconnect: e.closeListenerClients}
		if err := e.server.AddListener(secure); err != nil {
			_ = e.server.Close()
			return fmt.Errorf("embedded bus: listen on %s (TLS): %w", e.tlsListen, err)
		}
	}
	// Connections from WebSocketHandler, registered so that they close
	// with the broker.
	if err := e.server.AddListener(wsListener{lim: e.limiter, disconnect: e.closeListenerClients}); err != nil {
		_ = e.server.Close()
		return fmt.Errorf("embedded bus: %w", err)
	}
	if err := e.server.Serve(); err != nil {
		_ = e.server.Close()
		return fmt.Errorf("embedded bus: serve: %w", err)
	}
	if plain != nil {
		e.addr = plain.Address()
	}
	if secure != nil {
		e.tlsAddr = secure.Address()
	}
	e.running.Store(true)
	close(e.ready)
	e.log.Info("embedded broker listening", "address", e.addr, "tlsAddress", e.tlsAddr, "deviceAuthentication", e.auth != nil)

	<-ctx.Done()

	e.log.Info("embedded broker stopping", "address", e.addr, "tlsAddress", e.tlsAddr)
	e.running.Store(false)
	// Release QoS 2 publishes waiting for Ack first: Server.Close waits for
	// every connection's goroutine, which includes those blocked in our hook.
	close(e.stopping)
	if err := e.server.Close(); err != nil {
		return fmt.Errorf("embedded bus: close: %w", err)
	}
	return nil
}

// Ready is closed once Start has bound the listener.
func (e *Embedded) Ready() <-chan struct{} { return e.ready }

// Addr is the address of the plain listener, with the port resolved, or ""
// before Ready is closed or without a plain listener.
func (e *Embedded) Addr() string {
	select {
	case <-e.ready:
		return e.addr
	default:
		return ""
	}
}

// TLSAddr is the address of the TLS listener, with the port resolved, or ""
// before Ready is closed or without a TLS listener.
func (e *Embedded) TLSAddr() string {
	select {
	case <-e.ready:
		return e.tlsAddr
	default:
		return ""
	}
}

// Publish sends payload on topic to the subscribed devices through the
// broker's in-process client, with QoS 1; with retained set the broker also
// keeps it for devices that subscribe later. It returns once the message is
// queued for every connected subscriber; for a device that is offline with a
// persistent session the broker keeps it until the device returns.
//
// A response to a request that arrived in the IoT Hub dialect, and a
// desired patch, also go to the device's IoT Hub client, translated (see
// the package documentation).
//
// Publish does not wait for subscribers to read (see Embedded). Should it
// take longer than ctx allows, it returns ctx's error; the message may
// still go out.
func (e *Embedded) Publish(ctx context.Context, topic string, payload []byte, retained bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if !e.running.Load() {
		return fmt.Errorf("publish %s: %w", topic, ErrNotConnected)
	}
	if ctx.Done() == nil {
		return e.publish(topic, payload, retained)
	}
	done := make(chan error, 1)
	go func() { done <- e.publish(topic, payload, retained) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("publish %s: %w", topic, ctx.Err())
	}
}

// publish is Publish without its context.
func (e *Embedded) publish(topic string, payload []byte, retained bool) error {
	if err := e.server.Publish(topic, payload, retained, 1); err != nil {
		return fmt.Errorf("publish %s: %w", topic, err)
	}
	e.iothubTranslate(topic, payload)
	return nil
}

// Connected reports whether the broker is serving.
func (e *Embedded) Connected() bool { return e.running.Load() }

// NeedLeaderElection makes the manager start the broker only on the leader.
func (e *Embedded) NeedLeaderElection() bool { return true }

// deliver hands a device message to the Handler. It reports whether the
// broker must drop the message (not PUBACK, retain or forward it) because it
// is acknowledged later by the message's Ack (QoS 1), and, for QoS 2, returns
// an error when the message must be dropped without PUBREC.
func (e *Embedded) deliver(cl *mqtt.Client, in protocol.Inbound, pk packets.Packet) (deferred bool, err error) {
	msg := Message{
		Inbound:  in,
		Payload:  bytes.Clone(pk.Payload),
		Received: time.Now(),
		Ack:      func() {},
	}
	switch pk.FixedHeader.Qos {
	case 0:
		e.handler(msg)
		return false, nil
	case 1:
		dc := e.deviceConn(cl)
		var once sync.Once
		msg.Ack = func() { once.Do(func() { e.ack(cl, dc, in, pk) }) }
		e.handler(msg)
		return true, nil
	default:
		return false, e.deliverAndWait(cl, in, msg)
	}
}

// deviceConn is what Embedded knows about a device connection that has QoS 1
// messages waiting for Ack. Its lock orders the Acks' PUBACKs and forwards
// against each other and against the end of the connection.
type deviceConn struct {
	mu sync.Mutex
	// gone is set once the connection has ended or its last will is being
	// published: an Ack after that must neither PUBACK nor forward (the
	// device resends the message), and a forward must not overtake the
	// will, e.g. a retained birth the will's retained "offline".
	gone bool
}

// deviceConn returns the deviceConn of cl, creating it.
func (e *Embedded) deviceConn(cl *mqtt.Client) *deviceConn {
	e.mu.Lock()
	defer e.mu.Unlock()
	dc, ok := e.pending[cl]
	if !ok {
		dc = &deviceConn{}
		e.pending[cl] = dc
	}
	return dc
}

// connEnded marks cl's deviceConn, if any, gone; with forget it also drops
// it. It runs on cl's own goroutine, like every call that creates it, so a
// dropped deviceConn is not created again.
func (e *Embedded) connEnded(cl *mqtt.Client, forget bool) {
	e.mu.Lock()
	dc, ok := e.pending[cl]
	if ok && forget {
		delete(e.pending, cl)
	}
	e.mu.Unlock()
	if !ok {
		return
	}
	// Waits for an Ack in progress, so its forward precedes the will.
	dc.mu.Lock()
	dc.gone = true
	dc.mu.Unlock()
}

// ack acknowledges the QoS 1 message pk that cl published: it writes the
// PUBACK and then retains and forwards the message as mochi would have,
// except an IoT Hub request, which is never forwarded.
func (e *Embedded) ack(cl *mqtt.Client, dc *deviceConn, in protocol.Inbound, pk packets.Packet) {
	dc.mu.Lock()
	defer dc.mu.Unlock()
	if dc.gone || cl.Closed() {
		e.log.V(1).Info("device connection ended before Ack; the device resends the message when it reconnects",
			"clientID", cl.ID, "deviceID", in.DeviceID, "kind", in.Kind, "requestID", in.RequestID, "packetID", pk.PacketID)
		return
	}
	// What mochi's buildAck makes for a QoS 1 PUBLISH, without copying the
	// PUBLISH's properties (mochi's default echoes its user properties) and
	// with reason code Success (mochi's 0x01 "granted QoS 1" is not a PUBACK
	// reason code). With reason Success and no properties an MQTT 5 PUBACK
	// is just the packet id, as a 3.1.1 one is. Expiry stays 0: it is for
	// PUBLISHes (WritePacket would turn it into a message expiry property).
	// WritePacket takes the client's lock, so it is safe next to mochi's own
	// writes, and only queues the packet on the connection (limitConn), so
	// a device that does not read does not hold up the caller.
	puback := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Puback},
		PacketID:    pk.PacketID,
		ReasonCode:  packets.CodeSuccess.Code,
	}
	if err := cl.WritePacket(puback); err != nil {
		e.log.V(1).Info("sending PUBACK failed; the device resends the message when it reconnects",
			"clientID", cl.ID, "deviceID", in.DeviceID, "kind", in.Kind, "requestID", in.RequestID, "packetID", pk.PacketID,
			"reason", err.Error())
		return
	}
	if protocol.IsIoTHubTopic(pk.TopicName) {
		return
	}
	e.forward(cl.ID, pk)
}

// forward retains pk if flagged and publishes it to its subscribers, as
// mochi does after the PUBACK of a message it was not told to drop. mochi
// has no exported call for that, so pk is injected through an inline client
// with the device's client id, which mochi records as the message's origin
// (for the MQTT 5 no-local option). Inline clients are not registered with
// the broker; each serves one forward at a time.
func (e *Embedded) forward(clientID string, pk packets.Packet) {
	fw := e.forwarders.Get().(*mqtt.Client)
	defer e.forwarders.Put(fw)
	fw.ID = clientID
	// The topic alias was resolved when the message arrived; applying it
	// again would undo a later remapping by the device.
	pk.Properties.TopicAlias = 0
	pk.Properties.TopicAliasFlag = false
	if err := e.server.InjectPacket(fw, pk); err != nil {
		e.log.Error(err, "forwarding device message failed", "clientID", clientID, "topic", pk.TopicName)
	}
}

// deliverAndWait hands a QoS 2 message to the Handler and waits for its Ack.
// It returns an error when the message must be dropped without PUBREC.
func (e *Embedded) deliverAndWait(cl *mqtt.Client, in protocol.Inbound, msg Message) error {
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
			// The PUBREC write has its own deadline (limitConn), whatever
			// the wait used of the read deadline mochi set from the
			// keepalive; mochi sets that again before its next read.
			return nil
		case <-timeout.C:
			e.log.Error(errAckTimeout, "device message not acknowledged; disconnecting device so it resends",
				"clientID", cl.ID, "deviceID", in.DeviceID, "kind", in.Kind, "requestID", in.RequestID,
				"ackTimeout", e.ackTimeout)
			e.disconnect(cl, packets.ErrServerBusy, errAckTimeout)
			return errAckTimeout
		case <-e.stopping:
			return errors.New("broker is stopping")
		case <-poll.C:
			// The device reconnected (session take-over) or the server
			// closed the connection: the PUBREC can no longer be sent.
			if cl.Closed() {
				return errors.New("connection closed")
			}
		}
	}
}

// disconnect closes a device connection. An MQTT 5 client is told why
// (code); an MQTT 3.1.1 one has no DISCONNECT from the server and is just
// closed, with cause as the stop cause.
func (e *Embedded) disconnect(cl *mqtt.Client, code packets.Code, cause error) {
	if cl.Properties.ProtocolVersion >= 5 {
		_ = e.server.DisconnectClient(cl, code)
		return
	}
	cl.Stop(cause)
}

// online records cl as the live connection of its client id and reports
// it, or ends it if Recheck refused its credentials since it was
// authenticated (see authWindow).
func (e *Embedded) online(cl *mqtt.Client) {
	if h := e.authing.beforeRegister; h != nil {
		h(cl.ID)
	}
	e.mu.Lock()
	why := e.registerLocked(cl)
	if why == nil {
		e.conns[cl.ID] = cl
		e.startExpiryLocked(cl)
		if e.presence != nil {
			e.presence(cl.ID, true, time.Now())
		}
	}
	e.mu.Unlock()
	if why != nil {
		e.refuseRegistered(cl, why)
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
		mqtt.OnSessionEstablish, mqtt.OnSessionEstablished, mqtt.OnWill, mqtt.OnDisconnect,
		// The IoT Hub dialect (embedded_iothub.go).
		mqtt.OnSubscribe, mqtt.OnUnsubscribe, mqtt.OnPacketEncode, mqtt.OnPacketSent:
		return true
	}
	return false
}

// OnConnectAuthenticate refuses a client that claims the id of mochi's
// inline client, which would take over its session, or an id in the
// broker's own namespace, which its messages would carry as their origin
// (see embedded_iothub.go), and asks the Authenticator, if any, about every
// other.
func (h *embeddedHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	if cl.ID == mqtt.InlineClientId || isReserved(cl.ID) {
		h.e.refuseConnect(cl, string(pk.Connect.Username), Refuse(ReasonReservedClientID, "the client id is reserved for the broker's own clients"))
		return false
	}
	return h.e.authenticate(cl, pk)
}

// OnACLCheck lets a device use only its own topics (see Embedded).
func (h *embeddedHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	return h.e.aclCheck(cl, topic, write)
}

// OnPublish delivers device messages on kubetwin topics and IoT Hub twin
// requests (see iothubPublish). It runs on the publishing connection's read
// goroutine. Returning packets.ErrRejectPacket
// makes mochi drop the message without PUBACK, without retaining and without
// forwarding it (mochi server.go processPublish); it does so for every QoS 1
// message, whose Ack then does all three. That path also leaves the
// client's receive quota alone (mochi takes from it only after this hook),
// so any number of QoS 1 messages may wait for Ack. A QoS 2 message is
// returned only once acknowledged (or dropped), which stalls only that
// connection.
func (h *embeddedHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	if protocol.IsIoTHubTopic(pk.TopicName) || isReserved(pk.TopicName) {
		return h.e.iothubPublish(cl, pk)
	}
	in, err := protocol.ParseInbound(pk.TopicName)
	if err != nil {
		return pk, nil
	}
	deferred, err := h.e.deliver(cl, in, pk)
	switch {
	case err != nil:
		return pk, fmt.Errorf("%w: %w", packets.ErrRejectPacket, err)
	case deferred:
		return pk, packets.ErrRejectPacket
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

// OnSessionEstablished reports a client online, and gives an Azure IoT
// SDK client whose session the broker lacked its twin subscriptions back.
func (h *embeddedHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	if cl.Net.Inline {
		return
	}
	h.e.online(cl)
	if isIoTHubSDK(cl) {
		h.e.iothubRestoreSubscriptions(cl)
	}
}

// OnWill stops Acks of cl's messages from sending a PUBACK or forwarding
// the message once mochi is about to publish cl's last will, and waits for
// one in progress. It leaves the will unchanged.
func (h *embeddedHook) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	if !cl.Net.Inline {
		h.e.connEnded(cl, false)
	}
	return will, nil
}

// OnDisconnect reports a client offline and ends what its Acks may do.
func (h *embeddedHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	if cl.Net.Inline {
		return
	}
	h.e.connEnded(cl, true)
	h.e.offline(cl)
	h.e.endSession(cl)
	h.e.mu.Lock()
	delete(h.e.lostSessions, cl)
	h.e.mu.Unlock()
}
