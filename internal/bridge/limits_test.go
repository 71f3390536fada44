package bridge

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
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

// persist has the bridge believe everything in t's working state is
// stored, as the reconciler does after a successful status write.
func persist(t *testing.T, b *Bridge, tw *v1alpha1.DeviceTwin) Snapshot {
	t.Helper()
	s, err := b.Snapshot(tw)
	if err != nil {
		t.Fatal(err)
	}
	b.Persisted(context.Background(), tw, s, v1alpha1.DeviceTwinStatus{
		ReportedVersion: s.ReportedVersion, Reported: RawJSON(s.Reported),
		DesiredVersion: s.DesiredVersion, DeviceDesiredVersion: s.DeviceDesiredVersion,
	})
	return s
}

func lastResponse(t *testing.T, fb *fakeBus, rid string) protocol.Response {
	t.Helper()
	rs := fb.responses(t, "d1", rid)
	if len(rs) == 0 {
		t.Fatalf("no response to %s", rid)
	}
	return rs[len(rs)-1]
}

// A request id used again for another payload is a new report: applied,
// stored and answered with a new version. Only the same rid with the same
// payload is a resend, answered with the first copy's version and not
// applied again.
func TestReusedRequestIDNewPayloadApplied(t *testing.T) {
	for _, persistedBetween := range []bool{true, false} {
		t.Run(fmt.Sprintf("persisted between: %v", persistedBetween), func(t *testing.T) {
			b, fb, tw := newTestBridge(t)
			acked := 0
			report(b, "r1", `{"temp":30}`, &acked)
			if persistedBetween {
				persist(t, b, tw)
			}
			report(b, "r1", `{"temp":35}`, &acked)
			s := persist(t, b, tw)
			if s.ReportedVersion != 2 || fmt.Sprint(s.Reported["temp"]) != "35" {
				t.Fatalf("after reusing r1: version %d, reported %v; want version 2 and temp 35", s.ReportedVersion, s.Reported)
			}
			if r := lastResponse(t, fb, "r1"); r.Status != protocol.StatusNoContent || r.Version != 2 {
				t.Fatalf("response to the second report on r1: %+v", r)
			}

			// The exact resend of the last one: same answer, no new write.
			report(b, "r1", `{"temp":35}`, &acked)
			if r := lastResponse(t, fb, "r1"); r.Status != protocol.StatusNoContent || r.Version != 2 {
				t.Fatalf("response to the resend: %+v", r)
			}
			s, _ = b.Snapshot(tw)
			if s.ReportedVersion != 2 || s.Pending != 0 {
				t.Fatalf("resend changed the state: version %d, %d pending", s.ReportedVersion, s.Pending)
			}
			if acked != 3 {
				t.Fatalf("acked %d messages, want 3", acked)
			}
		})
	}
}

// nulls returns a reported patch of n deletions of keys that do not exist:
// free by the twin rules, but 16n+1 bytes of payload.
func nulls(n int) string {
	parts := make([]string, n)
	for i := range parts {
		parts[i] = fmt.Sprintf(`"k%07d":null`, i)
	}
	return "{" + strings.Join(parts, ",") + "}"
}

// A reported patch over MaxReportedPatchBytes is refused before it is
// decoded, with a message naming its size and the limit, and counted.
func TestReportedPatchTooLarge(t *testing.T) {
	b, fb, tw := newTestBridge(t)
	acked := 0
	payload := nulls(MaxReportedPatchBytes/16 + 1)
	before := testutil.ToFloat64(reportsTooLarge)
	report(b, "big", payload, &acked)
	r := lastResponse(t, fb, "big")
	want := fmt.Sprintf("reported: patch is %d bytes, more than the %d allowed", len(payload), MaxReportedPatchBytes)
	if r.Status != protocol.StatusBadRequest || r.Error != want {
		t.Fatalf("response: %+v, want 400 %q", r, want)
	}
	if got := testutil.ToFloat64(reportsTooLarge) - before; got != 1 {
		t.Errorf("reports_too_large_total grew by %v, want 1", got)
	}
	if s, _ := b.Snapshot(tw); s.ReportedVersion != 0 || acked != 1 {
		t.Fatalf("refused patch changed the state (version %d) or was not acked (%d)", s.ReportedVersion, acked)
	}
	// The section rule counts too.
	report(b, "section", `{"s":"`+strings.Repeat("x", 4096)+`","t":"`+strings.Repeat("x", 4096)+`"}`, &acked)
	for i := range 7 { // the 7th takes reported over 32 KB
		report(b, fmt.Sprintf("s%d", i), fmt.Sprintf(`{"a%d":"%s"}`, i, strings.Repeat("x", 4000)), &acked)
	}
	if got := testutil.ToFloat64(reportsTooLarge) - before; got != 2 {
		t.Errorf("reports_too_large_total grew by %v, want 2 (the patch, then the section)", got)
	}
}

