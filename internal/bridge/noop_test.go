package bridge

import (
	"testing"
)

// A reconcile that changes nothing, the usual one, costs the bridge's
// snapshot and Persisted no allocation: with no message to answer, no
// deadline is set up.
func TestNoOpReconcileAllocatesNothing(t *testing.T) {
	b, _, tw := newTestBridgeWith(t, Options{IdleStateTTL: KeepIdleState})
	allocs := testing.AllocsPerRun(20, func() {
		s, err := b.Snapshot(tw)
		if err != nil {
			t.Fatal(err)
		}
		b.Persisted(t.Context(), tw, s, s.Persisted)
	})
	if allocs != 0 {
		t.Errorf("Snapshot and Persisted of no message allocated %.0f times, want none", allocs)
	}
}
