package bridge

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// fakeBus records what the bridge publishes.
type fakeBus struct {
	mu   sync.Mutex
	sent map[string][][]byte
}

func (f *fakeBus) Start(context.Context) error { return nil }
func (f *fakeBus) Connected() bool             { return true }
func (f *fakeBus) Publish(_ context.Context, topic string, payload []byte, _ bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.sent == nil {
		f.sent = map[string][][]byte{}
	}
	f.sent[topic] = append(f.sent[topic], payload)
	return nil
}

func (f *fakeBus) responses(t *testing.T, id, rid string) []protocol.Response {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []protocol.Response
	for _, p := range f.sent[protocol.ResponseTopic(id, rid)] {
		var r protocol.Response
		if err := json.Unmarshal(p, &r); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func newTestBridge(t *testing.T) (*Bridge, *fakeBus, *v1alpha1.DeviceTwin) {
	return newTestBridgeWith(t, Options{})
}

// newTestBridgeWith returns a bridge with o (Resolve set to one twin, d1)
// on a fakeBus. Wake-ups collect in the bridge until a test starts its
// Source.
func newTestBridgeWith(t *testing.T, o Options) (*Bridge, *fakeBus, *v1alpha1.DeviceTwin) {
	t.Helper()
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "d1"}}
	o.Resolve = func(_ context.Context, id string) (*v1alpha1.DeviceTwin, error) {
		if id != "d1" {
			return nil, deviceid.ErrNotFound
		}
		return tw, nil
	}
	b := New(o)
	fb := &fakeBus{}
	b.SetBus(fb)
	return b, fb, tw
}

func report(b *Bridge, rid, payload string, acked *int) {
	b.Handle(bus.Message{
		Inbound:  protocol.Inbound{DeviceID: "d1", Kind: protocol.KindReported, RequestID: rid},
		Payload:  []byte(payload),
		Received: time.Now(),
		Ack:      func() { *acked++ },
	})
}

// A resend of a report that is still waiting to be stored is found even
// when many newer reports arrived since.
func TestResendOfPendingReportNotReapplied(t *testing.T) {
	b, fb, tw := newTestBridgeWith(t, Options{MaxPendingReports: 2 * recentRequests})
	acked := 0
	report(b, "first", `{"a":1}`, &acked)
	for i := range recentRequests + 10 {
		report(b, fmt.Sprintf("r%d", i), fmt.Sprintf(`{"n":%d}`, i), &acked)
	}
	report(b, "first", `{"a":1}`, &acked) // resend while nothing is persisted
	s, err := b.Snapshot(tw)
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(recentRequests + 11); s.ReportedVersion != want {
		t.Fatalf("reported version %d, want %d: the resend was applied again", s.ReportedVersion, want)
	}
	st := v1alpha1.DeviceTwinStatus{ReportedVersion: s.ReportedVersion}
	coalesced := testutil.ToFloat64(reportsCoalesced)
	b.Persisted(context.Background(), tw, s, st)
	if got := testutil.ToFloat64(reportsCoalesced) - coalesced; got != recentRequests+11 {
		t.Errorf("coalesced counter grew by %v, want %d (all answered by one write)", got, recentRequests+11)
	}
	rs := fb.responses(t, "d1", "first")
	if len(rs) != 2 || rs[0].Version != 1 || rs[1].Version != 1 || rs[0].Status != protocol.StatusNoContent {
		t.Fatalf("responses to the first report and its resend: %+v", rs)
	}
	if acked != recentRequests+12 {
		t.Fatalf("acked %d messages, want %d", acked, recentRequests+12)
	}
}

// A device with too many reports waiting is told to retry later, and
// nothing changes.
func TestTooManyPendingReportsThrottled(t *testing.T) {
	b, fb, tw := newTestBridge(t)
	acked := 0
	const agreed = 256 // --max-pending-reports default
	for i := range agreed {
		report(b, fmt.Sprintf("r%d", i), `{"x":1}`, &acked)
	}
	report(b, "over", `{"y":2}`, &acked)
	rs := fb.responses(t, "d1", "over")
	if len(rs) != 1 || rs[0].Status != protocol.StatusTooMany {
		t.Fatalf("response to the report over the limit: %+v", rs)
	}
	if acked != 1 {
		t.Fatalf("acked %d, want only the refused one", acked)
	}
	s, _ := b.Snapshot(tw)
	if _, ok := s.Reported["y"]; ok || s.ReportedVersion != agreed {
		t.Fatalf("throttled report changed the state: version %d, reported %v", s.ReportedVersion, s.Reported)
	}
}

// The connected-devices gauge follows presence, and forgetting a connected
// device takes it off.
func TestConnectedDevicesGauge(t *testing.T) {
	b, _, tw := newTestBridge(t)
	before := testutil.ToFloat64(connectedDevices)
	b.Presence("d1", true, time.Now())
	b.Presence("d1", true, time.Now()) // no change
	if got := testutil.ToFloat64(connectedDevices) - before; got != 1 {
		t.Fatalf("after connect: %v, want 1", got)
	}
	b.Presence("d1", false, time.Now())
	if got := testutil.ToFloat64(connectedDevices) - before; got != 0 {
		t.Fatalf("after disconnect: %v, want 0", got)
	}
	b.Presence("d1", true, time.Now())
	b.Forget(types.NamespacedName{Namespace: tw.Namespace, Name: tw.Name})
	if got := testutil.ToFloat64(connectedDevices) - before; got != 0 {
		t.Fatalf("after forget: %v, want 0", got)
	}
}
