package bridge

import (
	"context"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

const (
	// DefaultIdleStateTTL is the default of Options.IdleStateTTL: long
	// enough that a device reporting every few minutes keeps its state,
	// short enough that a fleet of mostly idle twins costs little memory.
	DefaultIdleStateTTL = 5 * time.Minute
	// KeepIdleState as Options.IdleStateTTL keeps every twin's working
	// state for as long as the twin exists.
	KeepIdleState time.Duration = -1
	// idleRecentRequests is how many request ids of its last reports a
	// dropped twin keeps: a device that got no answer (it went offline
	// first) resends its last reports, so those are answered with the
	// version they got rather than applied again. An older rid comes back
	// as a new report, as it does today past recentRequests.
	idleRecentRequests = 8
	// maxIdleSweepInterval bounds how long past its TTL idle state stays.
	maxIdleSweepInterval = time.Minute
)

// idleMarker is what is kept of a dropped twin's working state besides its
// cached status: what the status does not hold.
type idleMarker struct {
	id string
	// The versions the status had when dropped: a status read from the
	// cache that is older is refused rather than loaded.
	reportedVersion, desiredVersion, deviceDesiredVersion int64
	// retainedSent: the broker holds the retained desired document of
	// desiredVersion, so it is not published again on reload.
	retainedSent bool
	recent       []recentID
}

// recentID is one entry of device.recent.
type recentID struct {
	rid uint64
	recentReport
}

// marker returns what is kept of d once dropped.
func (d *device) marker() *idleMarker {
	m := &idleMarker{
		id:              d.id,
		reportedVersion: d.persisted.ReportedVersion, desiredVersion: d.persisted.DesiredVersion,
		deviceDesiredVersion: d.persisted.DeviceDesiredVersion,
		retainedSent:         d.retainedSent,
	}
	if n := len(d.recentOrder); n > 0 {
		keep := d.recentOrder[max(0, n-idleRecentRequests):]
		m.recent = make([]recentID, len(keep))
		for i, rid := range keep {
			m.recent[i] = recentID{rid: rid, recentReport: d.recent[rid]}
		}
	}
	return m
}

// restore puts back into d, just loaded from the cached status, what m
// kept. It refuses a status older than the one dropped.
func (m *idleMarker) restore(d *device) error {
	if d.id != m.id {
		return nil // the twin names another device now: nothing applies
	}
	p := &d.persisted
	if p.ReportedVersion < m.reportedVersion || p.DesiredVersion < m.desiredVersion || p.DeviceDesiredVersion < m.deviceDesiredVersion {
		return fmt.Errorf("cached status (reportedVersion %d, desiredVersion %d, deviceDesiredVersion %d) is older than the state dropped from memory (%d, %d, %d); retry once the cache has caught up",
			p.ReportedVersion, p.DesiredVersion, p.DeviceDesiredVersion, m.reportedVersion, m.desiredVersion, m.deviceDesiredVersion)
	}
	d.retainedSent = m.retainedSent && p.DesiredVersion == m.desiredVersion
	for _, r := range m.recent {
		d.remember(r.rid, r.version, r.sum)
	}
	return nil
}

// idle reports whether d holds nothing its persisted status does not, and
// nothing is about to change it: no pending messages, not queued, no
// status write in flight, device not connected.
func (d *device) idle() bool {
	p := &d.persisted
	connected := p.ConnectionState == v1alpha1.ConnectionStateConnected
	return len(d.pending) == 0 && !d.queued && !d.inFlight &&
		!connected && (d.online == nil || !*d.online) &&
		d.reportedVersion == p.ReportedVersion && d.desiredVersion == p.DesiredVersion &&
		d.deviceDesiredVersion == p.DeviceDesiredVersion
}

// activityUnsaved reports whether d saw activity (a GET, say) its status
// does not show yet; the reconciler stores it when due.
func (d *device) activityUnsaved() bool {
	la := d.persisted.LastActivityTime
	return !d.lastActivity.IsZero() && (la == nil || d.lastActivity.Truncate(time.Second).After(la.Time))
}

// caughtUp reports whether the cached status c shows what the bridge last
// persisted, p, in everything loadDevice reads or the status is computed
// from (the documents change with their versions).
func caughtUp(c, p *v1alpha1.DeviceTwinStatus) bool {
	return c.DeviceID == p.DeviceID && c.ReportedVersion == p.ReportedVersion && c.DesiredVersion == p.DesiredVersion &&
		c.DeviceDesiredVersion == p.DeviceDesiredVersion && c.ConnectionState == p.ConnectionState &&
		sameTime(c.LastActivityTime, p.LastActivityTime) && sameTime(c.ConnectionStateUpdatedTime, p.ConnectionStateUpdatedTime)
}

// sameTime compares times as the API stores them: metav1.Time is
// serialized to the second, so the status the bridge wrote (to the
// nanosecond) and the same status read back differ below it.
func sameTime(a, b *metav1.Time) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Truncate(time.Second).Equal(b.Truncate(time.Second))
}

