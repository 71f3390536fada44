package main

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"k8s.io/client-go/rest"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
)

// Where a report's time goes inside the operator, from the metrics the
// manager already keeps (controller-runtime's registry): the wait in the
// DeviceTwin work queue, the reconcile, and its status write; and inside
// kube-apiserver, from its /metrics: the status PATCH as the API server
// timed it, its wait in API Priority and Fairness, and the etcd update.
// Each is a histogram; a window's share is the difference of two samples.

// histSnap is the cumulative buckets of one histogram (upper bound ->
// count) and its count and sum.
type histSnap struct {
	buckets map[float64]uint64
	count   uint64
	sum     float64
}

// queueSnap samples the histograms that matter, and kube-apiserver's
// garbage-collector counters (apiserverGCCounters).
type queueSnap struct {
	hist map[string]histSnap
	gc   map[string]float64
}

// apiserverGCCounters are read from kube-apiserver's Go runtime metrics:
// how much of its CPU went to its garbage collector, and how much of that
// was mark assist (time taken from the goroutines serving requests).
var apiserverGCCounters = []string{
	"go_cpu_classes_gc_total_cpu_seconds_total",
	"go_cpu_classes_gc_mark_assist_cpu_seconds_total",
	"go_cpu_classes_total_cpu_seconds_total",
	"go_cpu_classes_idle_cpu_seconds_total",
	"go_gc_cycles_total_gc_cycles_total",
	"go_gc_heap_live_bytes",
}

// queueHistograms are the histograms sampled: metric name and the label
// that picks the DeviceTwin controller's series (empty: all series).
var queueHistograms = []struct{ key, metric, label, value string }{
	{"queue wait", "workqueue_queue_duration_seconds", "name", "devicetwin"},
	{"reconcile", "controller_runtime_reconcile_time_seconds", "controller", "devicetwin"},
	{"status write", "kubetwin_bridge_status_write_duration_seconds", "", ""},
	// The operator's own report latency: a report's arrival at the bridge
	// to its acknowledgement (the devices' report -> 204 less the MQTT
	// hops and the device process's own scheduling).
	{"report persisted", "kubetwin_bridge_persist_latency_seconds", "", ""},
	// client-go's own timing of each PATCH (every PATCH of the window is a
	// status write: the operator patches nothing else while devices report).
	{"client PATCH", "rest_client_request_duration_seconds", "verb", "PATCH"},
	{"client rate limiter", "rest_client_rate_limiter_duration_seconds", "verb", "PATCH"},
}

// apiserverHistograms are kube-apiserver's: key, metric and the labels
// that pick the series summed (every other label is free).
var apiserverHistograms = []struct {
	key, metric string
	labels      map[string]string
}{
	{"api PATCH status", "apiserver_request_duration_seconds",
		map[string]string{"verb": "PATCH", "resource": "devicetwins", "subresource": "status"}},
	{"api APF wait", "apiserver_flowcontrol_request_wait_duration_seconds",
		map[string]string{"execute": "true"}},
	{"api etcd update", "etcd_request_duration_seconds",
		map[string]string{"operation": "update", "group": "kubetwin.io", "resource": "devicetwins"}},
}

// sampleQueue samples the operator's histograms and, when restCfg is set,
// kube-apiserver's.
func sampleQueue(restCfg *rest.Config) queueSnap {
	out := queueSnap{hist: map[string]histSnap{}, gc: map[string]float64{}}
	if restCfg != nil {
		if err := sampleAPIServerHistograms(restCfg, out); err != nil {
			progress("ab: kube-apiserver metrics: %v", err)
		}
	}
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
		out.hist[h.key] = s
	}
	return out
}

