package main

import (
	"cmp"
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

// This file runs in the device process (see child.go): the simulated
// devices, their reports and what they saw.

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

	// onDesired tells the parent about desired changes with a setpoint.
	desiredOut func(desiredEvent)
}

// onDesired is the device's OnDesired callback.
func (d *simDevice) onDesired(u device.Update) {
	at := time.Now()
	v, ok := u.Desired["setpoint"].(json.Number)
	if !ok || d.desiredOut == nil {
		return
	}
	sp, err := v.Int64()
	if err != nil {
		return
	}
	d.desiredOut(desiredEvent{Device: d.name, Setpoint: sp, Version: u.Version, At: at.UnixNano()})
}

// connectDevices connects n devices to the broker, parallel at a time.
func connectDevices(ctx context.Context, cc childConfig, devLog *lineLog, desiredOut func(desiredEvent)) ([]*simDevice, error) {
	progress("devices: connecting %d devices to %s (%d at a time)", cc.Devices, cc.BrokerURL, cc.ConnectParallel)
	logger := funcr.New(func(prefix, args string) { devLog.Line(prefix + " " + args) }, funcr.Options{})
	devs := make([]*simDevice, cc.Devices)
	for i := range devs {
		name := twinName(cmp.Or(cc.Prefix, "dev-"), i)
		devs[i] = &simDevice{id: name, name: name, desiredOut: desiredOut}
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
				progress("  devices: %d/%d connected", done.Load(), cc.Devices)
			case <-stopTicker:
				return
			}
		}
	}()
	for w := 0; w < max(cc.ConnectParallel, 1); w++ {
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
						BrokerURL: cc.BrokerURL, DeviceID: d.id, OnDesired: d.onDesired,
						Logger: logger, RequestTimeout: cc.RequestTimeout,
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
		progress("devices: did not close within 15s; leaving them")
	}
}

// runReports is phase (b) on the device side. started is called with the
// phase's start time before the first report; the measured window is
// [t0+warmup, t0+warmup+duration].
func runReports(ctx context.Context, devs []*simDevice, cc childConfig, started func(time.Time)) reportSummary {
	rctx, rcancel := context.WithCancel(ctx)
	defer rcancel()

	t0 := time.Now()
	winStart := t0.Add(cc.Warmup)
	winEnd := winStart.Add(cc.Duration)
	started(t0)
	var sent, skipped, ackedWin, ackedAll atomic.Int64
	var latMu sync.Mutex
	var lats []time.Duration

	report := func(d *simDevice) {
		defer d.outstanding.Add(-1)
		seq := d.seq.Add(1)
		// t is a string: unix nanoseconds (~1.8e18) break the twin rule
		// that integers stay within ±2^52, and the operator would refuse
		// the report with 400.
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
		ackedAll.Add(1)
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
		if cc.Rate == 0 {
			// Closed loop: Inflight reporters per device, each sending the
			// next report as soon as the previous one is answered.
			for k := 0; k < cc.Inflight; k++ {
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
		// Open loop at Rate, with at most Inflight outstanding: a report
		// due while the device has that many outstanding is skipped.
		offerWG.Add(1)
		go func() {
			defer offerWG.Done()
			interval := time.Duration(float64(time.Second) / cc.Rate)
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
				if d.outstanding.Load() < int32(cc.Inflight) {
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

	// No device locks here: with tens of thousands of runnable goroutines,
	// taking 1,000 contended locks one after another can take a minute.
	for end := winEnd; ctx.Err() == nil; {
		left := time.Until(end)
		if left <= 0 {
			break
		}
		time.Sleep(min(left, 5*time.Second))
		if time.Until(end) > 0 {
			progress("  devices: %d reports acknowledged so far", ackedAll.Load())
		}
	}
	close(stop)
	progress("  devices: offering stopped; %d reports acknowledged in the window; draining outstanding reports", ackedWin.Load())
	offerWG.Wait()
	drained := make(chan struct{})
	go func() { reportWG.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(cc.DrainTimeout):
		progress("  devices: outstanding reports not answered within %s; cancelling them", cc.DrainTimeout)
		rcancel()
		<-drained
	}
	progress("  devices: drained in %.1fs", time.Since(winEnd).Seconds())

	sum := reportSummary{
		Type: msgReportsDone, Sent: sent.Load(), Skipped: skipped.Load(), AckedWin: ackedWin.Load(),
		DrainSec: time.Since(winEnd).Seconds(),
	}
	shown := 0
	for _, d := range devs {
		d.mu.Lock()
		ds := devSummary{Name: d.name, Ver: d.lastVer, Seq: d.lastSeq, T: d.lastT, Errs: d.errs}
		if d.lastErr != nil {
			ds.LastErr = d.lastErr.Error()
		}
		vs := slices.Clone(d.versions)
		d.mu.Unlock()
		slices.Sort(vs)
		for i, v := range vs {
			if v != int64(i+1) {
				ds.VersionGap = fmt.Sprintf("acknowledged versions are not 1..%d: %s", len(vs), abbreviate(vs))
				break
			}
		}
		sum.Errors += ds.Errs
		if ds.Errs > 0 && shown < 10 {
			shown++
			progress("  device %s: %d reports failed, the last with: %s", d.name, ds.Errs, ds.LastErr)
		}
		sum.Devices = append(sum.Devices, ds)
	}
	slices.Sort(lats)
	sum.P50Ms = ms(percentile(lats, 50))
	sum.P99Ms = ms(percentile(lats, 99))
	sum.MaxMs = ms(percentile(lats, 100))
	return sum
}

func abbreviate(v []int64) string {
	if len(v) <= 12 {
		return fmt.Sprint(v)
	}
	return fmt.Sprintf("%v ... %v (%d)", v[:6], v[len(v)-6:], len(v))
}
