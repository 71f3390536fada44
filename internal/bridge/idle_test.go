package bridge

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

const testTTL = 5 * time.Minute

// fakeClock is a settable Options.Now.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func newIdleBridge(t *testing.T, ttl time.Duration) (*Bridge, *fakeBus, *v1alpha1.DeviceTwin, *fakeClock) {
	t.Helper()
	clock := &fakeClock{now: time.Date(2026, 1, 2, 3, 4, 5, 600, time.UTC)}
	b, fb, tw := newTestBridgeWith(t, Options{IdleStateTTL: ttl, Now: clock.Now})
	return b, fb, tw, clock
}

// settle does what the reconciler does, with everything the status holds,
// and has the cache catch up with the write (tw is what Resolve returns).
func settle(t testing.TB, b *Bridge, tw *v1alpha1.DeviceTwin) {
	t.Helper()
	s, err := b.Snapshot(tw)
	if err != nil {
		t.Fatal(err)
	}
	st := *s.Persisted.DeepCopy()
	st.DeviceID = s.DeviceID
	st.Reported, st.ReportedVersion = RawJSON(s.Reported), s.ReportedVersion
	st.PublishedDesired, st.DesiredVersion, st.DeviceDesiredVersion = RawJSON(s.Published), s.DesiredVersion, s.DeviceDesiredVersion
	st.Metadata = &v1alpha1.TwinMetadata{Desired: RawJSON(s.DesiredMeta), Reported: RawJSON(s.ReportedMeta)}
	if s.Online != nil {
		st.ConnectionState = v1alpha1.ConnectionStateDisconnected
		if *s.Online {
			st.ConnectionState = v1alpha1.ConnectionStateConnected
		}
		at := metav1.NewTime(s.OnlineChanged.Truncate(time.Second))
		st.ConnectionStateUpdatedTime = &at
	}
	if !s.LastActivity.IsZero() {
		la := metav1.NewTime(s.LastActivity.Truncate(time.Second))
		st.LastActivityTime = &la
	}
	b.Persisted(context.Background(), tw, s, st)
	tw.Status = *st.DeepCopy()
}

func get(b *Bridge, rid string) {
	b.Handle(bus.Message{Inbound: protocol.Inbound{DeviceID: "d1", Kind: protocol.KindGet, RequestID: rid}, Received: time.Now(), Ack: func() {}})
}

