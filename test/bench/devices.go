package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/kubetwin/kubetwin/pkg/device"
)

// simDevice is one simulated device and what the benchmark saw of it.
type simDevice struct {
	id   string
	name string // DeviceTwin name in devicesNS
	c    *device.Client

	outstanding atomic.Int32
	seq         atomic.Int64

	mu       sync.Mutex
	acked    int64 // reports answered 204 (whole phase)
	errs     int64
	lastErr  error
	versions []int64 // versions of acknowledged reports, in answer order
	// The acknowledged report with the highest reported version: the last
	// one the operator applied of those acknowledged.
	lastVer int64
	lastSeq int64
	lastT   string

	// Desired phase: the setpoint waited for and where to say it arrived.
	desiredWant atomic.Int64
	desiredCh   chan desiredSeen
}

type desiredSeen struct {
	at      time.Time
	version int64
}

// onDesired is the device's OnDesired callback.
func (d *simDevice) onDesired(u device.Update) {
	want := d.desiredWant.Load()
	if want == 0 {
		return
	}
	v, ok := u.Desired["setpoint"].(json.Number)
	if !ok || v.String() != strconv.FormatInt(want, 10) {
		return
	}
	select {
	case d.desiredCh <- desiredSeen{at: time.Now(), version: u.Version}:
	default:
	}
}

// connectDevices connects cfg.devices devices to the broker, cfg.connectParallel at a time.
func connectDevices(ctx context.Context, brokerURL string, cfg config, devLog *lineLog) ([]*simDevice, error) {
	progress("connecting %d devices to %s (%d at a time)", cfg.devices, brokerURL, cfg.connectParallel)
	logger := funcr.New(func(prefix, args string) { devLog.Line(prefix + " " + args) }, funcr.Options{})
	devs := make([]*simDevice, cfg.devices)
	for i := range devs {
		name := twinName("dev-", i)
		devs[i] = &simDevice{id: name, name: name, desiredCh: make(chan desiredSeen, 1)}
	}
	start := time.Now()
	var next, done atomic.Int64
	var mu sync.Mutex
	var failures []error
	var wg sync.WaitGroup
	stopTicker := make(chan struct{})
	go func() {
		t := time.NewTicker(2 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				progress("  devices: %d/%d connected", done.Load(), cfg.devices)
			case <-stopTicker:
				return
			}
		}
	}()
	for w := 0; w < cfg.connectParallel; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(devs) || ctx.Err() != nil {
					return
				}
				d := devs[i]
				var err error
				for attempt := 1; attempt <= 3; attempt++ {
					cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
					d.c, err = device.Connect(cctx, device.Options{
						BrokerURL: brokerURL, DeviceID: d.id, OnDesired: d.onDesired,
						Logger: logger, RequestTimeout: cfg.requestTimeout,
					})
					cancel()
					if err == nil || ctx.Err() != nil {
						break
					}
					devLog.Line(fmt.Sprintf("connect attempt %d of %s failed: %v", attempt, d.id, err))
				}
				if err != nil {
					mu.Lock()
					failures = append(failures, err)
					mu.Unlock()
					continue
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	close(stopTicker)
	if err := ctx.Err(); err != nil {
		return devs, err
	}
	if len(failures) > 0 {
		return devs, fmt.Errorf("%d devices could not connect; the first: %w", len(failures), failures[0])
	}
	el := time.Since(start)
	progress("  devices: %d connected in %.1fs (%.0f/s)", len(devs), el.Seconds(), float64(len(devs))/el.Seconds())
	return devs, nil
}

// closeDevices closes the connected devices, 100 at a time, for at most 15s.
func closeDevices(devs []*simDevice) {
	if len(devs) == 0 {
		return
	}
	progress("closing the devices")
	sem := make(chan struct{}, 100)
	var wg sync.WaitGroup
	for _, d := range devs {
		if d.c == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			_ = d.c.Close()
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		progress("devices did not close within 15s; leaving them")
	}
}

