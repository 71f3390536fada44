// Package bridge is the operator's side of the device protocol: it turns
// device messages (twin GETs, reported patches, acknowledgements, presence)
// into in-memory working state and wakes the DeviceTwin reconciler, which
// persists that state with one status patch per round; and it publishes
// desired-property changes to devices.
//
// Writes are coalesced by construction: messages only change memory and
// enqueue the twin's key; the controller's work queue holds a key at most
// once, so every report that arrives while a write is in flight goes out in
// the next single write. A device hears "204" (and its MQTT acknowledgement
// is released) only after the write that holds its report has succeeded.
package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"sync"
	"time"

	"github.com/go-logr/logr"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// Resolver finds the DeviceTwin that holds a device id (deviceid.Resolver
// over the manager's cache). It returns an error matching
// deviceid.ErrNotFound when there is none.
type Resolver func(ctx context.Context, deviceID string) (*v1alpha1.DeviceTwin, error)

// Defaults of Options and fixed limits.
const (
	// DefaultMaxPendingReports is the default of Options.MaxPendingReports.
	DefaultMaxPendingReports = 256
	// DefaultMaxPendingReportBytes is the default of
	// Options.MaxPendingReportBytes.
	DefaultMaxPendingReportBytes = 256 * 1024
	// MaxReportedPatchBytes is the largest reported patch, in bytes of
	// JSON, checked before it is decoded: a whole 32 KB reported section
	// written compactly fits, with room for deletions. It equals the
	// embedded broker's default maximum packet size; an external broker
	// may let larger messages through.
	MaxReportedPatchBytes = 64 * 1024
	// maxSmallPayload bounds ack and presence payloads ({"$version": n},
	// {"online": bool}).
	maxSmallPayload = 1024
	// respondTimeout bounds the publishes of one batch of responses, and
	// of a desired change, so a stuck bus cannot hold a reconciler.
	respondTimeout = 10 * time.Second
)

// Options configure a Bridge.
type Options struct {
	// Resolve maps device ids to twins.
	Resolve Resolver
	// Logger logs refused messages and publish failures.
	Logger logr.Logger
	// Now is the clock (tests may replace it).
	Now func() time.Time
	// MaxPendingReports bounds the messages of one device waiting to be
	// stored; a report beyond it is answered 429 and changes nothing.
	// DefaultMaxPendingReports if zero.
	MaxPendingReports int
	// MaxPendingReportBytes bounds the payload bytes of those messages
	// (the bus holds each message until it is acknowledged), likewise.
	// DefaultMaxPendingReportBytes if zero.
	MaxPendingReportBytes int
	// IdleStateTTL is how long a twin's working state stays in memory
	// unused before it is dropped, when idle (see dropIdle); it is loaded
	// again from the cached status on next use. DefaultIdleStateTTL if
	// zero; KeepIdleState (negative) never drops it.
	IdleStateTTL time.Duration
}

// Bridge holds the working state of every twin and connects it to the bus.
type Bridge struct {
	bus             bus.Bus
	resolve         Resolver
	log             logr.Logger
	now             func() time.Time
	wakes           wakeQueue
	seed            maphash.Seed
	maxPending      int
	maxPendingBytes int
	respondTimeout  time.Duration
	idleTTL         time.Duration

	mu      sync.Mutex
	devices map[types.NamespacedName]*deviceEntry
}

type deviceEntry struct {
	mu sync.Mutex
	d  *device
	// idle is what is kept of d while it is dropped (d nil): see idleMarker.
	idle *idleMarker
	// gone is set by Forget: the entry left the map.
	gone bool
}

// New returns a Bridge. Call SetBus before the bus starts delivering.
func New(o Options) *Bridge {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.MaxPendingReports <= 0 {
		o.MaxPendingReports = DefaultMaxPendingReports
	}
	if o.MaxPendingReportBytes <= 0 {
		o.MaxPendingReportBytes = DefaultMaxPendingReportBytes
	}
	if o.IdleStateTTL == 0 {
		o.IdleStateTTL = DefaultIdleStateTTL
	}
	return &Bridge{
		resolve:         o.Resolve,
		log:             o.Logger,
		now:             o.Now,
		seed:            maphash.MakeSeed(),
		maxPending:      o.MaxPendingReports,
		maxPendingBytes: o.MaxPendingReportBytes,
		respondTimeout:  respondTimeout,
		idleTTL:         o.IdleStateTTL,
		devices:         map[types.NamespacedName]*deviceEntry{},
	}
}

// SetBus sets the bus the Bridge publishes on.
func (b *Bridge) SetBus(x bus.Bus) { b.bus = x }

