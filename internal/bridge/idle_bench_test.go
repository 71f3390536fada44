package bridge

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// BenchmarkIdleStateHeap measures the bridge's heap per twin, beyond the
// cached twins themselves (the difference in heap with and without the
// bridge), once every twin was reconciled (and, with
// "reported", once its device sent 3 reports), then after the idle states
// are dropped. Statuses are like bench-scale's (test/bench queryTwinDocs):
// reported telemetry, firmware and connectivity with $metadata, a desired
// interval, conditions; they are JSON round-tripped, as the cache decodes
// them.
func BenchmarkIdleStateHeap(b *testing.B) {
	for _, reports := range []int{0, 3} {
		b.Run(fmt.Sprintf("reports=%d", reports), func(b *testing.B) {
			for range b.N {
				loaded, dropped := idleStateHeap(b, 10000, reports)
				b.ReportMetric(loaded, "B/twin-loaded")
				b.ReportMetric(dropped, "B/twin-dropped")
			}
		})
	}
}

func idleStateHeap(tb testing.TB, n, reports int) (loaded, dropped float64) {
	twins := make(map[string]*v1alpha1.DeviceTwin, n)
	clock := &fakeClock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	var b *Bridge
	newBridge := func() {
		b = New(Options{Now: clock.Now, IdleStateTTL: time.Minute, Resolve: func(_ context.Context, id string) (*v1alpha1.DeviceTwin, error) {
			return twins[id], nil
		}})
		b.SetBus(discardBus{})
	}
	desired := twin.Doc{"telemetry": twin.Doc{"interval": json.Number("30")}}
	device := func(i, from, to int) {
		id := fmt.Sprintf("dev-%06d", i)
		for r := from; r < to; r++ {
			b.Handle(bus.Message{
				Inbound: protocol.Inbound{DeviceID: id, Kind: protocol.KindReported, RequestID: fmt.Sprintf("%d", r)},
				Payload: fmt.Appendf(nil, `{"telemetry":{"temperature":%d.5,"humidity":%d},"firmware":{"version":"1.%d.%d"},"connectivity":{"type":"wifi"}}`,
					18+(i+r)%70, 20+i%60, i%5, r%10),
				Received: clock.Now(), Ack: func() {},
			})
		}
	}
	reconcile := func(tw *v1alpha1.DeviceTwin) {
		if _, err := b.PublishDesired(context.Background(), tw, desired); err != nil {
			tb.Fatal(err)
		}
		settle(tb, b, tw)
		now := metav1.NewTime(clock.Now())
		for _, c := range []string{v1alpha1.ConditionConnected, v1alpha1.ConditionInSync, v1alpha1.ConditionReady, v1alpha1.ConditionReconciling, v1alpha1.ConditionStalled} {
			tw.Status.Conditions = append(tw.Status.Conditions, metav1.Condition{Type: c, Status: metav1.ConditionFalse, Reason: "NeverConnected",
				Message: "device has not connected yet", ObservedGeneration: 1, LastTransitionTime: now})
		}
		raw, err := json.Marshal(tw)
		if err != nil {
			tb.Fatal(err)
		}
		*tw = v1alpha1.DeviceTwin{}
		if err := json.Unmarshal(raw, tw); err != nil {
			tb.Fatal(err)
		}
	}
	// The fleet as the cache holds it after a first life of the operator.
	newBridge()
	for i := range n {
		tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "fleet", Name: fmt.Sprintf("dev-%06d", i), Generation: 1}}
		twins[tw.Name] = tw
		device(i, 0, 2)
		reconcile(tw)
	}
	b = nil

	// A restarted operator reconciles every twin; some devices report.
	newBridge()
	for i := range n {
		tw := twins[fmt.Sprintf("dev-%06d", i)]
		device(i, 2, 2+reports)
		if _, err := b.PublishDesired(context.Background(), tw, desired); err != nil {
			tb.Fatal(err)
		}
		settle(tb, b, tw)
	}
	withLoaded := heapInUse()
	clock.Add(2 * time.Minute)
	if got := b.dropIdle(context.Background(), clock.Now()); got != n {
		tb.Fatalf("dropped %d idle states, want %d", got, n)
	}
	withDropped := heapInUse()
	runtime.KeepAlive(b)
	b = nil
	without := heapInUse() // the twins stay: only the bridge goes
	runtime.KeepAlive(twins)
	return float64(withLoaded-without) / float64(n), float64(withDropped-without) / float64(n)
}

// discardBus publishes nowhere.
type discardBus struct{}

func (discardBus) Start(context.Context) error                         { return nil }
func (discardBus) Connected() bool                                     { return true }
func (discardBus) Publish(context.Context, string, []byte, bool) error { return nil }

func heapInUse() int64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}
