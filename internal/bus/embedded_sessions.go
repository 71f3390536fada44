package bus

import (
	"errors"
	"fmt"
	"math"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

// Persistent sessions of the embedded broker.
//
// mochi-mqtt v2.7.9 keeps the session of a disconnected MQTT 3.1.1 client
// that connected with clean=false (as the Azure IoT SDKs do) for
// Capabilities.MaximumSessionExpiryInterval, by default math.MaxUint32
// seconds (136 years): forever. An MQTT 5 client's session lasts its own
// expiry interval, capped at that maximum. mochi's event loop
// (clearExpiredClients) then drops the client but leaves its subscriptions
// in the topic index, and it deletes by client id, so a client resuming the
// session in that instant may lose its new registration.
//
// So the broker expires sessions itself (expireSessions): an offline
// session ends SessionOptions.Expiry after its client disconnected,
// serialised with session take-over through Embedded.mu, and its
// subscriptions and queued messages go with it. mochi's maximum is set a
// little longer (sessionExpirySlack): it is what MQTT 5 clients are told in
// CONNACK, and it leaves MQTT 3.1.1 sessions to us. MQTT 5 clients that ask
// for less are expired by mochi; OnClientExpired completes that cleanup.
//
// The session of a device whose twin is deleted or disabled ends at once
// (Recheck), with its connection.
//
// Messages kept per session (QoS 1 and 2 messages sent but not yet
// acknowledged, which for an offline client is everything queued for it)
// are capped by mochi's Capabilities.MaximumInflight; mochi drops further
// ones ("client store quota reached"). A device loses nothing it cannot
// get back: the whole desired document is retained and answers every GET.

// Defaults of SessionOptions.
const (
	// DefaultSessionExpiry is how long an offline persistent session is
	// kept by default.
	DefaultSessionExpiry = 24 * time.Hour
	// DefaultMaxSessionQueue is the default cap of unacknowledged
	// messages per session.
	DefaultMaxSessionQueue = 64
)

const (
	// sessionExpirySlack is how much longer than SessionOptions.Expiry
	// mochi's own maximum is, so that our sweep always comes first.
	sessionExpirySlack = time.Minute
	// maxSweepInterval bounds how late a session may expire.
	maxSweepInterval = time.Second
	minSweepInterval = 10 * time.Millisecond
	// Values of the reason label of kubetwin_broker_sessions_expired_total.
	sessionEndExpired       = "expired"
	sessionEndDeviceRemoved = "device_removed"
)

// SessionOptions bounds what the embedded broker keeps for persistent
// sessions.
type SessionOptions struct {
	// Expiry is how long the session of a client that connected with
	// clean=false (MQTT 5: a session expiry interval) is kept after the
	// client disconnects; it then ends with its subscriptions and queued
	// messages. DefaultSessionExpiry if zero; at least a second.
	Expiry time.Duration
	// MaxQueue caps the messages a session holds that its client has not
	// acknowledged: while it is offline, those queued for it. Further
	// messages to it are dropped. DefaultMaxSessionQueue if zero; at most
	// 65535.
	MaxQueue int
}

// withDefaults fills in defaults and checks the values.
func (o SessionOptions) withDefaults() (SessionOptions, error) {
	switch {
	case o.Expiry == 0:
		o.Expiry = DefaultSessionExpiry
	case o.Expiry < time.Second:
		return o, fmt.Errorf("embedded bus: session expiry %s is too short (at least 1s)", o.Expiry)
	}
	switch {
	case o.MaxQueue == 0:
		o.MaxQueue = DefaultMaxSessionQueue
	case o.MaxQueue < 0 || o.MaxQueue > math.MaxUint16:
		return o, fmt.Errorf("embedded bus: max session queue %d is out of range (1 to 65535)", o.MaxQueue)
	}
	return o, nil
}

// applyTo sets mochi's capabilities for o.
func (o SessionOptions) applyTo(c *mqtt.Capabilities) {
	c.MaximumInflight = uint16(o.MaxQueue)
	secs := math.Ceil((o.Expiry + sessionExpirySlack).Seconds())
	c.MaximumSessionExpiryInterval = uint32(min(secs, math.MaxUint32))
}

// sessionKeeper is the Embedded's record of sessions. Its maps are
// guarded by Embedded.mu.
type sessionKeeper struct {
	opts       SessionOptions
	now        func() time.Time
	sweepEvery time.Duration

	// offline are the persistent sessions of disconnected clients, by
	// client id.
	offline map[string]*offlineSession
	// connecting are clients between OnSessionEstablish and
	// OnSessionEstablished, by client id: their session must not be
	// expired under them.
	connecting map[string]*mqtt.Client
	// removed are connections of devices that were deleted or disabled:
	// their session ends with them.
	removed map[*mqtt.Client]struct{}
	// dropped is mochi's count of messages dropped for a full session
	// queue when last read.
	dropped int64

	stop chan struct{}
	done chan struct{}
}

// offlineSession is a persistent session whose client is gone.
type offlineSession struct {
	cl    *mqtt.Client
	since time.Time
	// The credentials the client last connected with, for Recheck.
	creds    bool
	admin    bool
	username string
	password []byte
}

func newSessionKeeper(o SessionOptions) sessionKeeper {
	return sessionKeeper{
		opts:       o,
		now:        time.Now,
		sweepEvery: min(max(o.Expiry/10, minSweepInterval), maxSweepInterval),
		offline:    map[string]*offlineSession{},
		connecting: map[string]*mqtt.Client{},
		removed:    map[*mqtt.Client]struct{}{},
	}
}

var (
	sessionsGauge = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "kubetwin", Subsystem: "broker", Name: "sessions",
		Help: "Sessions the embedded broker holds: online (connected clients) and offline (persistent sessions of disconnected clients, kept for --mqtt-session-expiry).",
	}, []string{"state"})
	sessionsEnded = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "broker", Name: "sessions_expired_total",
		Help: "Persistent sessions the embedded broker ended: expired (offline longer than --mqtt-session-expiry) or device_removed (the device's twin was deleted or disabled).",
	}, []string{"reason"})
	sessionQueueDropped = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "broker", Name: "session_queue_dropped_total",
		Help: "Messages to a client the embedded broker dropped because its session already held --mqtt-max-session-queue unacknowledged messages.",
	})
)