// A twin's state dropped while idle comes back from the cached status with
// the same answers for its device: resends of its last reports are
// answered with the versions they got (not applied again), GETs see the
// same documents, the retained desired document is not published again,
// and the next report gets the next version. The run that drops and the
// run that keeps the state publish exactly the same messages.
func TestIdleStateDroppedDeviceSeesSameAnswers(t *testing.T) {
	run := func(t *testing.T, drop bool) (map[string][][]byte, Snapshot) {
		ttl := testTTL
		if !drop {
			ttl = KeepIdleState
		}
		b, fb, tw, clock := newIdleBridge(t, ttl)
		ctx := context.Background()
		acked := 0
		desired := twin.Doc{"interval": 30}
		if sent, err := b.PublishDesired(ctx, tw, desired); err != nil || !sent {
			t.Fatalf("first desired: sent %v, %v", sent, err)
		}
		report(b, "r1", `{"temp":30}`, &acked)
		report(b, "r2", `{"temp":31,"fw":"1.2"}`, &acked)
		settle(t, b, tw)
		get(b, "g1")
		settle(t, b, tw) // the GET's desired acknowledgement and activity

		inMemory, dropped, reloaded := testutil.ToFloat64(twinsInMemory), testutil.ToFloat64(idleStatesDropped), testutil.ToFloat64(idleStatesReloaded)
		clock.Add(testTTL - time.Second)
		if n := b.dropIdle(ctx, clock.Now()); n != 0 {
			t.Fatalf("dropped %d states before the TTL", n)
		}
		clock.Add(2 * time.Second)
		want := 0
		if drop {
			want = 1
		}
		if n := b.dropIdle(ctx, clock.Now()); n != want {
			t.Fatalf("dropped %d idle states, want %d", n, want)
		}
		if got := testutil.ToFloat64(twinsInMemory) - inMemory; got != -float64(want) {
			t.Fatalf("twins in memory changed by %v, want %d", got, -want)
		}
		if got := testutil.ToFloat64(idleStatesDropped) - dropped; got != float64(want) {
			t.Fatalf("drops counted %v, want %d", got, want)
		}

		report(b, "r2", `{"temp":31,"fw":"1.2"}`, &acked) // resend of the last report
		report(b, "r1", `{"temp":30}`, &acked)            // and of the one before
		if sent, err := b.PublishDesired(ctx, tw, desired); err != nil || sent {
			t.Fatalf("unchanged desired after reload: sent %v, %v", sent, err)
		}
		get(b, "g2")
		if s, _ := b.Snapshot(tw); s.ReportedVersion != 2 || s.Pending != 0 {
			t.Fatalf("resends changed the state: version %d, %d pending", s.ReportedVersion, s.Pending)
		}
		settle(t, b, tw)
		if got := testutil.ToFloat64(idleStatesReloaded) - reloaded; got != float64(want) {
			t.Fatalf("reloads counted %v, want %d", got, want)
		}
		report(b, "r3", `{"temp":32}`, &acked)
		settle(t, b, tw)
		if acked != 5 {
			t.Fatalf("acked %d reports, want 5", acked)
		}
		s, err := b.Snapshot(tw)
		if err != nil {
			t.Fatal(err)
		}
		fb.mu.Lock()
		defer fb.mu.Unlock()
		return maps.Clone(fb.sent), s
	}
	kept, keptSnap := run(t, false)
	dropped, droppedSnap := run(t, true)
	for _, topic := range slices.Sorted(maps.Keys(kept)) {
		if !slices.EqualFunc(kept[topic], dropped[topic], bytes.Equal) {
			t.Errorf("%s: kept state published %q, dropped state %q", topic, kept[topic], dropped[topic])
		}
	}
	if len(kept) != len(dropped) {
		t.Errorf("kept state published on %d topics, dropped state on %d", len(kept), len(dropped))
	}
	if r := lastResponse(t, &fakeBus{sent: dropped}, "r3"); r.Version != 3 {
		t.Errorf("report after reload answered %+v, want version 3", r)
	}
	for name, pair := range map[string][2]twin.Doc{
		"reported": {keptSnap.Reported, droppedSnap.Reported}, "reported $metadata": {keptSnap.ReportedMeta, droppedSnap.ReportedMeta},
		"published": {keptSnap.Published, droppedSnap.Published}, "desired $metadata": {keptSnap.DesiredMeta, droppedSnap.DesiredMeta},
	} {
		if a, b := string(twin.Encode(pair[0])), string(twin.Encode(pair[1])); a != b {
			t.Errorf("%s: kept %s, dropped and reloaded %s", name, a, b)
		}
	}
	if keptSnap.ReportedVersion != droppedSnap.ReportedVersion || keptSnap.DesiredVersion != droppedSnap.DesiredVersion ||
		keptSnap.DeviceDesiredVersion != droppedSnap.DeviceDesiredVersion {
		t.Errorf("versions: kept %d/%d/%d, dropped %d/%d/%d", keptSnap.ReportedVersion, keptSnap.DesiredVersion, keptSnap.DeviceDesiredVersion,
			droppedSnap.ReportedVersion, droppedSnap.DesiredVersion, droppedSnap.DeviceDesiredVersion)
	}
}