// Reports waiting to be stored are bounded in bytes as well as in count;
// beyond either the device gets 429 and nothing changes. The gauges follow.
func TestPendingReportBytesBounded(t *testing.T) {
	b, fb, tw := newTestBridge(t)
	acked := 0
	payload := nulls(3750) // 60 KB of payload each
	countBefore, bytesBefore := testutil.ToFloat64(pendingMessages), testutil.ToFloat64(pendingBytes)
	n := DefaultMaxPendingReportBytes / len(payload)
	for i := range n {
		report(b, fmt.Sprintf("r%d", i), payload, &acked)
	}
	report(b, "over", payload, &acked)
	if r := lastResponse(t, fb, "over"); r.Status != protocol.StatusTooMany {
		t.Fatalf("report over the byte bound: %+v, want 429", r)
	}
	if got := testutil.ToFloat64(pendingBytes) - bytesBefore; got != float64(n*len(payload)) {
		t.Errorf("pending bytes gauge grew by %v, want %d", got, n*len(payload))
	}
	if got := testutil.ToFloat64(pendingMessages) - countBefore; got != float64(n) {
		t.Errorf("pending gauge grew by %v, want %d", got, n)
	}
	s := persist(t, b, tw)
	if s.ReportedVersion != int64(n) || acked != n+1 {
		t.Fatalf("version %d, acked %d; want %d, %d", s.ReportedVersion, acked, n, n+1)
	}
	if testutil.ToFloat64(pendingBytes) != bytesBefore || testutil.ToFloat64(pendingMessages) != countBefore {
		t.Errorf("gauges did not come back down after the write")
	}
	// A smaller bound from Options applies.
	b, fb, _ = newTestBridgeWith(t, Options{MaxPendingReports: 3})
	for i := range 4 {
		report(b, fmt.Sprintf("r%d", i), `{"x":1}`, &acked)
	}
	if r := lastResponse(t, fb, "r3"); r.Status != protocol.StatusTooMany || !strings.Contains(r.Error, "3 messages") {
		t.Fatalf("4th report with MaxPendingReports 3: %+v", r)
	}
}

func presence(b *Bridge, online bool, acked *atomic.Int64) {
	b.Handle(bus.Message{
		Inbound:  protocol.Inbound{DeviceID: "d1", Kind: protocol.KindPresence},
		Payload:  fmt.Appendf(nil, `{"online":%v}`, online),
		Received: time.Now(),
		Ack:      func() { acked.Add(1) },
	})
}

// Alternating presence messages cannot grow the pending list: a presence
// message supersedes the earlier one not yet being stored, which is
// acknowledged at once; the one a status write holds waits for that write.
func TestPresenceDoesNotGrowPending(t *testing.T) {
	b, _, tw := newTestBridge(t)
	var acked atomic.Int64
	for i := range 6144 {
		presence(b, i%2 == 0, &acked)
	}
	s, _ := b.Snapshot(tw) // a write starts: it holds one presence message
	if s.Pending != 1 || acked.Load() != 6143 {
		t.Fatalf("after 6144 presence messages: %d pending, %d acked; want 1 and 6143", s.Pending, acked.Load())
	}
	for i := range 1000 {
		presence(b, i%2 == 0, &acked)
	}
	if got := acked.Load(); got != 6143+999 {
		t.Fatalf("the message held by the write was acknowledged early, or others were kept: %d acked", got)
	}
	b.Persisted(context.Background(), tw, s, v1alpha1.DeviceTwinStatus{})
	if got := acked.Load(); got != 6144+999 {
		t.Fatalf("after the write: %d acked, want %d", got, 6144+999)
	}
	s = persist(t, b, tw)
	if s.Pending != 1 || acked.Load() != 7144 || s.Online == nil || *s.Online {
		t.Fatalf("last write: %d pending, %d acked, online %v; want 1, 7144, false", s.Pending, acked.Load(), s.Online)
	}

	// A write that failed (no Persisted) does not let them pile up either.
	for range 10 {
		presence(b, true, &acked)
		presence(b, false, &acked)
		if s, _ = b.Snapshot(tw); s.Pending > 1 {
			t.Fatalf("%d presence messages pending after failed writes", s.Pending)
		}
	}
}