// lock returns the entry of a twin, locked, with its working state loaded
// from t's status on first use or after it was dropped.
func (b *Bridge) lock(t *v1alpha1.DeviceTwin) (*deviceEntry, error) {
	key := types.NamespacedName{Namespace: t.Namespace, Name: t.Name}
	b.mu.Lock()
	e, ok := b.devices[key]
	if !ok {
		e = &deviceEntry{}
		b.devices[key] = e
	}
	b.mu.Unlock()
	e.mu.Lock()
	if e.d == nil || e.d.id != t.EffectiveDeviceID() {
		d, err := loadDevice(t)
		if err == nil && e.d == nil && e.idle != nil {
			err = e.idle.restore(d)
		}
		if err != nil {
			e.mu.Unlock()
			return nil, fmt.Errorf("loading status of %s: %w", key, err)
		}
		switch {
		case e.d != nil: // the twin's device id changed: its messages go
			pendingMessages.Sub(float64(len(e.d.pending)))
			pendingBytes.Sub(float64(e.d.pendingBytes))
		case !e.gone:
			twinsInMemory.Inc()
			if e.idle != nil {
				idleStatesReloaded.Inc()
			}
		}
		e.d, e.idle = d, nil
	}
	e.d.lastUsed = b.now()
	return e, nil
}

// Forget drops the working state of a twin (it was deleted). Pending
// messages are not acknowledged: their effect is gone with the twin.
func (b *Bridge) Forget(key types.NamespacedName) {
	b.mu.Lock()
	e := b.devices[key]
	delete(b.devices, key)
	b.mu.Unlock()
	if e == nil {
		return
	}
	e.mu.Lock()
	if e.d != nil && e.d.online != nil && *e.d.online {
		connectedDevices.Dec()
	}
	if e.d != nil && !e.gone {
		pendingMessages.Sub(float64(len(e.d.pending)))
		pendingBytes.Sub(float64(e.d.pendingBytes))
		twinsInMemory.Dec()
	}
	e.d, e.idle, e.gone = nil, nil, true
	e.mu.Unlock()
}

// with runs f on the device of t under its lock.
func (b *Bridge) with(t *v1alpha1.DeviceTwin, f func(d *device)) error {
	e, err := b.lock(t)
	if err != nil {
		return err
	}
	defer e.mu.Unlock()
	f(e.d)
	return nil
}

// wake enqueues t for reconciliation unless it is already queued. It never
// blocks: it runs on the bus's delivery path.
func (b *Bridge) wake(t *v1alpha1.DeviceTwin, d *device) {
	b.wakeKey(types.NamespacedName{Namespace: t.Namespace, Name: t.Name}, d)
}

func (b *Bridge) wakeKey(key types.NamespacedName, d *device) {
	if d.queued {
		return
	}
	d.queued = true
	b.wakes.add(key)
}

// Snapshot returns the working state of t and marks it as taken: messages
// that arrive from now on wake the reconciler again. The pending messages
// it covers stay in place until Persisted.
func (b *Bridge) Snapshot(t *v1alpha1.DeviceTwin) (Snapshot, error) {
	var s Snapshot
	var superseded []func()
	err := b.with(t, func(d *device) {
		d.queued = false
		d.inFlight = true
		// No snapshot of this twin is being persisted now (the controller
		// reconciles a key at a time), so superseded presence and acks of
		// an earlier, failed round may go.
		superseded = d.compact()
		d.covered = len(d.pending)
		s = d.snapshot()
	})
	ackAll(superseded)
	return s, err
}

// ackAll calls the acks of superseded messages.
func ackAll(acks []func()) {
	for _, ack := range acks {
		ack()
	}
}

// Persisted records that status st (built from snapshot s) is stored, and
// answers and acknowledges the messages s covered. The bridge keeps st
// itself: the caller must not change it afterwards.
func (b *Bridge) Persisted(ctx context.Context, t *v1alpha1.DeviceTwin, s Snapshot, st v1alpha1.DeviceTwinStatus) {
	var done []pendingAck
	_ = b.with(t, func(d *device) {
		d.persisted = st
		d.persistedReported = s.Reported
		d.inFlight = false
		done = d.takePending(s.Pending)
	})
	b.dropUnseen(t)
	if len(done) == 0 {
		return // the usual no-write reconcile: no timer to set up
	}
	// One deadline for the whole batch: a reconciler never waits on a
	// stuck bus for longer.
	ctx, cancel := context.WithTimeout(ctx, b.respondTimeout)
	defer cancel()
	now := b.now()
	for _, p := range done {
		if p.rid != "" {
			b.respond(ctx, s.DeviceID, p.rid, protocol.Response{Status: protocol.StatusNoContent, Version: p.version})
		}
		p.ack()
		reportLatency.Observe(now.Sub(p.received).Seconds())
	}
	reportsPersisted.Add(float64(len(done)))
	if reports := countReports(done); reports > 1 {
		reportsCoalesced.Add(float64(reports - 1))
	}
}