func init() {
	metrics.Registry.MustRegister(sessionsGauge, sessionsEnded, sessionQueueDropped)
}

// sessionsHook is the mochi hook that keeps the session record and strips
// retain flags (embedded_retained.go). It is added before embeddedHook, so
// that one sees publishes without the flag and a disconnecting client's
// credentials are still known here.
type sessionsHook struct {
	mqtt.HookBase
	e *Embedded
}

func (h *sessionsHook) ID() string { return "kubetwin-sessions" }

func (h *sessionsHook) Provides(b byte) bool {
	switch b {
	case mqtt.OnStarted, mqtt.OnStopped, mqtt.OnPublish, mqtt.OnWill,
		mqtt.OnSessionEstablish, mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnClientExpired:
		return true
	}
	return false
}

// OnStarted starts the sweep that expires sessions.
func (h *sessionsHook) OnStarted() {
	k := &h.e.sess
	k.stop, k.done = make(chan struct{}), make(chan struct{})
	go h.e.sweepSessions(k.stop, k.done)
}

// OnStopped stops the sweep.
func (h *sessionsHook) OnStopped() {
	k := &h.e.sess
	if k.stop != nil {
		close(k.stop)
		<-k.done
	}
}

func (h *sessionsHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	return h.e.stripRetain(cl, pk), nil
}

func (h *sessionsHook) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	return h.e.stripWillRetain(cl, will), nil
}

func (h *sessionsHook) OnSessionEstablish(cl *mqtt.Client, _ packets.Packet) {
	if cl.Net.Inline {
		return
	}
	e := h.e
	e.mu.Lock()
	defer e.mu.Unlock()
	e.sess.connecting[cl.ID] = cl
}

func (h *sessionsHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	if cl.Net.Inline {
		return
	}
	e := h.e
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.sess.connecting[cl.ID] == cl {
		delete(e.sess.connecting, cl.ID)
	}
	// Resumed (or replaced by a clean one).
	delete(e.sess.offline, cl.ID)
}

func (h *sessionsHook) OnDisconnect(cl *mqtt.Client, _ error, expire bool) {
	if cl.Net.Inline {
		return
	}
	h.e.sessionOffline(cl, expire)
}

// OnClientExpired completes mochi's expiry of an MQTT 5 session, which
// leaves its subscriptions in the topic index.
func (h *sessionsHook) OnClientExpired(cl *mqtt.Client) {
	e := h.e
	e.mu.Lock()
	defer e.mu.Unlock()
	if s := e.sess.offline[cl.ID]; s != nil && s.cl == cl {
		delete(e.sess.offline, cl.ID)
	}
	e.server.UnsubscribeClient(cl) // nothing in the index if taken over
	cl.ClearInflights()
	sessionsEnded.WithLabelValues(sessionEndExpired).Inc()
}

// sessionOffline records the persistent session of cl, which has
// disconnected, or ends it if its device was removed meanwhile.
func (e *Embedded) sessionOffline(cl *mqtt.Client, expire bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	k := &e.sess
	if k.connecting[cl.ID] == cl {
		delete(k.connecting, cl.ID)
	}
	if _, ok := k.removed[cl]; ok {
		delete(k.removed, cl)
		e.endSessionLocked(cl.ID, cl, sessionEndDeviceRemoved)
		return
	}
	// A clean session ends with its connection (mochi drops it); a
	// taken-over one lives on in its new connection.
	if expire || cl.IsTakenOver() {
		return
	}
	s := &offlineSession{cl: cl, since: k.now()}
	if a := e.sessions[cl]; a != nil {
		s.creds, s.admin, s.username, s.password = true, a.grant.Admin, a.username, a.password
	}
	k.offline[cl.ID] = s
}

