package main

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"time"

	dto "github.com/prometheus/client_model/go"
	"k8s.io/client-go/rest"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
)

// restartResults are the numbers of bench-scale's restart phase: the
// operator stopped once it had settled and started again on the same,
// unchanged fleet.
type restartResults struct {
	CacheSyncSec float64 `json:"cache_sync_sec"`
	// ReconciledSec is start -> every twin reconciled: the DeviceTwin
	// controller has done at least one reconcile per twin and its queue
	// is empty with no reconcile running.
	ReconciledSec float64 `json:"all_reconciled_sec"`
	Reached       bool    `json:"all_reconciled"`
	Reconciles    float64 `json:"reconciles"`
	ReconcileErrs float64 `json:"reconcile_errors"`
	// PerSec is Reconciles over the time from the cache sync to the last.
	PerSec float64 `json:"reconciles_per_sec"`
	// MeanMs is the mean duration of one reconcile (controller-runtime's
	// reconcile_time_seconds).
	MeanMs       float64   `json:"reconcile_mean_ms"`
	StatusWrites int64     `json:"status_writes"`
	API          apiWrites `json:"api_writes"`
	CPU          string    `json:"cpu"`
	// StoppedCollected: the stopped operator's manager and cache were
	// garbage collected, StoppedCollectedSec after the restart's end.
	StoppedCollected    bool    `json:"stopped_operator_collected"`
	StoppedCollectedSec float64 `json:"stopped_operator_collected_sec"`
}

// restartOperator starts the operator again (the last one stopped) and
// waits until every twin has been reconciled, then --scale-quiet more so
// that writes sent late (Events are sent in the background) are counted.
func restartOperator(ctx context.Context, restCfg *rest.Config, cfg config, sc scaleConfig, res *restartResults) (*operator, error) {
	progress("scale: restarting the operator")
	api0, err := apiserverWrites(restCfg)
	if err != nil {
		return nil, fmt.Errorf("reading the API server's metrics: %w", err)
	}
	w0, _ := statusWrites()
	r0 := devicetwinReconciles()
	c0 := sampleCPU()
	stopProfile := func() {}
	if sc.profile != "" {
		stopProfile = startProfile(sc.profile + ".cpu-restart.pprof")
	}
	start := time.Now()
	op, err := startOperator(ctx, restCfg, cfg)
	if err != nil {
		stopProfile()
		return nil, err
	}
	synced := time.Now()
	res.CacheSyncSec = synced.Sub(start).Seconds()
	progress("scale: restarted operator's cache synced %.1fs after start", res.CacheSyncSec)
	done, r1 := waitReconciled(ctx, sc.twins, r0, sc.settleTimeout)
	res.Reached = !done.IsZero()
	if res.Reached {
		res.ReconciledSec = done.Sub(start).Seconds()
		if el := done.Sub(synced).Seconds(); el > 0 {
			res.PerSec = (r1.total - r0.total) / el
		}
	} else {
		progress("scale: not every twin reconciled %s after the restart", sc.settleTimeout)
	}
	res.Reconciles, res.ReconcileErrs = r1.total-r0.total, r1.errors-r0.errors
	if n := r1.timeCount - r0.timeCount; n > 0 {
		res.MeanMs = 1000 * (r1.timeSum - r0.timeSum) / n
	}
	res.CPU = coresString(coresBetween(c0, sampleCPU()))
	stopProfile()
	select {
	case <-ctx.Done():
		return op, ctx.Err()
	case <-time.After(sc.quiet):
	}
	w1, _ := statusWrites()
	res.StatusWrites = w1 - w0
	api1, err := apiserverWrites(restCfg)
	if err != nil {
		return op, fmt.Errorf("reading the API server's metrics: %w", err)
	}
	res.API = api1.minus(api0)
	progress("scale: restart: every twin reconciled %.1fs after start (%.0f reconciles, %.0f/s, mean %.2f ms, %.0f errors); %d status writes; API server writes: %s",
		res.ReconciledSec, res.Reconciles, res.PerSec, res.MeanMs, res.ReconcileErrs, res.StatusWrites, res.API)
	return op, nil
}

// reconcileCounts is what controller-runtime's metrics say of the
// DeviceTwin controller ("devicetwin"): counters so far and gauges now.
type reconcileCounts struct {
	total, errors       float64
	timeSum, timeCount  float64
	depth, activeWorker float64
}

// devicetwinReconciles reads reconcileCounts from the manager's registry
// (every manager in this process shares it).
func devicetwinReconciles() reconcileCounts {
	var c reconcileCounts
	mfs, err := ctrlmetrics.Registry.Gather()
	if err != nil {
		progress("reading controller metrics: %v", err)
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["controller"] != "devicetwin" {
				continue
			}
			switch mf.GetName() {
			case "controller_runtime_reconcile_total":
				c.total += m.GetCounter().GetValue()
				if l["result"] == "error" {
					c.errors += m.GetCounter().GetValue()
				}
			case "controller_runtime_reconcile_time_seconds":
				c.timeSum += m.GetHistogram().GetSampleSum()
				c.timeCount += float64(m.GetHistogram().GetSampleCount())
			case "workqueue_depth":
				c.depth += gaugeValue(m)
			case "controller_runtime_active_workers":
				c.activeWorker += gaugeValue(m)
			}
		}
	}
	return c
}

func gaugeValue(m *dto.Metric) float64 { return m.GetGauge().GetValue() }

// waitReconciled waits until the DeviceTwin controller has reconciled at
// least n times since base and has nothing queued or running: the cache
// synced before the workers started, so by then every twin was queued, and
// an empty idle queue means each was reconciled. It returns when that was
// seen (zero on timeout) and the counts then.
func waitReconciled(ctx context.Context, n int, base reconcileCounts, timeout time.Duration) (time.Time, reconcileCounts) {
	deadline := time.Now().Add(timeout)
	lastLog := time.Now()
	for {
		c := devicetwinReconciles()
		if c.total-base.total >= float64(n) && c.depth == 0 && c.activeWorker == 0 {
			return time.Now(), c
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return time.Time{}, c
		}
		if time.Since(lastLog) >= 10*time.Second {
			lastLog = time.Now()
			progress("  %.0f/%d reconciles, %.0f queued", c.total-base.total, n, c.depth)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// writeHeapProfile writes this process's heap profile, after a GC, to
// prefix.at.pprof (nothing when prefix is empty).
func writeHeapProfile(prefix, at string) {
	if prefix == "" {
		return
	}
	file := prefix + ".heap-" + at + ".pprof"
	f, err := os.Create(file)
	if err != nil {
		progress("heap profile: %v", err)
		return
	}
	defer f.Close()
	runtime.GC()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		progress("heap profile: %v", err)
		return
	}
	progress("heap profile written to %s", file)
}