// PublishDesired sends the change from the last published desired document
// to desired as a notification with the next $version and keeps desired
// retained on the broker, then records it in the working state. It does
// nothing when desired equals what was published.
func (b *Bridge) PublishDesired(ctx context.Context, t *v1alpha1.DeviceTwin, desired twin.Doc) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, b.respondTimeout)
	defer cancel()
	// Hold the device lock across the publishes so GETs never see a
	// version the broker has not got; the deadline bounds how long.
	e, err := b.lock(t)
	if err != nil {
		return false, err
	}
	defer e.mu.Unlock()
	d := e.d
	if b.bus == nil {
		return false, errors.New("no MQTT bus configured")
	}
	if twin.Equal(d.published, desired) {
		if d.retainedSent || d.desiredVersion == 0 {
			return false, nil
		}
		// First time since this process loaded the twin: make sure the
		// broker holds the retained document (same version, no patch).
		full, _ := json.Marshal(protocol.WithVersion(d.published, d.desiredVersion))
		if err := b.bus.Publish(ctx, protocol.DesiredTopic(d.id), full, true); err != nil {
			return false, fmt.Errorf("republishing desired document of device %q: %w", d.id, err)
		}
		d.retainedSent = true
		return false, nil
	}
	change := twin.Diff(d.published, desired)
	version := d.desiredVersion + 1
	full, _ := json.Marshal(protocol.WithVersion(desired, version))
	patch, _ := json.Marshal(protocol.WithVersion(change, version))
	// The patch goes first: a subscribed device applies it, then ignores
	// the retained document of the same version that follows.
	if err := b.bus.Publish(ctx, protocol.DesiredPatchTopic(d.id), patch, false); err != nil {
		return false, fmt.Errorf("publishing desired patch of device %q: %w", d.id, err)
	}
	if err := b.bus.Publish(ctx, protocol.DesiredTopic(d.id), full, true); err != nil {
		return false, fmt.Errorf("publishing desired document of device %q: %w", d.id, err)
	}
	desiredNotifications.Inc()
	d.desiredMeta = twin.UpdateMetadata(d.desiredMeta, desired, change, b.now(), version)
	d.published = desired
	d.desiredVersion = version
	d.retainedSent = true
	return true, nil
}

// ClearRetained removes the retained desired document of a device (its
// twin is being deleted), so a later device with the same id does not get
// stale configuration.
func (b *Bridge) ClearRetained(ctx context.Context, deviceID string) error {
	if b.bus == nil {
		return errors.New("no MQTT bus configured")
	}
	ctx, cancel := context.WithTimeout(ctx, b.respondTimeout)
	defer cancel()
	return b.bus.Publish(ctx, protocol.DesiredTopic(deviceID), nil, true)
}

// Handle is the bus.Handler: it applies one device message to the working
// state and wakes the reconciler.
func (b *Bridge) Handle(m bus.Message) {
	ctx := context.Background()
	messagesReceived.WithLabelValues(m.Kind).Inc()
	t, err := b.resolve(ctx, m.DeviceID)
	if err != nil {
		if m.RequestID != "" {
			st, msg := protocol.StatusError, fmt.Sprintf("looking up device %q: %v", m.DeviceID, err)
			if errors.Is(err, deviceid.ErrNotFound) {
				st, msg = protocol.StatusNotFound, fmt.Sprintf("no DeviceTwin for device id %q", m.DeviceID)
			}
			b.respond(ctx, m.DeviceID, m.RequestID, protocol.Response{Status: st, Error: msg})
		}
		b.log.V(1).Info("message for unknown device", "deviceId", m.DeviceID, "kind", m.Kind, "error", err.Error())
		m.Ack()
		return
	}
	switch m.Kind {
	case protocol.KindReported:
		b.handleReported(ctx, t, m)
	case protocol.KindGet:
		b.handleGet(ctx, t, m)
	case protocol.KindAck:
		b.handleAck(t, m)
	case protocol.KindPresence:
		b.handlePresence(t, m)
	default:
		m.Ack()
	}
}

