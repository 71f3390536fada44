package bridge

import (
	"time"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// pendingAck is a device message whose effect waits to be persisted: once
// the status write that holds it succeeds, the device gets its response
// (when rid is set) and the message its MQTT acknowledgement.
type pendingAck struct {
	rid      string
	version  int64 // reported version to answer with (reported patches)
	ack      func()
	received time.Time
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

	pending []pendingAck
	queued  bool // an event for this device is waiting in the controller's queue

	// recent maps the request ids of recent reported patches to the
	// version they got, so a resend (same rid) is answered, not reapplied.
	recent      map[string]int64
	recentOrder []string
}

// recentRequests is how many request ids of persisted reports a device
// remembers; ids of reports not yet persisted are always remembered.
const recentRequests = 256

// maxPending bounds the messages of one device waiting to be persisted;
// beyond it reports are refused with 429 until the operator catches up.
const maxPending = 2048

func (d *device) remember(rid string, version int64) {
	if d.recent == nil {
		d.recent = make(map[string]int64, recentRequests)
	}
	for len(d.recentOrder) >= recentRequests {
		oldest := d.recentOrder[0]
		if d.recent[oldest] > d.persisted.ReportedVersion {
			break // still pending: a resend must find it
		}
		delete(d.recent, oldest)
		d.recentOrder = d.recentOrder[1:]
	}
	d.recent[rid] = version
	d.recentOrder = append(d.recentOrder, rid)
}

// Snapshot is a consistent copy of a device's working state, taken by the
// reconciler to build the status it writes.
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
	st := t.Status.DeepCopy()
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
		DeviceID:             d.id,
		Persisted:            *d.persisted.DeepCopy(),
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
