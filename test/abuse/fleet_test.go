package abuse

import (
	"context"
	"encoding/json"
	"fmt"
	mrand "math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/pkg/device"
)

// fleet is the legitimate devices, each reporting every interval a
// patch {"seq": n} and remembering the last n the operator acknowledged.
type fleet struct {
	devs     []*legit
	interval time.Duration
	stop     chan struct{}
	wg       sync.WaitGroup

	mu      sync.Mutex
	samples []sample
}

type legit struct {
	id        string
	c         *device.Client
	lastAcked atomic.Int64
	// inFlight is when the report being sent started (UnixNano), 0 if none.
	inFlight atomic.Int64
}

// sample is one report of the fleet.
type sample struct {
	at      time.Time // when it was sent
	latency time.Duration
	err     error
	device  string
}

// startFleet connects the devices (over TLS, with their keys) and starts
// them reporting.
func (h *harness) startFleet(t *testing.T, ids []string) *fleet {
	t.Helper()
	f := &fleet{stop: make(chan struct{}), interval: h.interval}
	var mu sync.Mutex
	parallel(t, 16, ids, func(id string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		c, err := device.Connect(ctx, h.deviceOptions(t, id))
		if err != nil {
			return fmt.Errorf("legitimate device %s: %w", id, err)
		}
		mu.Lock()
		f.devs = append(f.devs, &legit{id: id, c: c})
		mu.Unlock()
		return nil
	})
	sort.Slice(f.devs, func(i, j int) bool { return f.devs[i].id < f.devs[j].id })
	for _, d := range f.devs {
		f.wg.Add(1)
		go f.report(d)
	}
	t.Cleanup(func() {
		f.halt()
		for _, d := range f.devs {
			_ = d.c.Close()
		}
	})
	return f
}

// report is one device's loop: a report every interval, from a
// random phase so that the fleet's load is even.
func (f *fleet) report(d *legit) {
	defer f.wg.Done()
	t := time.NewTimer(mrand.N(f.interval))
	defer t.Stop()
	for seq := int64(1); ; seq++ {
		select {
		case <-f.stop:
			return
		case <-t.C:
		}
		t.Reset(f.interval)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		start := time.Now()
		d.inFlight.Store(start.UnixNano())
		_, err := d.c.Report(ctx, map[string]any{"seq": seq})
		lat := time.Since(start)
		d.inFlight.Store(0)
		cancel()
		if err == nil {
			d.lastAcked.Store(seq)
		}
		f.mu.Lock()
		f.samples = append(f.samples, sample{at: start, latency: lat, err: err, device: d.id})
		f.mu.Unlock()
	}
}

// halt stops the reporting and waits for the reports in flight.
func (f *fleet) halt() {
	select {
	case <-f.stop:
	default:
		close(f.stop)
	}
	f.wg.Wait()
}

// since returns the latencies of reports sent since from (reports still
// in flight count with their age so far: a stuck report must not hide),
// and the failed ones.
func (f *fleet) since(from time.Time) (lat []time.Duration, failed []sample) {
	f.mu.Lock()
	for i := len(f.samples) - 1; i >= 0 && !f.samples[i].at.Before(from); i-- {
		s := f.samples[i]
		lat = append(lat, s.latency)
		if s.err != nil {
			failed = append(failed, s)
		}
	}
	f.mu.Unlock()
	now := time.Now()
	for _, d := range f.devs {
		if ns := d.inFlight.Load(); ns != 0 {
			if at := time.Unix(0, ns); !at.Before(from) {
				lat = append(lat, now.Sub(at))
			}
		}
	}
	return lat, failed
}

// slowest describes the n slowest reports sent since from: when, relative
// to from, and how long they took.
func (f *fleet) slowest(from time.Time, n int) string {
	f.mu.Lock()
	var ss []sample
	for i := len(f.samples) - 1; i >= 0 && !f.samples[i].at.Before(from); i-- {
		ss = append(ss, f.samples[i])
	}
	f.mu.Unlock()
	sort.Slice(ss, func(i, j int) bool { return ss[i].latency > ss[j].latency })
	var out []string
	for _, s := range ss[:min(n, len(ss))] {
		out = append(out, fmt.Sprintf("%s sent at +%s took %s", s.device, s.at.Sub(from).Round(100*time.Millisecond), s.latency.Round(time.Millisecond)))
	}
	return strings.Join(out, ", ")
}