func (b *Bridge) refuse(ctx context.Context, m bus.Message, err error) {
	reportsRefused.Inc()
	b.log.Info("refused device message", "deviceId", m.DeviceID, "kind", m.Kind, "requestId", m.RequestID, "reason", err.Error())
	if m.RequestID != "" {
		b.respond(ctx, m.DeviceID, m.RequestID, protocol.Response{Status: protocol.StatusBadRequest, Error: err.Error()})
	}
	m.Ack()
}

func (b *Bridge) handleReported(ctx context.Context, t *v1alpha1.DeviceTwin, m bus.Message) {
	if n := len(m.Payload); n > MaxReportedPatchBytes {
		reportsTooLarge.Inc()
		b.refuse(ctx, m, fmt.Errorf("reported: patch is %d bytes, more than the %d allowed", n, MaxReportedPatchBytes))
		return
	}
	patch, err := twin.Decode(m.Payload)
	if err != nil {
		b.refuse(ctx, m, fmt.Errorf("reported patch: %w", err))
		return
	}
	if err := twin.ValidatePatch(twin.Reported, "reported", patch); err != nil {
		b.refuse(ctx, m, err)
		return
	}
	sum := maphash.Bytes(b.seed, m.Payload)
	rid := maphash.String(b.seed, m.RequestID)
	var refused error
	answered := int64(-1)
	busy := false
	err = b.with(t, func(d *device) {
		if d.full(len(m.Payload), b.maxPending, b.maxPendingBytes) {
			busy = true
			return
		}
		if r, seen := d.recent[rid]; seen && r.sum == sum {
			// A resend of a request already applied: answer it, once
			// its version is persisted, without applying it again.
			if r.version <= d.persisted.ReportedVersion {
				answered = r.version
				return
			}
			d.addPending(pendingAck{kind: protocol.KindReported, rid: m.RequestID, version: r.version, ack: m.Ack, received: m.Received, bytes: len(m.Payload)})
			b.wake(t, d)
			return
		}
		// A new rid, or a rid used before for another payload: a new
		// report (devices that restart their counter, or SDKs that use
		// one rid for every report, must not lose it).
		merged := twin.MergePatch(d.reported, patch)
		if err := twin.CheckSize(twin.Reported, "reported", merged); err != nil {
			refused = err
			return
		}
		now := b.now()
		d.reportedMeta = twin.UpdateMetadata(d.reportedMeta, merged, patch, now, 0)
		d.reported = merged
		d.reportedVersion++
		d.lastActivity = now
		d.addPending(pendingAck{kind: protocol.KindReported, rid: m.RequestID, version: d.reportedVersion, ack: m.Ack, received: m.Received, bytes: len(m.Payload)})
		d.remember(rid, d.reportedVersion, sum)
		b.wake(t, d)
	})
	if err != nil {
		b.refuseInternal(ctx, m, err)
		return
	}
	if busy {
		reportsThrottled.Inc()
		b.respond(ctx, m.DeviceID, m.RequestID, protocol.Response{Status: protocol.StatusTooMany,
			Error: fmt.Sprintf("device %q has reached %d messages or %d bytes waiting to be stored; retry later", m.DeviceID, b.maxPending, b.maxPendingBytes)})
		m.Ack()
		return
	}
	if answered >= 0 {
		b.respond(ctx, m.DeviceID, m.RequestID, protocol.Response{Status: protocol.StatusNoContent, Version: answered})
		m.Ack()
		return
	}
	if refused != nil {
		reportsTooLarge.Inc() // CheckSize refuses for size only
		b.refuse(ctx, m, refused)
	}
}

func (b *Bridge) refuseInternal(ctx context.Context, m bus.Message, err error) {
	b.log.Error(err, "cannot handle device message", "deviceId", m.DeviceID, "kind", m.Kind)
	if m.RequestID != "" {
		b.respond(ctx, m.DeviceID, m.RequestID, protocol.Response{Status: protocol.StatusError, Error: err.Error()})
	}
	m.Ack()
}

func (b *Bridge) handleGet(ctx context.Context, t *v1alpha1.DeviceTwin, m bus.Message) {
	var resp protocol.Response
	err := b.with(t, func(d *device) {
		resp = protocol.Response{
			Status:   protocol.StatusOK,
			Desired:  protocol.WithVersion(d.published, d.desiredVersion),
			Reported: protocol.WithVersion(d.persistedReported, d.persisted.ReportedVersion),
		}
		d.lastActivity = b.now()
		if d.desiredVersion > d.deviceDesiredVersion {
			d.deviceDesiredVersion = d.desiredVersion
			b.wake(t, d)
		}
	})
	if err != nil {
		b.refuseInternal(ctx, m, err)
		return
	}
	b.respond(ctx, m.DeviceID, m.RequestID, resp)
	m.Ack()
}