// State that holds anything the cached status does not, or that is about
// to change, stays in memory.
func TestIdleStateKeptWhileBusy(t *testing.T) {
	tests := map[string]func(t *testing.T, b *Bridge, tw *v1alpha1.DeviceTwin){
		"report waiting to be stored": func(_ *testing.T, b *Bridge, _ *v1alpha1.DeviceTwin) {
			acked := 0
			report(b, "r9", `{"late":1}`, &acked)
		},
		"status write in flight": func(t *testing.T, b *Bridge, tw *v1alpha1.DeviceTwin) {
			if _, err := b.Snapshot(tw); err != nil {
				t.Fatal(err)
			}
		},
		"device connected": func(t *testing.T, b *Bridge, tw *v1alpha1.DeviceTwin) {
			b.Presence("d1", true, time.Now())
			settle(t, b, tw)
		},
		"connected before the operator started": func(t *testing.T, b *Bridge, tw *v1alpha1.DeviceTwin) {
			tw.Status.ConnectionState = v1alpha1.ConnectionStateConnected
			b.Forget(types.NamespacedName{Namespace: "ns", Name: "d1"})
			settle(t, b, tw)
		},
		"cache behind the last write": func(t *testing.T, b *Bridge, tw *v1alpha1.DeviceTwin) {
			acked := 0
			report(b, "r9", `{"late":1}`, &acked)
			cached := *tw.Status.DeepCopy()
			settle(t, b, tw)
			tw.Status = cached
		},
	}
	for name, busy := range tests {
		t.Run(name, func(t *testing.T) {
			b, _, tw, clock := newIdleBridge(t, testTTL)
			acked := 0
			report(b, "r1", `{"temp":30}`, &acked)
			settle(t, b, tw)
			busy(t, b, tw)
			clock.Add(2 * testTTL)
			if n := b.dropIdle(context.Background(), clock.Now()); n != 0 {
				t.Fatalf("dropped %d states", n)
			}
		})
	}
}

// Activity (a GET) the status does not show yet is stored before the
// state goes: the sweep wakes the reconciler instead of dropping it.
func TestIdleStateWithUnsavedActivityWoken(t *testing.T) {
	b, _, tw, clock := newIdleBridge(t, testTTL)
	acked := 0
	report(b, "r1", `{"temp":30}`, &acked)
	settle(t, b, tw)
	clock.Add(10 * time.Second)
	get(b, "g1")
	clock.Add(2 * testTTL)
	if n := b.dropIdle(context.Background(), clock.Now()); n != 0 {
		t.Fatalf("dropped %d states with unsaved activity", n)
	}
	b.wakes.mu.Lock()
	_, woken := b.wakes.early[types.NamespacedName{Namespace: "ns", Name: "d1"}]
	b.wakes.mu.Unlock()
	if !woken {
		t.Fatal("twin with unsaved activity not woken")
	}
	// A reconcile that does not store it yet (it is not due) and requeues
	// itself: later sweeps do not wake the twin again.
	s, err := b.Snapshot(tw)
	if err != nil {
		t.Fatal(err)
	}
	b.Persisted(context.Background(), tw, s, s.Persisted)
	b.wakes.mu.Lock()
	clear(b.wakes.early)
	b.wakes.mu.Unlock()
	clock.Add(2 * testTTL)
	if n := b.dropIdle(context.Background(), clock.Now()); n != 0 {
		t.Fatalf("dropped %d states with unsaved activity", n)
	}
	if len(b.wakes.early) != 0 {
		t.Fatal("twin woken again for the same activity")
	}
	settle(t, b, tw)
	if tw.Status.LastActivityTime == nil || !tw.Status.LastActivityTime.Time.Equal(clock.Now().Add(-4*testTTL).Truncate(time.Second)) {
		t.Fatalf("lastActivityTime %v, want the GET's time", tw.Status.LastActivityTime)
	}
	clock.Add(2 * testTTL)
	if n := b.dropIdle(context.Background(), clock.Now()); n != 1 {
		t.Fatalf("dropped %d states once the activity was stored, want 1", n)
	}
}

