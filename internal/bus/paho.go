package bus

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"hash/fnv"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/kubetwin/kubetwin/internal/ratelog"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// ErrNotConnected is returned by Publish while the bus has no connection.
var ErrNotConnected = errors.New("bus not connected")

// Defaults of PahoOptions.
const (
	// DefaultClientID is the default MQTT client id of the operator. It
	// names the operator's persistent session on the broker, so every
	// replica must use the same one (only the leader connects).
	DefaultClientID = "kubetwin-operator"
	// DefaultConnectTimeout is the default timeout of one connection
	// attempt.
	DefaultConnectTimeout = 10 * time.Second
)

const (
	// Backoff between connection attempts, both the first connect (our
	// loop) and reconnects (paho's).
	minConnectBackoff = time.Second
	maxConnectBackoff = 30 * time.Second
	keepAlive         = 30 * time.Second
	// disconnectQuiesce is how long Disconnect lets in-flight work finish.
	disconnectQuiesce = 250 // milliseconds
)

// PahoOptions configures NewPaho.
type PahoOptions struct {
	// BrokerURL is the broker, e.g. tcp://mosquitto:1883 or
	// ssl://mosquitto:8883. Required.
	BrokerURL string
	// ClientID is the MQTT client id; DefaultClientID if empty.
	ClientID string
	// Username and Password authenticate the operator, if set.
	Username, Password string
	// TLSConfig is used for ssl://, tls:// and wss:// brokers, if set.
	TLSConfig *tls.Config
	// Handler receives every message a device publishes on a kubetwin
	// topic. Required.
	Handler Handler
	// Logger receives the bus's logs.
	Logger logr.Logger
	// ConnectTimeout bounds one connection attempt; DefaultConnectTimeout
	// if zero.
	ConnectTimeout time.Duration
	// LogLimiter rate-limits the log lines devices can cause (retained
	// requests); ratelog.DefaultRate if nil.
	LogLimiter *ratelog.Limiter
}

// Paho is a Bus on an external MQTT 3.1.1 broker, through paho.mqtt.golang.
//
// It keeps a persistent session (clean session off) under a fixed client
// id and acknowledges a message only when Message.Ack is called. So the
// broker keeps QoS 1 messages that arrive while the operator is away, and
// redelivers those it delivered but never got a PUBACK for when the
// operator connects again. An Ack that comes after the connection the
// message arrived on was lost is dropped by paho; the broker then
// redelivers the message, so the Handler must tolerate duplicates.
//
// The Handler is called from several goroutines at once, but one device's
// messages always from the same goroutine, in the order the broker
// delivered them.
//
// A broker limits how many unacknowledged messages it sends to one client
// (Mosquitto: max_inflight_messages, 20 by default), so slow Acks slow
// down delivery.
type Paho struct {
	opts     PahoOptions
	client   paho.Client
	log      logr.Logger
	handler  Handler
	started  atomic.Bool
	rlog     ratelog.Logger
	subMu    sync.Mutex
	subReady bool // subscriptions confirmed on the current connection
	shards   [pahoShards]pahoShard
}

// pahoShards is how many goroutines hand messages to the Handler. A device's
// messages always go to the same one, so they reach the Handler in the order
// the broker delivered them (a device's reports must merge in order), while
// different devices proceed in parallel.
const pahoShards = 16

// pahoShard is an unbounded FIFO of messages: paho's router goroutine only
// appends to it and never blocks, so it is always free to process the
// acknowledgements the Handler's own publishes wait for.
type pahoShard struct {
	mu   sync.Mutex
	q    []Message
	wake chan struct{}
}

