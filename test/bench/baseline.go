package main

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// runBaseline measures the raw rate of DeviceTwin status merge patches
// (status.reported changes, on the status subresource) at each in-flight
// level for cfg.baselineDuration, with no operator running; the best level
// is the baseline.
func runBaseline(ctx context.Context, k8s client.Client, cfg config, res *results) error {
	res.BaselineByLevel = map[string]float64{}
	var seq atomic.Int64
	// A short unmeasured warm-up.
	if _, _, err := baselineLevel(ctx, k8s, baselineNS, "base-", cfg.twins, cfg.baselineInflight[0], time.Second, &seq); err != nil {
		return err
	}
	for _, n := range cfg.baselineInflight {
		progress("baseline: status merge patches with %d in flight for %s", n, cfg.baselineDuration)
		c0 := sampleCPU()
		wait := func() {}
		if cfg.apiProfile != "" {
			wait = apiserverProfile(cfg.restCfg, cfg.baselineDuration-time.Second, fmt.Sprintf("%s.baseline-%d.pprof", cfg.apiProfile, n))
		}
		rate, errs, err := baselineLevel(ctx, k8s, baselineNS, "base-", cfg.twins, n, cfg.baselineDuration, &seq)
		wait()
		if err != nil {
			return err
		}
		cores := coresBetween(c0, sampleCPU())
		progress("  baseline %d in flight: %.0f writes/s (%d errors); CPU cores: %s", n, rate, errs, coresString(cores))
		res.BaselineByLevel[strconv.Itoa(n)] = rate
		res.BaselineErrors += errs
		if rate > res.Baseline {
			res.Baseline, res.BaselineInflight, res.CPUBaseline = rate, n, cores
			res.APIMsPerWriteBase = apiMsPerWrite(cores, rate)
		}
	}
	var t v1alpha1.DeviceTwin
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: baselineNS, Name: twinName("base-", 0)}, &t); err == nil {
		res.BaselineObjBytes = len(mustJSON(&t))
	}
	return nil
}

// baselineLevel runs inflight workers for d; worker w patches twins w,
// w+inflight, ... in turn, so no two requests in flight touch one object.
func baselineLevel(ctx context.Context, k8s client.Client, ns, prefix string, twins, inflight int, d time.Duration, seq *atomic.Int64) (float64, int64, error) {
	var ok, failed atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(d)
	for w := 0; w < inflight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			first := w % twins
			for i := first; time.Now().Before(deadline) && ctx.Err() == nil; {
				t := &v1alpha1.DeviceTwin{}
				t.Namespace, t.Name = ns, twinName(prefix, i)
				n := seq.Add(1)
				body := fmt.Sprintf(`{"status":{"reported":{"seq":%d,"t":"%d"}}}`, n, time.Now().UnixNano())
				if err := k8s.Status().Patch(ctx, t, client.RawPatch(types.MergePatchType, []byte(body))); err != nil {
					if failed.Add(1) == 1 {
						errOnce.Do(func() { firstErr = err })
					}
				} else {
					ok.Add(1)
				}
				if i += inflight; i >= twins {
					i = first
				}
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	if err := ctx.Err(); err != nil {
		return 0, 0, err
	}
	if ok.Load() == 0 && firstErr != nil {
		return 0, failed.Load(), fmt.Errorf("no status patch succeeded: %w", firstErr)
	}
	if firstErr != nil {
		progress("  baseline: %d patches failed, the first with: %v", failed.Load(), firstErr)
	}
	return float64(ok.Load()) / el.Seconds(), failed.Load(), nil
}

// runBaselineDeviceTwins repeats the baseline's best level on the device
// twins once the operator has stopped: the same status merge patches on
// objects of the size the operator writes (the baseline's own twins are
// much smaller), so the two baselines bracket the API server's cost.
func runBaselineDeviceTwins(ctx context.Context, k8s client.Client, cfg config, res *results) error {
	n := max(res.BaselineInflight, 1)
	progress("baseline on the device twins (operator stopped): status merge patches with %d in flight for %s", n, cfg.baselineAfter)
	var seq atomic.Int64
	seq.Store(1 << 40)
	c0 := sampleCPU()
	rate, errs, err := baselineLevel(ctx, k8s, devicesNS, "dev-", cfg.devices, n, cfg.baselineAfter, &seq)
	if err != nil {
		return err
	}
	cores := coresBetween(c0, sampleCPU())
	res.BaselineDeviceTwins, res.CPUBaselineDev = rate, cores
	res.BaselineErrors += errs
	res.APIMsPerWriteBaseDev = apiMsPerWrite(cores, rate)
	progress("  baseline on device twins: %.0f writes/s (%d errors); CPU cores: %s", rate, errs, coresString(cores))
	return nil
}

// apiMsPerWrite is the kube-apiserver CPU time per write, in milliseconds.
func apiMsPerWrite(cores map[string]float64, writesPerSec float64) float64 {
	if writesPerSec <= 0 {
		return 0
	}
	return 1000 * cores["kube_apiserver"] / writesPerSec
}