// Presence messages count against the report bound (they hold bytes too).
func TestPresenceCountsAgainstBound(t *testing.T) {
	b, fb, _ := newTestBridgeWith(t, Options{MaxPendingReports: 2})
	var packed atomic.Int64
	acked := 0
	presence(b, true, &packed)
	report(b, "r1", `{"x":1}`, &acked)
	report(b, "r2", `{"x":2}`, &acked)
	if r := lastResponse(t, fb, "r2"); r.Status != protocol.StatusTooMany {
		t.Fatalf("report beyond the bound with a presence message pending: %+v", r)
	}
}

// Desired-version acks supersede each other like presence messages.
func TestDesiredAcksDoNotGrowPending(t *testing.T) {
	b, _, tw := newTestBridge(t)
	ctx := context.Background()
	for v := range 20 {
		if _, err := b.PublishDesired(ctx, tw, twin.Doc{"v": fmt.Sprint(v)}); err != nil {
			t.Fatal(err)
		}
	}
	var acked atomic.Int64
	for v := 1; v <= 20; v++ {
		b.Handle(bus.Message{
			Inbound:  protocol.Inbound{DeviceID: "d1", Kind: protocol.KindAck},
			Payload:  fmt.Appendf(nil, `{"$version":%d}`, v),
			Received: time.Now(),
			Ack:      func() { acked.Add(1) },
		})
	}
	s := persist(t, b, tw)
	if s.Pending != 1 || s.DeviceDesiredVersion != 20 || acked.Load() != 20 {
		t.Fatalf("%d pending, device version %d, %d acked; want 1, 20, 20", s.Pending, s.DeviceDesiredVersion, acked.Load())
	}
}

// Waking the reconciler never blocks the bus, however many twins wait, and
// every woken twin reaches the controller's queue once it starts.
func TestWakeNeverBlocks(t *testing.T) {
	const twins = 5000
	b := New(Options{Resolve: func(_ context.Context, id string) (*v1alpha1.DeviceTwin, error) {
		return &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: id}}, nil
	}})
	b.SetBus(&fakeBus{})
	handle := func(from, to int) {
		for i := from; i < to; i++ {
			b.Handle(bus.Message{
				Inbound: protocol.Inbound{DeviceID: fmt.Sprintf("d%d", i), Kind: protocol.KindReported, RequestID: "r"},
				Payload: []byte(`{"x":1}`), Received: time.Now(), Ack: func() {},
			})
		}
	}
	done := make(chan struct{})
	go func() { handle(0, twins); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("delivering reports of %d twins blocked with no controller reading", twins)
	}
	q := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[reconcile.Request]())
	defer q.ShutDown()
	if err := b.Source().Start(context.Background(), q); err != nil {
		t.Fatal(err)
	}
	handle(twins, twins+10) // after start, straight to the queue
	handle(0, 10)           // already queued: not added again
	if q.Len() != twins+10 {
		t.Fatalf("queue holds %d twins, want %d", q.Len(), twins+10)
	}
	req, _ := q.Get()
	if req.NamespacedName != (types.NamespacedName{Namespace: "ns", Name: req.Name}) {
		t.Fatalf("queued %v", req)
	}
}

// blockingBus never takes a publish until its context ends.
type blockingBus struct{ fakeBus }

func (*blockingBus) Publish(ctx context.Context, _ string, _ []byte, _ bool) error {
	<-ctx.Done()
	return ctx.Err()
}

// A bus that does not take publishes holds a reconciler (Persisted,
// PublishDesired) only up to the bridge's deadline.
func TestRespondBounded(t *testing.T) {
	b, _, tw := newTestBridge(t)
	b.SetBus(&blockingBus{})
	b.respondTimeout = 50 * time.Millisecond
	acked := 0
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		report(b, "r1", `{"x":1}`, &acked)
		s, _ := b.Snapshot(tw)
		b.Persisted(context.Background(), tw, s, v1alpha1.DeviceTwinStatus{ReportedVersion: s.ReportedVersion})
		_, _ = b.PublishDesired(context.Background(), tw, twin.Doc{"a": "b"})
	}()
	select {
	case <-finished:
	case <-time.After(10 * time.Second):
		t.Fatal("Persisted or PublishDesired blocked on a bus that does not take publishes")
	}
	if acked != 1 {
		t.Fatalf("acked %d, want 1", acked)
	}
}