// endSessionLocked ends the persistent session of client id, held by the
// disconnected cl, unless it has been resumed meanwhile: it drops its
// subscriptions, its queued messages and the client. e.mu is held; a
// client resuming the session waits for it in OnSessionEstablish, so
// either it resumes the whole session or none.
func (e *Embedded) endSessionLocked(id string, cl *mqtt.Client, reason string) bool {
	k := &e.sess
	if c := k.connecting[id]; c != nil && !c.Closed() {
		return false // being resumed; its OnSessionEstablished forgets it
	}
	if s := k.offline[id]; s != nil && s.cl == cl {
		delete(k.offline, id)
	}
	cur, ok := e.server.Clients.Get(id)
	if !ok || cur != cl || !cl.Closed() || cl.IsTakenOver() {
		return false // gone already, or resumed
	}
	// Counted first, so whoever sees the session gone sees it counted.
	sessionsEnded.WithLabelValues(reason).Inc()
	e.server.UnsubscribeClient(cl)
	cl.ClearInflights()
	e.server.Clients.Delete(id)
	e.log.V(1).Info("ended persistent session", "clientID", truncateID(id), "reason", reason)
	return true
}

// sweepSessions expires sessions until stop is closed.
func (e *Embedded) sweepSessions(stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	t := time.NewTicker(e.sess.sweepEvery)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			e.expireSessions()
		}
	}
}

// expireSessions ends the offline sessions older than the expiry, cleans
// up after connections that ended without OnDisconnect, and updates the
// metrics.
func (e *Embedded) expireSessions() {
	k := &e.sess
	now := k.now()
	e.mu.Lock()
	var due []string
	for id, s := range k.offline {
		if now.Sub(s.since) >= k.opts.Expiry {
			due = append(due, id)
		}
	}
	// A client whose CONNACK could not be written has no OnDisconnect but
	// may have left a session: let it expire like any other.
	for id, c := range k.connecting {
		if !c.Closed() {
			continue
		}
		delete(k.connecting, id)
		if cur, ok := e.server.Clients.Get(id); ok && cur == c && k.offline[id] == nil {
			k.offline[id] = &offlineSession{cl: c, since: now}
		}
	}
	for c := range k.removed {
		if c.Closed() {
			delete(k.removed, c)
			e.endSessionLocked(c.ID, c, sessionEndDeviceRemoved)
		}
	}
	e.mu.Unlock()

	// One at a time, so that connecting clients are not held up for long.
	for _, id := range due {
		e.mu.Lock()
		if s := k.offline[id]; s != nil && now.Sub(s.since) >= k.opts.Expiry {
			e.endSessionLocked(id, s.cl, sessionEndExpired)
		}
		e.mu.Unlock()
	}
	e.updateSessionMetrics()
}

// updateSessionMetrics sets the session gauges and counts the messages
// mochi dropped for a full session queue since the last call.
func (e *Embedded) updateSessionMetrics() {
	e.mu.Lock()
	online, offline := len(e.conns), len(e.sess.offline)
	dropped := atomic.LoadInt64(&e.server.Info.InflightDropped)
	delta := dropped - e.sess.dropped
	e.sess.dropped = dropped
	e.mu.Unlock()
	sessionsGauge.WithLabelValues("online").Set(float64(online))
	sessionsGauge.WithLabelValues("offline").Set(float64(offline))
	if delta > 0 {
		sessionQueueDropped.Add(float64(delta))
	}
}

// endDeviceSession ends the session of a device whose twin was deleted or
// disabled, and its connection cl (nil if offline), at once.
func (e *Embedded) endDeviceSession(deviceID string, cl *mqtt.Client, why error) {
	e.mu.Lock()
	if s := e.sess.offline[deviceID]; s != nil {
		e.endSessionLocked(deviceID, s.cl, sessionEndDeviceRemoved)
	}
	if cl != nil {
		// Its OnDisconnect (or the next sweep) ends the session.
		e.sess.removed[cl] = struct{}{}
	}
	e.mu.Unlock()
	if cl != nil {
		e.revoke(cl, why)
	}
}

// deviceRemoved reports whether a refusal means the device no longer
// exists or may not connect at all (rather than that its credential
// changed).
func deviceRemoved(err error) bool {
	var r *Refusal
	return errors.As(err, &r) && (r.Reason == ReasonUnknownDevice || r.Reason == ReasonDisabled)
}