// sampleAPIServerHistograms adds kube-apiserver's apiserverHistograms to
// out, read from its Prometheus text exposition.
func sampleAPIServerHistograms(restCfg *rest.Config, out queueSnap) error {
	hc, err := rest.HTTPClientFor(restCfg)
	if err != nil {
		return err
	}
	for _, h := range apiserverHistograms {
		out.hist[h.key] = histSnap{buckets: map[float64]uint64{}}
	}
	return eachSample(hc, strings.TrimSuffix(restCfg.Host, "/")+"/metrics", func(name, l string, v float64) {
		if slices.Contains(apiserverGCCounters, name) {
			out.gc[name] = v
			return
		}
		for _, h := range apiserverHistograms {
			suffix, ok := strings.CutPrefix(name, h.metric)
			if !ok || (suffix != "_bucket" && suffix != "_sum" && suffix != "_count") {
				continue
			}
			labels := promLabels(l)
			match := true
			for k, want := range h.labels {
				if labels[k] != want {
					match = false
					break
				}
			}
			if !match {
				continue
			}
			s := out.hist[h.key]
			switch suffix {
			case "_bucket":
				le, err := strconv.ParseFloat(labels["le"], 64)
				if err == nil {
					s.buckets[le] += uint64(v)
				}
			case "_sum":
				s.sum += v
			case "_count":
				s.count += uint64(v)
			}
			out.hist[h.key] = s
		}
	})
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
	// Only "api GC" (N is its cycles): the shares of kube-apiserver's busy
	// CPU that went to its garbage collector and to mark assist.
	GCShare     float64 `json:"gc_share,omitempty"`
	AssistShare float64 `json:"assist_share,omitempty"`
	LiveHeapMiB float64 `json:"live_heap_mib,omitempty"`
}

// histogramKeys are the keys of every sampled histogram, operator first.
func histogramKeys() []string {
	var keys []string
	for _, h := range queueHistograms {
		keys = append(keys, h.key)
	}
	for _, h := range apiserverHistograms {
		keys = append(keys, h.key)
	}
	return keys
}

func queueBetween(a, b queueSnap) map[string]queueTimes {
	out := map[string]queueTimes{}
	if n := b.gc["go_gc_cycles_total_gc_cycles_total"] - a.gc["go_gc_cycles_total_gc_cycles_total"]; n > 0 {
		d := func(k string) float64 { return b.gc[k] - a.gc[k] }
		// Busy CPU: what the runtime counts as total, less idle time.
		busy := d("go_cpu_classes_total_cpu_seconds_total") - d("go_cpu_classes_idle_cpu_seconds_total")
		if busy > 0 {
			out["api GC"] = queueTimes{N: uint64(n),
				GCShare:     d("go_cpu_classes_gc_total_cpu_seconds_total") / busy,
				AssistShare: d("go_cpu_classes_gc_mark_assist_cpu_seconds_total") / busy,
				LiveHeapMiB: b.gc["go_gc_heap_live_bytes"] / (1 << 20)}
		}
	}
	for _, key := range histogramKeys() {
		x, y := a.hist[key], b.hist[key]
		n := y.count - x.count
		if n == 0 {
			continue
		}
		t := queueTimes{N: n, MeanMs: 1000 * (y.sum - x.sum) / float64(n)}
		t.P50Ms = 1000 * bucketQuantile(x, y, n, 0.50)
		t.P99Ms = 1000 * bucketQuantile(x, y, n, 0.99)
		out[key] = t
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
	for _, key := range histogramKeys() {
		t, ok := m[key]
		if !ok {
			continue
		}
		if s != "" {
			s += "; "
		}
		s += fmt.Sprintf("%s mean %.1f ms, p50 <= %.3g ms, p99 <= %.3g ms (n %d)", key, t.MeanMs, t.P50Ms, t.P99Ms, t.N)
	}
	if t, ok := m["api GC"]; ok {
		s += fmt.Sprintf("; kube-apiserver GC: %d cycles, %.0f%% of its busy CPU (mark assist %.0f%%), live heap %.0f MiB",
			t.N, 100*t.GCShare, 100*t.AssistShare, t.LiveHeapMiB)
	}
	return s
}
