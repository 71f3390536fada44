package main

import (
	"fmt"
	"math"

	dto "github.com/prometheus/client_model/go"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
)

// Where a report's time goes inside the operator, from the metrics the
// manager already keeps (controller-runtime's registry): the wait in the
// DeviceTwin work queue, the reconcile, and its status write.
// Each is a histogram; a window's share is the difference of two samples.

// histSnap is the cumulative buckets of one histogram (upper bound ->
// count) and its count and sum.
type histSnap struct {
	buckets map[float64]uint64
	count   uint64
	sum     float64
}

// queueSnap samples the histograms that matter.
type queueSnap map[string]histSnap

// queueHistograms are the histograms sampled: metric name and the label
// that picks the DeviceTwin controller's series (empty: all series).
var queueHistograms = []struct{ key, metric, label, value string }{
	{"queue wait", "workqueue_queue_duration_seconds", "name", "devicetwin"},
	{"reconcile", "controller_runtime_reconcile_time_seconds", "controller", "devicetwin"},
	{"status write", "kubetwin_bridge_status_write_duration_seconds", "", ""},
}

func sampleQueue() queueSnap {
	out := queueSnap{}
	mfs, err := ctrlmetrics.Registry.Gather()
	if err != nil {
		return out
	}
	for _, h := range queueHistograms {
		s := histSnap{buckets: map[float64]uint64{}}
		for _, mf := range mfs {
			if mf.GetName() != h.metric {
				continue
			}
			for _, m := range mf.GetMetric() {
				if (h.label != "" && !hasLabel(m, h.label, h.value)) || m.GetHistogram() == nil {
					continue
				}
				hg := m.GetHistogram()
				s.count += hg.GetSampleCount()
				s.sum += hg.GetSampleSum()
				for _, b := range hg.GetBucket() {
					s.buckets[b.GetUpperBound()] += b.GetCumulativeCount()
				}
			}
		}
		out[h.key] = s
	}
	return out
}

func hasLabel(m *dto.Metric, name, value string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue() == value
		}
	}
	return false
}

// queueTimes is one histogram's window: mean and the bucket bounds the
// 50th and 99th percentiles fall in.
type queueTimes struct {
	N      uint64  `json:"n"`
	MeanMs float64 `json:"mean_ms"`
	P50Ms  float64 `json:"p50_le_ms"`
	P99Ms  float64 `json:"p99_le_ms"`
}

func queueBetween(a, b queueSnap) map[string]queueTimes {
	out := map[string]queueTimes{}
	for _, h := range queueHistograms {
		x, y := a[h.key], b[h.key]
		n := y.count - x.count
		if n == 0 {
			continue
		}
		t := queueTimes{N: n, MeanMs: 1000 * (y.sum - x.sum) / float64(n)}
		t.P50Ms = 1000 * bucketQuantile(x, y, n, 0.50)
		t.P99Ms = 1000 * bucketQuantile(x, y, n, 0.99)
		out[h.key] = t
	}
	return out
}

// bucketQuantile is the upper bound of the first bucket holding the q
// quantile of the window (+Inf when past the last bound).
func bucketQuantile(x, y histSnap, n uint64, q float64) float64 {
	want := uint64(math.Ceil(q * float64(n)))
	best := math.Inf(1)
	for le, c := range y.buckets {
		if c-x.buckets[le] >= want && le < best {
			best = le
		}
	}
	return best
}

func queueString(m map[string]queueTimes) string {
	s := ""
	for _, h := range queueHistograms {
		t, ok := m[h.key]
		if !ok {
			continue
		}
		if s != "" {
			s += "; "
		}
		s += fmt.Sprintf("%s mean %.1f ms, p50 <= %.3g ms, p99 <= %.3g ms (n %d)", h.key, t.MeanMs, t.P50Ms, t.P99Ms, t.N)
	}
	return s
}