func (s *pahoShard) push(m Message) {
	s.mu.Lock()
	s.q = append(s.q, m)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// run hands queued messages to h until ctx ends.
func (s *pahoShard) run(ctx context.Context, h Handler) {
	for {
		s.mu.Lock()
		batch := s.q
		s.q = nil
		s.mu.Unlock()
		for _, m := range batch {
			h(m)
		}
		if len(batch) > 0 {
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-s.wake:
		}
	}
}

func shardOf(deviceID string) int {
	h := fnv.New32a()
	_, _ = h.Write([]byte(deviceID))
	return int(h.Sum32() % pahoShards)
}

var _ Bus = (*Paho)(nil)

// NewPaho returns a Paho bus. It does not connect until Start.
func NewPaho(o PahoOptions) (*Paho, error) {
	if o.BrokerURL == "" {
		return nil, errors.New("paho bus: BrokerURL is required")
	}
	// paho ignores (and only logs) a broker URL it cannot parse.
	u, err := url.Parse(o.BrokerURL)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return nil, fmt.Errorf("paho bus: BrokerURL %q is not a URL like tcp://host:1883", redact(o.BrokerURL))
	}
	if o.Handler == nil {
		return nil, errors.New("paho bus: Handler is required")
	}
	if o.ClientID == "" {
		o.ClientID = DefaultClientID
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = DefaultConnectTimeout
	}
	p := &Paho{
		opts:    o,
		log:     o.Logger.WithValues("broker", u.Redacted(), "clientID", o.ClientID),
		handler: o.Handler,
	}
	if o.LogLimiter == nil {
		o.LogLimiter = ratelog.New(ratelog.DefaultRate)
	}
	p.rlog = ratelog.NewLogger(p.log, o.LogLimiter)
	co := paho.NewClientOptions().
		AddBroker(o.BrokerURL).
		SetClientID(o.ClientID).
		SetUsername(o.Username).
		SetPassword(o.Password).
		SetProtocolVersion(4).
		SetCleanSession(false).
		SetAutoReconnect(true).
		SetConnectRetry(false). // Start retries the first connection itself
		SetMaxReconnectInterval(maxConnectBackoff).
		SetConnectTimeout(o.ConnectTimeout).
		SetKeepAlive(keepAlive).
		// Ordered delivery to onMessage, which only queues the message on
		// its device's shard and returns.
		SetOrderMatters(true).
		SetAutoAckDisabled(true).
		// Messages are routed by the default handler only, and it is set
		// before connecting: with a persistent session the broker sends
		// queued messages right after CONNACK, before OnConnect has
		// subscribed, and paho drops (without PUBACK) a message no route or
		// default handler takes (router.go matchAndDispatch).
		SetDefaultPublishHandler(p.onMessage).
		SetOnConnectHandler(p.onConnect).
		SetConnectionLostHandler(p.onConnectionLost).
		SetReconnectingHandler(func(paho.Client, *paho.ClientOptions) {
			p.log.Info("reconnecting to MQTT broker")
		})
	if o.TLSConfig != nil {
		co.SetTLSConfig(o.TLSConfig)
	}
	p.client = paho.NewClient(co)
	return p, nil
}

// redact hides a password in a broker URL that does not parse.
func redact(s string) string {
	if i := strings.LastIndex(s, "@"); i >= 0 {
		return "xxxxx" + s[i:]
	}
	return s
}

// Start connects, retrying with backoff until it succeeds or ctx ends, and
// then keeps the connection (paho reconnects on its own) until ctx ends,
// when it disconnects cleanly. On every connect it subscribes to
// protocol.OperatorFilters at QoS 1. Start may be called once.
func (p *Paho) Start(ctx context.Context) error {
	if !p.started.CompareAndSwap(false, true) {
		return errors.New("paho bus: already started")
	}
	for i := range p.shards {
		p.shards[i].wake = make(chan struct{}, 1)
		go p.shards[i].run(ctx, p.handler)
	}
	if !p.connect(ctx) {
		return nil
	}
	<-ctx.Done()
	p.log.Info("disconnecting from MQTT broker")
	p.client.Disconnect(disconnectQuiesce)
	return nil
}

// connect makes the first connection. It reports false if ctx ended first.
func (p *Paho) connect(ctx context.Context) bool {
	backoff := minConnectBackoff
	for {
		tok := p.client.Connect()
		select {
		case <-tok.Done():
		case <-ctx.Done():
			p.client.Disconnect(0)
			return false
		}
		err := tok.Error()
		if err == nil {
			return true
		}
		p.log.Error(err, "connecting to MQTT broker failed", "retryAfter", backoff)
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return false
		}
		backoff = min(2*backoff, maxConnectBackoff)
	}
}