// runReports is phase (b).
func runReports(ctx context.Context, devs []*simDevice, cfg config, res *results) error {
	mode := fmt.Sprintf("%g reports/s per device (%.0f/s offered)", cfg.rate, cfg.rate*float64(len(devs)))
	if cfg.rate == 0 {
		mode = "as fast as acknowledged"
	}
	progress("reports: %d devices, %s, %d in flight per device; %s warm-up + %s measured",
		len(devs), mode, cfg.inflight, cfg.warmup, cfg.duration)
	res.OfferedPerSec = cfg.rate * float64(len(devs))

	// Reports get their own context: they must be answered (or fail)
	// after the offering stops, within the drain timeout.
	rctx, rcancel := context.WithCancel(ctx)
	defer rcancel()

	t0 := time.Now()
	winStart := t0.Add(cfg.warmup)
	winEnd := winStart.Add(cfg.duration)
	var sent, skipped atomic.Int64
	var ackedWin atomic.Int64
	var latMu sync.Mutex
	var lats []time.Duration

	report := func(d *simDevice) {
		defer d.outstanding.Add(-1)
		seq := d.seq.Add(1)
		ts := strconv.FormatInt(time.Now().UnixNano(), 10)
		start := time.Now()
		if !start.Before(winStart) && start.Before(winEnd) {
			sent.Add(1)
		}
		v, err := d.c.Report(rctx, map[string]any{"seq": seq, "t": ts})
		end := time.Now()
		d.mu.Lock()
		defer d.mu.Unlock()
		if err != nil {
			d.errs++
			d.lastErr = err
			return
		}
		d.acked++
		d.versions = append(d.versions, v)
		if v > d.lastVer {
			d.lastVer, d.lastSeq, d.lastT = v, seq, ts
		}
		if !end.Before(winStart) && !end.After(winEnd) {
			ackedWin.Add(1)
			latMu.Lock()
			lats = append(lats, end.Sub(start))
			latMu.Unlock()
		}
	}

	stop := make(chan struct{})
	var offerWG, reportWG sync.WaitGroup
	for _, d := range devs {
		if cfg.rate == 0 {
			// Closed loop: cfg.inflight reporters, each sending the next
			// report as soon as the previous one is answered.
			for k := 0; k < cfg.inflight; k++ {
				reportWG.Add(1)
				go func() {
					defer reportWG.Done()
					for {
						select {
						case <-stop:
							return
						default:
						}
						d.outstanding.Add(1)
						report(d)
					}
				}()
			}
			continue
		}
		// Open loop at cfg.rate, with at most cfg.inflight outstanding: a
		// report due while the device has that many outstanding is skipped.
		offerWG.Add(1)
		go func() {
			defer offerWG.Done()
			interval := time.Duration(float64(time.Second) / cfg.rate)
			phase := time.NewTimer(time.Duration(rand.Int64N(int64(interval))))
			select {
			case <-phase.C:
			case <-stop:
				phase.Stop()
				return
			}
			tick := time.NewTicker(interval)
			defer tick.Stop()
			for {
				if d.outstanding.Load() < int32(cfg.inflight) {
					d.outstanding.Add(1)
					reportWG.Add(1)
					go func() { defer reportWG.Done(); report(d) }()
				} else if now := time.Now(); !now.Before(winStart) && now.Before(winEnd) {
					skipped.Add(1)
				}
				select {
				case <-tick.C:
				case <-stop:
					return
				}
			}
		}()
	}

	// Progress, and the status-write counter at the window's edges.
	acked := func() (n int64) {
		for _, d := range devs {
			d.mu.Lock()
			n += d.acked
			d.mu.Unlock()
		}
		return n
	}
	var w0, e0, w1, e1 int64
	sleepUntil := func(t time.Time) {
		for {
			left := time.Until(t)
			if left <= 0 || ctx.Err() != nil {
				return
			}
			step := min(left, 5*time.Second)
			time.Sleep(step)
			if time.Until(t) > 0 {
				w, _ := statusWrites()
				progress("  reports: %d acknowledged, %d status writes so far", acked(), w)
			}
		}
	}
	sleepUntil(winStart)
	w0, e0 = statusWrites()
	a0 := acked()
	sleepUntil(winEnd)
	w1, e1 = statusWrites()
	a1 := acked()
	close(stop)
	if err := ctx.Err(); err != nil {
		return err
	}
	progress("  measured window over: %d reports acknowledged, %d status writes; draining outstanding reports", a1-a0, w1-w0)

	offerWG.Wait()
	drained := make(chan struct{})
	go func() { reportWG.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(cfg.drainTimeout):
		progress("  outstanding reports not answered within %s; cancelling them", cfg.drainTimeout)
		rcancel()
		<-drained
	}
	progress("  drained in %.1fs", time.Since(winEnd).Seconds())

	win := cfg.duration.Seconds()
	res.ReportsSent = sent.Load()
	res.ReportsSkipped = skipped.Load()
	res.ReportsAcked = ackedWin.Load()
	res.ReportsPerSec = float64(res.ReportsAcked) / win
	res.StatusWrites = w1 - w0
	res.StatusWriteErrors = e1 - e0
	res.WritesPerSec = float64(res.StatusWrites) / win
	if res.StatusWrites > 0 {
		res.ReportsPerWrite = float64(res.ReportsAcked) / float64(res.StatusWrites)
	}
	if res.Baseline > 0 {
		res.WriteRateVsBaseline = 100 * res.WritesPerSec / res.Baseline
	}
	shown := 0
	for _, d := range devs {
		d.mu.Lock()
		res.ReportErrors += d.errs
		if d.errs > 0 && d.lastErr != nil && shown < 10 {
			shown++
			progress("  device %s: %d reports failed, the last with: %v", d.id, d.errs, d.lastErr)
		}
		d.mu.Unlock()
	}
	slices.Sort(lats)
	res.ReportLatencyP50Ms = ms(percentile(lats, 50))
	res.ReportLatencyP99Ms = ms(percentile(lats, 99))
	res.ReportLatencyMaxMs = ms(percentile(lats, 100))
	return nil
}