// counts returns how many reports were acknowledged and how many failed.
func (f *fleet) counts() (ok, failed int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, s := range f.samples {
		if s.err != nil {
			failed++
		} else {
			ok++
		}
	}
	return ok, failed
}

// checkStored stops the fleet and compares, for every device, the last
// report the operator acknowledged with status.reported in the API server.
// It returns the number of devices whose acknowledged report is not there.
func (h *harness) checkStored(t *testing.T) (lost int) {
	t.Helper()
	h.fleet.halt()
	var list v1alpha1.DeviceTwinList
	if err := k8s.List(context.Background(), &list, client.InNamespace(h.ns)); err != nil {
		t.Fatalf("listing the twins: %v", err)
	}
	byID := map[string]*v1alpha1.DeviceTwin{}
	for i := range list.Items {
		byID[list.Items[i].Name] = &list.Items[i]
	}
	var bad []string
	for _, d := range h.fleet.devs {
		want := d.lastAcked.Load()
		tw := byID[d.id]
		if tw == nil {
			bad = append(bad, d.id+": twin missing")
			continue
		}
		got := reported(tw)["seq"]
		if want == 0 && got == nil {
			continue
		}
		if n, ok := got.(json.Number); !ok || n.String() != fmt.Sprint(want) {
			bad = append(bad, fmt.Sprintf("%s: acknowledged seq %d, stored %v", d.id, want, got))
		}
	}
	if len(bad) > 0 {
		t.Errorf("acknowledged reports are not stored (%d of %d devices): %s", len(bad), len(h.fleet.devs), strings.Join(bad[:min(len(bad), 20)], "; "))
	}
	return len(bad)
}

// monitor samples the operator's memory (VmRSS, often) and, from its
// metrics, heap in use and goroutines.
type monitor struct {
	op   *operatorProc
	stop chan struct{}
	done chan struct{}

	mu     sync.Mutex
	rss    []point
	heap   []point
	gor    []point
	series map[string][]point // the gauges of trackedMetrics
	err    error              // the last scrape error
}

// Metrics the monitor records over time, besides heap and goroutines.
const (
	metricConnections    = "kubetwin_broker_connections"
	metricPendingReports = "kubetwin_bridge_pending_reports"
	metricOfflineSess    = `kubetwin_broker_sessions{state="offline"}`
)

var trackedMetrics = []string{metricConnections, metricPendingReports, metricOfflineSess}

type point struct {
	at time.Time
	v  int64
}

func startMonitor(t *testing.T, op *operatorProc) *monitor {
	m := &monitor{op: op, stop: make(chan struct{}), done: make(chan struct{}), series: map[string][]point{}}
	go m.run()
	t.Cleanup(func() { close(m.stop); <-m.done })
	return m
}

func (m *monitor) run() {
	defer close(m.done)
	tk := time.NewTicker(250 * time.Millisecond)
	defer tk.Stop()
	for n := 0; ; n++ {
		select {
		case <-m.stop:
			return
		case <-tk.C:
		}
		now := time.Now()
		if pid := m.op.pid(); pid != 0 {
			if v, err := rssBytes(pid); err == nil {
				m.mu.Lock()
				m.rss = append(m.rss, point{now, v})
				m.mu.Unlock()
			}
		}
		if n%4 == 0 && m.op.metricsAddr != "" {
			ms, err := scrapeMetrics(m.op.metricsAddr)
			m.mu.Lock()
			m.err = err
			if err == nil {
				for _, name := range trackedMetrics {
					if v, ok := ms[name]; ok {
						m.series[name] = append(m.series[name], point{now, int64(v)})
					}
				}
				m.heap = append(m.heap, point{now, int64(ms["go_memstats_heap_inuse_bytes"])})
				m.gor = append(m.gor, point{now, int64(ms["go_goroutines"])})
			}
			m.mu.Unlock()
		}
	}
}

// max returns the largest value of a series since from.
func (m *monitor) max(series *[]point, from time.Time) int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out int64
	for i := len(*series) - 1; i >= 0 && !(*series)[i].at.Before(from); i-- {
		out = max(out, (*series)[i].v)
	}
	return out
}

