package controllers

import (
	"errors"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	kstatus "sigs.k8s.io/cli-utils/pkg/kstatus/status"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/twin"
)

func TestComputeStatusConditions(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	yes, no := true, false
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Name: "d", Namespace: "n", Generation: 4}}
	cases := map[string]struct {
		snap          bridge.Snapshot
		desired       twin.Doc
		invalid       error
		duplicateOf   string
		wantConnected string
		wantInSync    string
		wantDelta     int32
		wantState     string
		wantKstatus   kstatus.Status
	}{
		"never connected, nothing desired": {
			snap: bridge.Snapshot{DeviceID: "d"}, desired: twin.Doc{},
			wantConnected: v1alpha1.ReasonNeverConnected, wantInSync: v1alpha1.ReasonInSync, wantState: v1alpha1.ConnectionStateDisconnected,
			wantKstatus: kstatus.CurrentStatus,
		},
		"desired not yet seen": {
			snap:          bridge.Snapshot{DeviceID: "d", DesiredVersion: 2, DeviceDesiredVersion: 1, Online: &yes, OnlineChanged: now},
			desired:       twin.Doc{"a": "x"},
			wantConnected: v1alpha1.ReasonConnected, wantInSync: v1alpha1.ReasonDesiredNotSeen, wantDelta: 1, wantState: v1alpha1.ConnectionStateConnected,
			wantKstatus: kstatus.InProgressStatus,
		},
		"seen but converging": {
			snap:          bridge.Snapshot{DeviceID: "d", DesiredVersion: 2, DeviceDesiredVersion: 2, Reported: twin.Doc{"a": "y"}, Online: &no, OnlineChanged: now},
			desired:       twin.Doc{"a": "x"},
			wantConnected: v1alpha1.ReasonDisconnected, wantInSync: v1alpha1.ReasonConverging, wantDelta: 1, wantState: v1alpha1.ConnectionStateDisconnected,
			wantKstatus: kstatus.InProgressStatus,
		},
		"in sync": {
			snap:          bridge.Snapshot{DeviceID: "d", DesiredVersion: 2, DeviceDesiredVersion: 2, Reported: twin.Doc{"a": "x", "b": true}},
			desired:       twin.Doc{"a": "x"},
			wantConnected: v1alpha1.ReasonNeverConnected, wantInSync: v1alpha1.ReasonInSync, wantState: v1alpha1.ConnectionStateDisconnected,
			wantKstatus: kstatus.CurrentStatus,
		},
		"invalid desired": {
			snap: bridge.Snapshot{DeviceID: "d"}, invalid: errors.New("spec.desired.x: arrays are not allowed in device twins"),
			wantConnected: v1alpha1.ReasonNeverConnected, wantInSync: v1alpha1.ReasonInvalidDesired, wantState: v1alpha1.ConnectionStateDisconnected,
			wantKstatus: kstatus.FailedStatus,
		},
		"duplicate device id": {
			snap: bridge.Snapshot{DeviceID: "d", Online: &yes}, desired: twin.Doc{}, duplicateOf: "other/d",
			wantConnected: v1alpha1.ReasonDuplicateDeviceID, wantInSync: v1alpha1.ReasonInSync, wantState: v1alpha1.ConnectionStateConnected,
			wantKstatus: kstatus.FailedStatus,
		},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			st := computeStatus(statusInput{twin: tw, snap: tc.snap, desired: tc.desired, invalid: tc.invalid, duplicateOf: tc.duplicateOf, now: now})
			if c := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionConnected); c == nil || c.Reason != tc.wantConnected || c.ObservedGeneration != 4 {
				t.Errorf("Connected = %+v, want reason %s at generation 4", c, tc.wantConnected)
			}
			if c := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionInSync); c == nil || c.Reason != tc.wantInSync {
				t.Errorf("InSync = %+v, want reason %s", c, tc.wantInSync)
			}
			if st.DeltaCount != tc.wantDelta {
				t.Errorf("deltaCount = %d, want %d", st.DeltaCount, tc.wantDelta)
			}
			if st.ConnectionState != tc.wantState {
				t.Errorf("connectionState = %q, want %q", st.ConnectionState, tc.wantState)
			}
			if st.ObservedGeneration != 4 {
				t.Errorf("observedGeneration = %d, want 4", st.ObservedGeneration)
			}
			// What Flux and other kstatus users conclude from this status.
			obj := tw.DeepCopy()
			obj.Status = st
			u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
			if err != nil {
				t.Fatal(err)
			}
			res, err := kstatus.Compute(&unstructured.Unstructured{Object: u})
			if err != nil {
				t.Fatal(err)
			}
			if res.Status != tc.wantKstatus {
				t.Errorf("kstatus = %s (%s), want %s", res.Status, res.Message, tc.wantKstatus)
			}
			if r := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionReady); r == nil || (r.Status == metav1.ConditionTrue) != (tc.wantKstatus == kstatus.CurrentStatus) {
				t.Errorf("Ready = %+v, want True exactly when converged", r)
			}
		})
	}
}

// Recomputing from a persisted status with nothing new must yield the same
// status, so the reconciler writes nothing.
func TestComputeStatusIsStable(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Name: "d", Generation: 2}}
	yes := true
	snap := bridge.Snapshot{DeviceID: "d", DesiredVersion: 1, DeviceDesiredVersion: 1, Reported: twin.Doc{"a": "x"},
		ReportedVersion: 3, Online: &yes, OnlineChanged: now, LastActivity: now}
	first := computeStatus(statusInput{twin: tw, snap: snap, desired: twin.Doc{"a": "x"}, now: now})
	snap.Persisted = first
	snap.Online = nil // presence already persisted
	second := computeStatus(statusInput{twin: tw, snap: snap, desired: twin.Doc{"a": "x"}, now: now.Add(time.Hour)})
	if statusChanged(first, second) {
		t.Fatalf("status changed without input:\n%+v\n%+v", first, second)
	}
}

// Activity alone is written at most once per activityResolution.
func TestLastActivityResolution(t *testing.T) {
	t0 := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Name: "d", Generation: 1}}
	snap := bridge.Snapshot{DeviceID: "d", LastActivity: t0}
	base := computeStatus(statusInput{twin: tw, snap: snap, desired: twin.Doc{}, now: t0})
	if base.LastActivityTime == nil || !base.LastActivityTime.Time.Equal(t0) {
		t.Fatalf("first activity not recorded: %v", base.LastActivityTime)
	}
	snap.Persisted = base
	snap.LastActivity = t0.Add(30 * time.Second)
	if st := computeStatus(statusInput{twin: tw, snap: snap, desired: twin.Doc{}, now: snap.LastActivity}); statusChanged(base, st) {
		t.Errorf("30s of activity caused a write")
	}
	snap.LastActivity = t0.Add(61 * time.Second)
	if st := computeStatus(statusInput{twin: tw, snap: snap, desired: twin.Doc{}, now: snap.LastActivity}); !statusChanged(base, st) {
		t.Errorf("61s of activity did not cause a write")
	}
}