// A status older than the state that was dropped is not loaded: the
// device gets an error (and may retry), and nothing changes until the
// cache has caught up.
func TestIdleStateReloadRefusesOlderStatus(t *testing.T) {
	b, fb, tw, clock := newIdleBridge(t, testTTL)
	acked := 0
	report(b, "r1", `{"temp":30}`, &acked)
	settle(t, b, tw)
	clock.Add(2 * testTTL)
	if n := b.dropIdle(context.Background(), clock.Now()); n != 1 {
		t.Fatalf("dropped %d states, want 1", n)
	}
	current := *tw.Status.DeepCopy()
	tw.Status = v1alpha1.DeviceTwinStatus{DeviceID: "d1"} // an older copy
	report(b, "r2", `{"temp":31}`, &acked)
	r := lastResponse(t, fb, "r2")
	if r.Status != protocol.StatusError || !strings.Contains(r.Error, "cached status (reportedVersion 0, desiredVersion 0, deviceDesiredVersion 0) is older than the state dropped from memory (1, 0, 0)") {
		t.Fatalf("report on an older status answered %+v", r)
	}
	tw.Status = current
	report(b, "r2", `{"temp":31}`, &acked)
	settle(t, b, tw)
	if r := lastResponse(t, fb, "r2"); r.Status != protocol.StatusNoContent || r.Version != 2 {
		t.Fatalf("report once the cache caught up answered %+v, want 204 version 2", r)
	}
}

// A dropped twin keeps the request ids of its last idleRecentRequests
// reports: resends of those are answered with their versions; an older
// one is a new report, as past recentRequests in memory.
func TestIdleStateKeepsLastRequestIDs(t *testing.T) {
	b, fb, tw, clock := newIdleBridge(t, testTTL)
	acked := 0
	const reports = idleRecentRequests + 2
	for i := range reports {
		report(b, fmt.Sprintf("r%d", i), fmt.Sprintf(`{"n":%d}`, i), &acked)
	}
	settle(t, b, tw)
	clock.Add(2 * testTTL)
	if n := b.dropIdle(context.Background(), clock.Now()); n != 1 {
		t.Fatalf("dropped %d states, want 1", n)
	}
	for i := reports - idleRecentRequests; i < reports; i++ {
		rid := fmt.Sprintf("r%d", i)
		report(b, rid, fmt.Sprintf(`{"n":%d}`, i), &acked)
		if r := lastResponse(t, fb, rid); r.Status != protocol.StatusNoContent || r.Version != int64(i+1) {
			t.Fatalf("resend of %s answered %+v, want 204 version %d", rid, r, i+1)
		}
	}
	if s, _ := b.Snapshot(tw); s.ReportedVersion != reports || s.Pending != 0 {
		t.Fatalf("resends changed the state: version %d, %d pending", s.ReportedVersion, s.Pending)
	}
	report(b, "r0", `{"n":0}`, &acked)
	if s, _ := b.Snapshot(tw); s.ReportedVersion != reports+1 {
		t.Fatalf("resend of a report older than the kept ids: version %d, want %d (a new report)", s.ReportedVersion, reports+1)
	}
}

// Forgetting a twin whose state was dropped leaves the gauge as it was
// before the twin was loaded.
func TestIdleStateForgetAfterDrop(t *testing.T) {
	before := testutil.ToFloat64(twinsInMemory)
	b, _, tw, clock := newIdleBridge(t, testTTL)
	acked := 0
	report(b, "r1", `{"temp":30}`, &acked)
	settle(t, b, tw)
	if got := testutil.ToFloat64(twinsInMemory) - before; got != 1 {
		t.Fatalf("twins in memory grew by %v after load, want 1", got)
	}
	clock.Add(2 * testTTL)
	if n := b.dropIdle(context.Background(), clock.Now()); n != 1 {
		t.Fatalf("dropped %d states, want 1", n)
	}
	b.Forget(types.NamespacedName{Namespace: "ns", Name: "d1"})
	if got := testutil.ToFloat64(twinsInMemory) - before; got != 0 {
		t.Fatalf("twins in memory changed by %v after drop and forget, want 0", got)
	}
}