// maxOf returns the largest value of a tracked metric since from, and
// whether the operator exposes it.
func (m *monitor) maxOf(name string, from time.Time) (int64, bool) {
	m.mu.Lock()
	s, ok := m.series[name]
	m.mu.Unlock()
	if !ok {
		return 0, false
	}
	return m.max(&s, from), true
}

// last returns the latest value of a series.
func (m *monitor) last(series *[]point) int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(*series) == 0 {
		return 0
	}
	return (*series)[len(*series)-1].v
}

// metric scrapes the operator now and returns a metric's value and
// whether it is exposed.
func (m *monitor) metric(name string) (float64, bool, error) {
	ms, err := scrapeMetrics(m.op.metricsAddr)
	if err != nil {
		return 0, false, err
	}
	v, ok := ms[name]
	return v, ok, nil
}

// window is the span of one attack.
type window struct {
	start time.Time
	log   int64
	rss   int64 // VmRSS as it began
}

func (h *harness) begin() window {
	return window{start: time.Now(), log: h.op.log.mark(), rss: h.mon.last(&h.mon.rss)}
}

// check fails t for every fleet guarantee the window broke.
func (h *harness) check(t *testing.T, w window) {
	t.Helper()
	if h.op.pid() == 0 {
		t.Fatalf("guarantee broken: the operator process died during the attack")
	}
	dur := time.Since(w.start)
	// The Go runtime returns freed memory to the kernel slowly, so VmRSS
	// an earlier attack left behind is that attack's failure, not this one's.
	if rss := h.mon.max(&h.mon.rss, w.start); rss > h.rssBound && w.rss <= h.rssBound {
		t.Errorf("guarantee broken: operator memory: VmRSS reached %s, over the %s bound", mib(rss), mib(h.rssBound))
	} else if rss > h.rssBound {
		t.Logf("operator VmRSS %s is still over the %s bound from an earlier attack", mib(rss), mib(h.rssBound))
	}
	if heap := h.mon.max(&h.mon.heap, w.start); heap > h.heapBound {
		t.Errorf("guarantee broken: operator memory: Go heap in use reached %s, over the %s bound", mib(heap), mib(h.heapBound))
	}
	lat, failed := h.fleet.since(w.start)
	p50, p99 := percentile(lat, 50), percentile(lat, 99)
	t.Logf("legitimate reports during the attack: %d, p50 %s, p99 %s, failed %d; operator VmRSS max %s, heap max %s, goroutines %d",
		len(lat), p50.Round(time.Millisecond), p99.Round(time.Millisecond), len(failed),
		mib(h.mon.max(&h.mon.rss, w.start)), mib(h.mon.max(&h.mon.heap, w.start)), h.mon.last(&h.mon.gor))
	if p99 > reportP99Bound {
		t.Errorf("guarantee broken: legitimate devices slowed down: report p99 %s over the %s bound (%d reports); the slowest: %s",
			p99.Round(time.Millisecond), reportP99Bound, len(lat), h.fleet.slowest(w.start, 5))
	}
	if len(failed) > 0 {
		s := failed[0]
		t.Errorf("guarantee broken: %d legitimate reports failed, e.g. %s: %v", len(failed), s.device, s.err)
	}
	if dur > 2*h.interval && len(lat) == 0 {
		t.Errorf("guarantee broken: no legitimate report was sent during the %s attack", dur.Round(time.Second))
	}
	lines, longest, prefix := h.op.log.since(w.log)
	budget := int64(logBurstBound + logRateBound*dur.Seconds())
	t.Logf("operator log during the attack: %d lines in %s, longest %d bytes", lines, dur.Round(time.Millisecond), longest)
	if lines > budget {
		t.Errorf("guarantee broken: the operator logged %d lines in %s, over the budget of %d (%d/s after %d)", lines, dur.Round(time.Millisecond), budget, logRateBound, logBurstBound)
	}
	if longest > logLineBound {
		t.Errorf("guarantee broken: the operator logged a %d-byte line, over %d: %q...", longest, logLineBound, prefix)
	}
}

// attack runs one attack as a subtest and then checks the fleet's
// guarantees over its span.
func (h *harness) attack(t *testing.T, name string, f func(t *testing.T, h *harness)) bool {
	return t.Run(name, func(t *testing.T) {
		w := h.begin()
		defer h.check(t, w)
		f(t, h)
	})
}
