package bridge

import (
	"slices"
	"time"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// pendingAck is a device message whose effect waits to be persisted: once
// the status write that holds it succeeds, the device gets its response
// (when rid is set) and the message its MQTT acknowledgement.
type pendingAck struct {
	kind     string // protocol.KindReported, KindAck or KindPresence
	rid      string
	version  int64 // reported version to answer with (reported patches)
	ack      func()
	received time.Time
	// bytes is the message's payload size: the bus holds the message
	// until ack is called.
	bytes int
}

// device is the operator's working view of one twin: the last status it
// persisted (or loaded), plus what devices sent since. All fields are
// guarded by Bridge.mu's per-device lock (device.mu in bridge.go).
type device struct {
	id string

	// persisted is the status last written to (or read from) the API.
	persisted v1alpha1.DeviceTwinStatus
	// persistedReported is persisted.Status.Reported, decoded.
	persistedReported twin.Doc

	// Working values: persisted plus the messages since.
	reported        twin.Doc
	reportedVersion int64
	reportedMeta    twin.Doc

	published      twin.Doc // desired as last sent to the device
	desiredVersion int64
	desiredMeta    twin.Doc
	// retainedSent is set once this process has published the retained
	// desired document: after a restart the (embedded, or non-persistent)
	// broker may have lost it.
	retainedSent bool

	deviceDesiredVersion int64

	online        *bool // nil: no presence seen since load
	onlineChanged time.Time
	lastActivity  time.Time

	pending      []pendingAck
	pendingBytes int
	// covered is how many pending messages the snapshot being persisted
	// holds: Persisted answers exactly those, so they must stay in place.
	covered int
	queued  bool // an event for this device is waiting in the controller's queue
	// inFlight is set from Snapshot to Persisted: a status built from the
	// working state is being written.
	inFlight bool
	// lastUsed is when the bridge last touched this state (see dropIdle).
	lastUsed time.Time
	// activityWoken is the lastActivity dropIdle last woke the reconciler
	// to store.
	activityWoken time.Time

	// recent maps the request ids (maphash) of recent reported patches
	// to the version they got and a hash of their payload, so a resend
	// (same rid, same payload) is answered, not reapplied.
	recent      map[uint64]recentReport
	recentOrder []uint64
}

// recentReport is what a device's recent request id was used for.
type recentReport struct {
	version int64
	sum     uint64 // maphash of the payload
}

// recentRequests is how many request ids of persisted reports a device
// remembers; ids of reports not yet persisted are always remembered.
const recentRequests = 256

// remember records that request rid with payload hash sum got version.
// A rid used before for another payload now means this one.
func (d *device) remember(rid uint64, version int64, sum uint64) {
	if d.recent == nil {
		d.recent = make(map[uint64]recentReport)
	}
	if _, ok := d.recent[rid]; ok {
		d.recentOrder = slices.DeleteFunc(d.recentOrder, func(r uint64) bool { return r == rid })
	}
	for len(d.recentOrder) >= recentRequests {
		oldest := d.recentOrder[0]
		if d.recent[oldest].version > d.persisted.ReportedVersion {
			break // still pending: a resend must find it
		}
		delete(d.recent, oldest)
		d.recentOrder = d.recentOrder[1:]
	}
	d.recent[rid] = recentReport{version: version, sum: sum}
	d.recentOrder = append(d.recentOrder, rid)
}

// full reports whether a report of n more payload bytes would take the
// device's pending messages over the bounds.
func (d *device) full(n, maxCount, maxBytes int) bool {
	return len(d.pending) >= maxCount || d.pendingBytes+n > maxBytes
}

// addPending appends p. A presence or ack message supersedes the one of
// its kind not yet covered by a snapshot (its effect is replaced by p's,
// which is stored before p is acknowledged); the superseded messages are
// returned to be acknowledged now. So each kind holds at most one
// uncovered entry and only reports grow the list.
func (d *device) addPending(p pendingAck) (superseded []func()) {
	if coalesced(p.kind) {
		superseded = d.drop(func(i int, q pendingAck) bool { return i >= d.covered && q.kind == p.kind })
	}
	d.pending = append(d.pending, p)
	d.pendingBytes += p.bytes
	pendingMessages.Inc()
	pendingBytes.Add(float64(p.bytes))
	return superseded
}

// compact keeps only the last presence and the last ack entry. Call it
// only when no snapshot is being persisted, so that any entry may go.
func (d *device) compact() (superseded []func()) {
	last := map[string]int{}
	for i, p := range d.pending {
		if coalesced(p.kind) {
			last[p.kind] = i
		}
	}
	return d.drop(func(i int, p pendingAck) bool { return coalesced(p.kind) && last[p.kind] != i })
}

// coalesced reports whether a later message of kind supersedes an earlier.
func coalesced(kind string) bool { return kind == protocol.KindPresence || kind == protocol.KindAck }

// drop removes the pending entries for which gone is true and returns
// their acks.
func (d *device) drop(gone func(i int, p pendingAck) bool) []func() {
	var acks []func()
	kept := d.pending[:0]
	for i, p := range d.pending {
		if !gone(i, p) {
			kept = append(kept, p)
			continue
		}
		acks = append(acks, p.ack)
		d.pendingBytes -= p.bytes
		pendingMessages.Dec()
		pendingBytes.Sub(float64(p.bytes))
	}
	clear(d.pending[len(kept):])
	d.pending = kept
	return acks
}

// takePending removes and returns the first n pending messages.
func (d *device) takePending(n int) []pendingAck {
	n = min(n, len(d.pending))
	done := slices.Clone(d.pending[:n])
	bytes := 0
	for _, p := range done {
		bytes += p.bytes
	}
	d.pending = append([]pendingAck(nil), d.pending[n:]...)
	d.pendingBytes -= bytes
	d.covered = max(0, d.covered-n)
	pendingMessages.Sub(float64(n))
	pendingBytes.Sub(float64(bytes))
	return done
}

// Snapshot is a consistent copy of a device's working state, taken by the
// reconciler to build the status it writes. Its documents and Persisted
// share the device's: read them, copy before changing.
type Snapshot struct {
	DeviceID             string
	Persisted            v1alpha1.DeviceTwinStatus
	Reported             twin.Doc
	ReportedVersion      int64
	ReportedMeta         twin.Doc
	Published            twin.Doc
	DesiredVersion       int64
	DesiredMeta          twin.Doc
	DeviceDesiredVersion int64
	// Online is nil when no presence was seen since the status was loaded.
	Online        *bool
	OnlineChanged time.Time
	LastActivity  time.Time
	// Pending is how many pending messages this snapshot covers.
	Pending int
	// OldestPending is when the oldest covered message arrived.
	OldestPending time.Time
}

func loadDevice(t *v1alpha1.DeviceTwin) (*device, error) {
	// The status is shared, not copied (t is often the cache's own
	// object): d.persisted is replaced, never changed in place.
	st := &t.Status
	d := &device{id: t.EffectiveDeviceID(), persisted: *st}
	var err error
	if d.persistedReported, err = rawDoc(st.Reported); err != nil {
		return nil, err
	}
	d.reported = d.persistedReported
	d.reportedVersion = st.ReportedVersion
	if d.published, err = rawDoc(st.PublishedDesired); err != nil {
		return nil, err
	}
	d.desiredVersion = st.DesiredVersion
	d.deviceDesiredVersion = st.DeviceDesiredVersion
	if st.Metadata != nil {
		if d.reportedMeta, err = rawDoc(st.Metadata.Reported); err != nil {
			return nil, err
		}
		if d.desiredMeta, err = rawDoc(st.Metadata.Desired); err != nil {
			return nil, err
		}
	}
	if st.LastActivityTime != nil {
		d.lastActivity = st.LastActivityTime.Time
	}
	return d, nil
}

func (d *device) snapshot() Snapshot {
	s := Snapshot{
		DeviceID: d.id,
		// Shared, as the documents are: d.persisted is replaced, never
		// changed in place (computeStatus copies it before changing it).
		Persisted:            d.persisted,
		Reported:             d.reported,
		ReportedVersion:      d.reportedVersion,
		ReportedMeta:         d.reportedMeta,
		Published:            d.published,
		DesiredVersion:       d.desiredVersion,
		DesiredMeta:          d.desiredMeta,
		DeviceDesiredVersion: d.deviceDesiredVersion,
		OnlineChanged:        d.onlineChanged,
		LastActivity:         d.lastActivity,
		Pending:              len(d.pending),
	}
	if d.online != nil {
		v := *d.online
		s.Online = &v
	}
	if len(d.pending) > 0 {
		s.OldestPending = d.pending[0].received
	}
	return s
}