func (b *Bridge) handleAck(t *v1alpha1.DeviceTwin, m bus.Message) {
	var a protocol.Ack
	if len(m.Payload) > maxSmallPayload {
		b.refuse(context.Background(), m, fmt.Errorf("ack: payload is %d bytes, more than the %d allowed", len(m.Payload), maxSmallPayload))
		return
	}
	if err := json.Unmarshal(m.Payload, &a); err != nil {
		b.refuse(context.Background(), m, fmt.Errorf("ack: payload is not {\"$version\": n}: %w", err))
		return
	}
	var acks []func()
	err := b.with(t, func(d *device) {
		d.lastActivity = b.now()
		if a.Version > d.deviceDesiredVersion && a.Version <= d.desiredVersion {
			d.deviceDesiredVersion = a.Version
			acks = d.addPending(pendingAck{kind: protocol.KindAck, ack: m.Ack, received: m.Received, bytes: len(m.Payload)})
			b.wake(t, d)
			return
		}
		acks = []func(){m.Ack}
	})
	if err != nil {
		b.refuseInternal(context.Background(), m, err)
		return
	}
	ackAll(acks)
}

func (b *Bridge) handlePresence(t *v1alpha1.DeviceTwin, m bus.Message) {
	var p protocol.Presence
	if len(m.Payload) == 0 {
		m.Ack() // a cleared retained presence message
		return
	}
	if len(m.Payload) > maxSmallPayload {
		b.refuse(context.Background(), m, fmt.Errorf("presence: payload is %d bytes, more than the %d allowed", len(m.Payload), maxSmallPayload))
		return
	}
	if err := json.Unmarshal(m.Payload, &p); err != nil {
		b.refuse(context.Background(), m, fmt.Errorf("presence: payload is not {\"online\": bool}: %w", err))
		return
	}
	var acks []func()
	err := b.with(t, func(d *device) {
		if b.setPresence(d, p.Online, m.Received) {
			acks = d.addPending(pendingAck{kind: protocol.KindPresence, ack: m.Ack, received: m.Received, bytes: len(m.Payload)})
			b.wake(t, d)
			return
		}
		acks = []func(){m.Ack}
	})
	if err != nil {
		b.refuseInternal(context.Background(), m, err)
		return
	}
	ackAll(acks)
}

// setPresence records a presence change; it reports whether anything changed.
func (b *Bridge) setPresence(d *device, online bool, at time.Time) bool {
	if online {
		d.lastActivity = at
	}
	if d.online != nil && *d.online == online {
		return false
	}
	switch {
	case online:
		connectedDevices.Inc()
	case d.online != nil: // was online
		connectedDevices.Dec()
	}
	d.online = &online
	d.onlineChanged = at
	return true
}

// Presence is the bus.PresenceHandler of the embedded broker: the broker
// saw a client connect or disconnect. Client ids that are no device's id
// are ignored.
func (b *Bridge) Presence(clientID string, online bool, at time.Time) {
	t, err := b.resolve(context.Background(), clientID)
	if err != nil {
		return
	}
	_ = b.with(t, func(d *device) {
		if b.setPresence(d, online, at) {
			b.wake(t, d)
		}
	})
}

func (b *Bridge) respond(ctx context.Context, deviceID, rid string, r protocol.Response) {
	if b.bus == nil {
		return
	}
	payload, err := json.Marshal(r)
	if err != nil {
		b.log.Error(err, "encoding response", "deviceId", deviceID)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, b.respondTimeout)
	defer cancel()
	if err := b.bus.Publish(ctx, protocol.ResponseTopic(deviceID, rid), payload, false); err != nil {
		b.log.Error(err, "publishing response", "deviceId", deviceID, "requestId", rid)
	}
}

// rawDoc decodes a status JSON field.
func rawDoc(j *apiextensionsv1.JSON) (twin.Doc, error) {
	if j == nil {
		return twin.Doc{}, nil
	}
	return twin.DecodeRaw(j.Raw)
}

// RawJSON encodes a doc for a status field; an empty doc is nil (omitted).
func RawJSON(d twin.Doc) *apiextensionsv1.JSON {
	if len(d) == 0 {
		return nil
	}
	return &apiextensionsv1.JSON{Raw: twin.Encode(d)}
}

// countReports counts the reported patches (not acks or presence) among done.
func countReports(done []pendingAck) int {
	n := 0
	for _, p := range done {
		if p.rid != "" {
			n++
		}
	}
	return n
}