// dropIdle drops the working state of the twins not used since ttl before
// now that are idle and whose cached status shows all of it, keeping an
// idleMarker of each. A twin whose only unsaved change is its activity
// time is woken instead, so the reconciler stores it. It returns how many
// states it dropped.
func (b *Bridge) dropIdle(ctx context.Context, now time.Time) int {
	if b.idleTTL < 0 {
		return 0
	}
	type keyed struct {
		key types.NamespacedName
		e   *deviceEntry
	}
	b.mu.Lock()
	entries := make([]keyed, 0, len(b.devices))
	for k, e := range b.devices {
		entries = append(entries, keyed{k, e})
	}
	b.mu.Unlock()
	dropped := 0
	for _, k := range entries {
		if b.dropIfIdle(ctx, k.key, k.e, now) {
			dropped++
		}
	}
	return dropped
}

func (b *Bridge) dropIfIdle(ctx context.Context, key types.NamespacedName, e *deviceEntry, now time.Time) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	d := e.d
	if e.gone || d == nil || now.Sub(d.lastUsed) < b.idleTTL || !d.idle() {
		return false
	}
	if d.activityUnsaved() {
		// Once per activity: the reconciler stores it when due (it
		// requeues itself), so later sweeps need not wake it again.
		if !d.activityWoken.Equal(d.lastActivity) {
			d.activityWoken = d.lastActivity
			b.wakeKey(key, d)
		}
		return false
	}
	// Loading must give back this state: the cache must have caught up
	// with the last write (the informer lags the API server).
	t, err := b.resolve(ctx, d.id)
	if err != nil || t.Namespace != key.Namespace || t.Name != key.Name || !caughtUp(&t.Status, &d.persisted) {
		return false
	}
	e.d, e.idle = nil, d.marker()
	twinsInMemory.Dec()
	idleStatesDropped.Inc()
	return true
}

// dropUnseen drops, right after its reconcile, the working state of a
// twin this process has heard nothing of since loading it (no presence,
// message or activity) when that reconcile wrote nothing (t, the cached
// copy it started from, already shows the state). An operator starting
// on a fleet of mostly offline devices so loads every twin for its first
// reconcile without holding them all at once: the state comes back from
// the cached status on the twin's next message or reconcile, as after
// --bridge-idle-state-ttl.
func (b *Bridge) dropUnseen(t *v1alpha1.DeviceTwin) {
	if b.idleTTL < 0 {
		return
	}
	key := types.NamespacedName{Namespace: t.Namespace, Name: t.Name}
	b.mu.Lock()
	e := b.devices[key]
	b.mu.Unlock()
	if e == nil {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	d := e.d
	if e.gone || d == nil || d.online != nil || !d.idle() || d.activityUnsaved() || !caughtUp(&t.Status, &d.persisted) {
		return
	}
	e.d, e.idle = nil, d.marker()
	twinsInMemory.Dec()
	idleStatesDropped.Inc()
}

// dropIdleEvery runs dropIdle until ctx is done.
func (b *Bridge) dropIdleEvery(ctx context.Context) {
	if b.idleTTL < 0 {
		return
	}
	tick := time.NewTicker(min(max(b.idleTTL/2, time.Second), maxIdleSweepInterval))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			b.dropIdle(ctx, b.now())
		}
	}
}
