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
	if _, _, err := baselineLevel(ctx, k8s, cfg.twins, cfg.baselineInflight[0], time.Second, &seq); err != nil {
		return err
	}
	for _, n := range cfg.baselineInflight {
		progress("baseline: status merge patches with %d in flight for %s", n, cfg.baselineDuration)
		rate, errs, err := baselineLevel(ctx, k8s, cfg.twins, n, cfg.baselineDuration, &seq)
		if err != nil {
			return err
		}
		progress("  baseline %d in flight: %.0f writes/s (%d errors)", n, rate, errs)
		res.BaselineByLevel[strconv.Itoa(n)] = rate
		res.BaselineErrors += errs
		if rate > res.Baseline {
			res.Baseline, res.BaselineInflight = rate, n
		}
	}
	return nil
}

// baselineLevel runs inflight workers for d; worker w patches twins w,
// w+inflight, ... in turn, so no two requests in flight touch one object.
func baselineLevel(ctx context.Context, k8s client.Client, twins, inflight int, d time.Duration, seq *atomic.Int64) (float64, int64, error) {
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
				t.Namespace, t.Name = baselineNS, twinName("base-", i)
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
