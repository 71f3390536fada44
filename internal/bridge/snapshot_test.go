package bridge

import (
	"testing"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// A snapshot shares the device's persisted status rather than copying it,
// and Persisted keeps the status it is given:
// the reconciler takes one of every twin at each start, and computeStatus
// copies the status before changing it anyway. The device replaces its
// persisted status, never changes it in place, so an earlier snapshot
// keeps the status it was taken with.
func TestSnapshotSharesPersistedStatus(t *testing.T) {
	b, _, tw := newTestBridgeWith(t, Options{})
	tw.Status.DeviceID = "d1"
	tw.Status.ReportedVersion = 3
	tw.Status.Reported = &apiextensionsv1.JSON{Raw: []byte(`{"a":1}`)}
	for _, typ := range []string{"Ready", "InSync", "Connected", "CredentialsReady", "Reconciling", "Stalled"} {
		tw.Status.Conditions = append(tw.Status.Conditions, metav1.Condition{Type: typ, Status: metav1.ConditionTrue, Reason: "R", Message: "m"})
	}
	first, err := b.Snapshot(tw)
	if err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(20, func() {
		if _, err := b.Snapshot(tw); err != nil {
			t.Fatal(err)
		}
	})
	// A copy of this status is 3 allocations (conditions, document).
	if allocs != 0 {
		t.Errorf("Snapshot allocated %.0f times, want none (the persisted status copied?)", allocs)
	}

	st := *first.Persisted.DeepCopy()
	st.ReportedVersion = 4
	st.Conditions[0].Status = metav1.ConditionFalse
	b.Persisted(t.Context(), tw, first, st)
	if first.Persisted.ReportedVersion != 3 || first.Persisted.Conditions[0].Status != metav1.ConditionTrue {
		t.Errorf("a persisted status changed the snapshot taken before it: %+v", first.Persisted)
	}
	next, err := b.Snapshot(tw)
	if err != nil {
		t.Fatal(err)
	}
	if next.Persisted.ReportedVersion != 4 || next.Persisted.Conditions[0].Status != metav1.ConditionFalse {
		t.Errorf("the next snapshot has %+v, want the persisted status", next.Persisted)
	}
	// Persisted keeps the status it is given (the reconciler's, built for
	// it) rather than a copy.
	if &next.Persisted.Conditions[0] != &st.Conditions[0] {
		t.Error("Persisted copied the status it was given")
	}
}
