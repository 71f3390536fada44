package controllers

import (
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// activityResolution is how stale status.lastActivityTime may get before
// activity alone is worth a write.
const activityResolution = time.Minute

// statusInput is everything a status is computed from.
type statusInput struct {
	twin *v1alpha1.DeviceTwin
	snap bridge.Snapshot
	// desired is spec.desired when valid; invalid is the rule it broke.
	desired twin.Doc
	invalid error
	// duplicateOf names the twin that owns the device id, if not this one.
	duplicateOf string
	// creds is the CredentialsReady condition; nil when the operator does
	// not authenticate devices.
	creds *credStatus
	now   time.Time
}

// computeStatus builds the status to persist. It starts from the persisted
// status so that a result equal to it means "nothing to write".
func computeStatus(in statusInput) v1alpha1.DeviceTwinStatus {
	s := in.snap
	st := *s.Persisted.DeepCopy()
	now := metav1.NewTime(in.now.Truncate(time.Second))
	gen := in.twin.Generation

	st.DeviceID = s.DeviceID
	st.Reported = bridge.RawJSON(s.Reported)
	st.ReportedVersion = s.ReportedVersion
	st.DesiredVersion = s.DesiredVersion
	st.DeviceDesiredVersion = s.DeviceDesiredVersion
	st.PublishedDesired = bridge.RawJSON(s.Published)
	if len(s.ReportedMeta) > 0 || len(s.DesiredMeta) > 0 {
		st.Metadata = &v1alpha1.TwinMetadata{Desired: bridge.RawJSON(s.DesiredMeta), Reported: bridge.RawJSON(s.ReportedMeta)}
	} else {
		st.Metadata = nil
	}

	// Presence.
	connected := st.ConnectionState == v1alpha1.ConnectionStateConnected
	if s.Online != nil && (*s.Online != connected || st.ConnectionState == "") {
		connected = *s.Online
		st.ConnectionState = v1alpha1.ConnectionStateDisconnected
		if connected {
			st.ConnectionState = v1alpha1.ConnectionStateConnected
		}
		t := metav1.NewTime(s.OnlineChanged.Truncate(time.Second))
		st.ConnectionStateUpdatedTime = &t
	}
	if st.ConnectionState == "" {
		st.ConnectionState = v1alpha1.ConnectionStateDisconnected
	}
	switch {
	case in.duplicateOf != "":
		setCondition(&st, v1alpha1.ConditionConnected, metav1.ConditionFalse, v1alpha1.ReasonDuplicateDeviceID,
			"device id "+s.DeviceID+" belongs to DeviceTwin "+in.duplicateOf+"; this twin is not bridged", gen, now)
	case in.creds != nil && in.twin.Spec.Disabled():
		setCondition(&st, v1alpha1.ConditionConnected, metav1.ConditionFalse, v1alpha1.ReasonDisabled,
			"device is disabled (spec.status); the broker refuses it", gen, now)
	case connected:
		setCondition(&st, v1alpha1.ConditionConnected, metav1.ConditionTrue, v1alpha1.ReasonConnected, "device is connected", gen, now)
	case st.ConnectionStateUpdatedTime == nil:
		setCondition(&st, v1alpha1.ConditionConnected, metav1.ConditionFalse, v1alpha1.ReasonNeverConnected, "device has not connected yet", gen, now)
	default:
		setCondition(&st, v1alpha1.ConditionConnected, metav1.ConditionFalse, v1alpha1.ReasonDisconnected, "device is disconnected", gen, now)
	}

	// Delta and InSync.
	switch {
	case in.invalid != nil:
		setCondition(&st, v1alpha1.ConditionInSync, metav1.ConditionFalse, v1alpha1.ReasonInvalidDesired,
			"not sent to the device: "+in.invalid.Error(), gen, now)
	default:
		delta, n := twin.Delta(in.desired, s.Reported)
		st.Delta = bridge.RawJSON(delta)
		st.DeltaCount = int32(n)
		switch {
		case s.DeviceDesiredVersion < s.DesiredVersion:
			setCondition(&st, v1alpha1.ConditionInSync, metav1.ConditionFalse, v1alpha1.ReasonDesiredNotSeen,
				fmtMsg("device has not yet acknowledged desired version %d (it has %d)", s.DesiredVersion, s.DeviceDesiredVersion), gen, now)
		case n > 0:
			setCondition(&st, v1alpha1.ConditionInSync, metav1.ConditionFalse, v1alpha1.ReasonConverging,
				fmtMsg("%d desired properties not yet reported with their desired values", n), gen, now)
		default:
			setCondition(&st, v1alpha1.ConditionInSync, metav1.ConditionTrue, v1alpha1.ReasonInSync,
				fmtMsg("device reports every desired property of version %d", s.DesiredVersion), gen, now)
		}
	}
	setCredentialsCondition(&st, in.creds, gen, now)
	setKstatusConditions(&st, gen, now)
	st.ObservedGeneration = gen

	// lastActivityTime: write it with any other change, or alone when it
	// is more than activityResolution behind.
	if !s.LastActivity.IsZero() {
		la := metav1.NewTime(s.LastActivity.Truncate(time.Second))
		old := s.Persisted.LastActivityTime
		if old == nil || statusChanged(s.Persisted, st) || la.Sub(old.Time) >= activityResolution {
			st.LastActivityTime = &la
		}
	}
	return st
}

// statusChanged reports whether b differs from a in anything a write is needed for.
func statusChanged(a, b v1alpha1.DeviceTwinStatus) bool {
	return !equalStatus(a, b)
}

// setCondition sets a condition, keeping lastTransitionTime when the
// status does not change.
func setCondition(st *v1alpha1.DeviceTwinStatus, typ string, status metav1.ConditionStatus, reason, msg string, gen int64, now metav1.Time) {
	meta.SetStatusCondition(&st.Conditions, metav1.Condition{
		Type: typ, Status: status, Reason: reason, Message: msg,
		ObservedGeneration: gen, LastTransitionTime: now,
	})
}

// setKstatusConditions derives Ready, Reconciling and Stalled from InSync
// and Connected, so tools that follow the kstatus convention (Flux, kubectl
// wait --for=condition=Ready) see what InSync says.
func setKstatusConditions(st *v1alpha1.DeviceTwinStatus, gen int64, now metav1.Time) {
	insync := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionInSync)
	if insync == nil {
		return
	}
	ready, reason, msg := insync.Status, insync.Reason, insync.Message
	stalled := insync.Reason == v1alpha1.ReasonInvalidDesired
	if c := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionConnected); c != nil && c.Reason == v1alpha1.ReasonDuplicateDeviceID {
		stalled, ready, reason, msg = true, metav1.ConditionFalse, c.Reason, c.Message
	}
	setCondition(st, v1alpha1.ConditionReady, ready, reason, msg, gen, now)
	switch {
	case stalled:
		removeCondition(st, v1alpha1.ConditionReconciling)
		setCondition(st, v1alpha1.ConditionStalled, metav1.ConditionTrue, reason, msg, gen, now)
	case insync.Status == metav1.ConditionFalse:
		removeCondition(st, v1alpha1.ConditionStalled)
		setCondition(st, v1alpha1.ConditionReconciling, metav1.ConditionTrue, insync.Reason, insync.Message, gen, now)
	default:
		removeCondition(st, v1alpha1.ConditionStalled)
		removeCondition(st, v1alpha1.ConditionReconciling)
	}
}

// removeCondition removes condition typ. meta.RemoveStatusCondition copies
// the conditions even when typ is absent, the usual case.
func removeCondition(st *v1alpha1.DeviceTwinStatus, typ string) {
	if meta.FindStatusCondition(st.Conditions, typ) != nil {
		meta.RemoveStatusCondition(&st.Conditions, typ)
	}
}