// onConnect subscribes on every (re)connect. The broker keeps the
// subscriptions of a persistent session anyway; subscribing again covers a
// broker that lost the session.
func (p *Paho) onConnect(c paho.Client) {
	p.log.Info("connected to MQTT broker")
	filters := map[string]byte{}
	for _, f := range protocol.OperatorFilters() {
		filters[f] = 1
	}
	tok := c.SubscribeMultiple(filters, nil)
	if !tok.WaitTimeout(p.opts.ConnectTimeout) {
		p.log.Error(errors.New("timed out"), "subscribing failed")
		return
	}
	if err := tok.Error(); err != nil {
		p.log.Error(err, "subscribing failed")
		return
	}
	if st, ok := tok.(*paho.SubscribeToken); ok {
		for f, code := range st.Result() {
			if code > 2 { // 0x80: the broker refused the filter
				p.log.Error(fmt.Errorf("SUBACK return code %#x", code), "subscribing failed", "filter", f)
				return
			}
		}
	}
	p.setSubscribed(true)
	p.log.V(1).Info("subscribed", "filters", protocol.OperatorFilters())
}

func (p *Paho) onConnectionLost(_ paho.Client, err error) {
	p.setSubscribed(false)
	p.log.Error(err, "connection to MQTT broker lost")
}

func (p *Paho) setSubscribed(v bool) {
	p.subMu.Lock()
	p.subReady = v
	p.subMu.Unlock()
}

// subscribed reports whether the current connection's subscriptions are
// confirmed (used by tests).
func (p *Paho) subscribed() bool {
	p.subMu.Lock()
	defer p.subMu.Unlock()
	return p.subReady && p.client.IsConnectionOpen()
}

// onMessage queues one message on its device's shard. paho calls it in
// delivery order on its router goroutine, and does not PUBACK until m.Ack.
// A retained get, reported or ack message is acknowledged and dropped.
func (p *Paho) onMessage(_ paho.Client, m paho.Message) {
	in, err := protocol.ParseInbound(m.Topic())
	if err != nil {
		p.rlog.Info("dropping message on invalid topic", "topic", m.Topic(), "reason", err.Error())
		m.Ack()
		return
	}
	if m.Retained() && in.Kind != protocol.KindPresence {
		// A retained request (left by a device, or anyone who may publish
		// on its topics) would be handled again at every (re)subscribe,
		// e.g. rolling the reported state back to an old patch. Only a
		// retained presence (birth, last will) is meant to be kept.
		retainedIgnored.Inc()
		p.rlog.Info("ignoring retained device request", "topic", m.Topic(), "kind", in.Kind)
		m.Ack()
		return
	}
	var once sync.Once
	p.shards[shardOf(in.DeviceID)].push(Message{
		Inbound:  in,
		Payload:  m.Payload(),
		Received: time.Now(),
		Ack:      func() { once.Do(m.Ack) },
	})
}

// Publish sends payload on topic with QoS 1 and waits for the broker's
// PUBACK or ctx. It fails at once while the client is not connected. If ctx
// ends first the message may still be sent later.
func (p *Paho) Publish(ctx context.Context, topic string, payload []byte, retained bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if !p.client.IsConnectionOpen() {
		return fmt.Errorf("publish %s: %w", topic, ErrNotConnected)
	}
	tok := p.client.Publish(topic, 1, retained, payload)
	select {
	case <-tok.Done():
	case <-ctx.Done():
		return fmt.Errorf("publish %s: %w", topic, ctx.Err())
	}
	if err := tok.Error(); err != nil {
		return fmt.Errorf("publish %s: %w", topic, err)
	}
	return nil
}

// Connected reports whether the connection to the broker is up.
func (p *Paho) Connected() bool { return p.client.IsConnectionOpen() }

// NeedLeaderElection makes the manager start the bus only on the leader,
// so one client holds the operator's session.
func (p *Paho) NeedLeaderElection() bool { return true }

// retainedIgnored counts retained device requests Paho dropped.
var retainedIgnored = prometheus.NewCounter(prometheus.CounterOpts{
	Namespace: "kubetwin", Subsystem: "bus", Name: "retained_requests_ignored_total",
	Help: "Retained get, reported or ack messages the operator ignored on an external broker (only presence may be retained).",
})

func init() {
	metrics.Registry.MustRegister(retainedIgnored)
}