// Once the controller starts the bridge's source, idle state is dropped
// without anyone asking.
func TestIdleStateDroppedOnceSourceStarts(t *testing.T) {
	b, _, tw := newTestBridgeWith(t, Options{IdleStateTTL: time.Millisecond})
	acked := 0
	report(b, "r1", `{"temp":30}`, &acked)
	settle(t, b, tw)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	q := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[reconcile.Request]())
	defer q.ShutDown()
	if err := b.Source().Start(ctx, q); err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	e := b.devices[types.NamespacedName{Namespace: "ns", Name: "d1"}]
	b.mu.Unlock()
	for deadline := time.Now().Add(20 * time.Second); ; {
		e.mu.Lock()
		gone := e.d == nil
		e.mu.Unlock()
		if gone {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("idle state not dropped within 20s of a 1ms TTL")
		}
		time.Sleep(10 * time.Millisecond) // polling with a deadline
	}
}

// The cache holds the status as the API server returns it: times to the
// second. A status the bridge wrote with sub-second times is caught up
// once read back, or no twin's state would ever be dropped.
func TestCaughtUpAfterAPIRoundTrip(t *testing.T) {
	now := metav1.NewTime(time.Date(2026, 12, 6, 15, 4, 5, 678_000_000, time.UTC))
	written := v1alpha1.DeviceTwinStatus{
		DeviceID: "d1", ReportedVersion: 3, DesiredVersion: 2,
		ConnectionState:            v1alpha1.ConnectionStateDisconnected,
		ConnectionStateUpdatedTime: &now, LastActivityTime: &now,
	}
	raw, err := json.Marshal(written)
	if err != nil {
		t.Fatal(err)
	}
	var cached v1alpha1.DeviceTwinStatus
	if err := json.Unmarshal(raw, &cached); err != nil {
		t.Fatal(err)
	}
	if !caughtUp(&cached, &written) {
		t.Fatalf("the status read back (%s) is not caught up with the one written (%s)", cached.LastActivityTime, written.LastActivityTime)
	}
	later := metav1.NewTime(now.Add(time.Second))
	cached.LastActivityTime = &later
	if caughtUp(&cached, &written) {
		t.Fatal("a status a second apart counts as caught up")
	}
}

// A twin this process has heard nothing of, whose reconcile wrote nothing
// (an operator restarting on an unchanged fleet), does not keep its state
// until the TTL: it goes right after that reconcile, so a restart does not
// hold every twin's state at once. Its device is then answered as before.
// A twin whose device is connected keeps its state.
func TestUnseenTwinDroppedAfterReconcile(t *testing.T) {
	inMemory := func(b *Bridge) bool {
		b.mu.Lock()
		e := b.devices[types.NamespacedName{Namespace: "ns", Name: "d1"}]
		b.mu.Unlock()
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.d != nil
	}
	b, fb, tw, _ := newIdleBridge(t, testTTL)
	acked := 0
	report(b, "r1", `{"temp":30}`, &acked)
	settle(t, b, tw) // stores the report: the cached copy is behind until the next reconcile
	if !inMemory(b) {
		t.Fatal("state dropped while the cache did not show the last write")
	}
	settle(t, b, tw) // an operator restart: nothing to write
	if inMemory(b) {
		t.Fatal("an unseen twin's state stays after a reconcile that wrote nothing")
	}
	report(b, "r1", `{"temp":30}`, &acked) // a resend: answered, not applied again
	report(b, "r2", `{"temp":31}`, &acked)
	settle(t, b, tw)
	if tw.Status.ReportedVersion != 2 {
		t.Fatalf("reportedVersion %d after a resend and a new report, want 2", tw.Status.ReportedVersion)
	}
	if r := lastResponse(t, fb, "r1"); r.Status != protocol.StatusNoContent || r.Version != 1 {
		t.Fatalf("resend of r1 after the drop answered %+v, want 204 version 1", r)
	}
	if r := lastResponse(t, fb, "r2"); r.Status != protocol.StatusNoContent || r.Version != 2 {
		t.Fatalf("r2 after the drop answered %+v, want 204 version 2", r)
	}

	b2, _, tw2, _ := newIdleBridge(t, testTTL)
	b2.Presence("d1", true, time.Now())
	settle(t, b2, tw2)
	settle(t, b2, tw2)
	if !inMemory(b2) {
		t.Fatal("a connected device's twin state was dropped")
	}
}
