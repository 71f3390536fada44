package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// verify reads every device's twin with the non-caching client and checks
// that status.reported is exactly the device's last acknowledged report
// (the acknowledged one with the highest reported version), and, as extra
// checks, that status.reportedVersion is that version and that the
// versions the device was answered with are 1, 2, ... without gaps or
// repeats.
func verify(ctx context.Context, k8s client.Client, devs []*simDevice, res *results) error {
	progress("verifying every twin against its device's last acknowledged report (non-caching List)")
	var list v1alpha1.DeviceTwinList
	if err := k8s.List(ctx, &list, client.InNamespace(devicesNS)); err != nil {
		return err
	}
	twins := map[string]*v1alpha1.DeviceTwin{}
	for i := range list.Items {
		twins[list.Items[i].Name] = &list.Items[i]
	}
	shown := 0
	show := func(format string, args ...any) {
		if shown < 10 {
			shown++
			progress("  "+format, args...)
		}
	}
	for _, d := range devs {
		d.mu.Lock()
		lastVer, lastSeq, lastT := d.lastVer, d.lastSeq, d.lastT
		versions := slices.Clone(d.versions)
		d.mu.Unlock()

		t, ok := twins[d.name]
		if !ok {
			res.Mismatches++
			show("%s: twin not found", d.name)
			continue
		}
		var want map[string]any
		if lastVer > 0 {
			want = map[string]any{"seq": json.Number(strconv.FormatInt(lastSeq, 10)), "t": lastT}
		}
		got, err := decodeReported(t)
		if err != nil {
			res.Mismatches++
			show("%s: status.reported does not decode: %v", d.name, err)
		} else if !(len(want) == 0 && len(got) == 0) && !reflect.DeepEqual(got, want) {
			res.Mismatches++
			show("%s: status.reported = %s (reportedVersion %d), last acknowledged report = %s (version %d)",
				d.name, rawString(t), t.Status.ReportedVersion, mustJSON(want), lastVer)
		}
		if t.Status.ReportedVersion != lastVer {
			res.VersionMismatches++
			show("%s: status.reportedVersion = %d, last acknowledged version = %d", d.name, t.Status.ReportedVersion, lastVer)
		}
		slices.Sort(versions)
		for i, v := range versions {
			if v != int64(i+1) {
				res.DevicesWithVersionGap++
				show("%s: acknowledged versions are not 1..%d: %v", d.name, len(versions), abbreviate(versions))
				break
			}
		}
	}
	progress("  %d twins checked: %d do not hold the last acknowledged report, %d reportedVersion mismatches, %d devices with version gaps",
		len(devs), res.Mismatches, res.VersionMismatches, res.DevicesWithVersionGap)
	return nil
}

func decodeReported(t *v1alpha1.DeviceTwin) (map[string]any, error) {
	if t.Status.Reported == nil || len(t.Status.Reported.Raw) == 0 {
		return nil, nil
	}
	dec := json.NewDecoder(bytes.NewReader(t.Status.Reported.Raw))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, err
	}
	return m, nil
}

func rawString(t *v1alpha1.DeviceTwin) string {
	if t.Status.Reported == nil {
		return "null"
	}
	return string(t.Status.Reported.Raw)
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func abbreviate(v []int64) string {
	if len(v) <= 12 {
		return fmt.Sprint(v)
	}
	return fmt.Sprintf("%v ... %v (%d)", v[:6], v[len(v)-6:], len(v))
}

// runDesired is phase (c): it changes spec.desired of the first cfg.desired
// twins, cfg.desiredParallel at a time, and times each change from the
// patch call returning to the device's OnDesired callback with it.
func runDesired(ctx context.Context, k8s client.Client, devs []*simDevice, cfg config, res *results) error {
	n := cfg.desired
	res.DesiredChanges = n
	if n == 0 {
		return nil
	}
	progress("desired: changing spec.desired of %d twins, %d at a time", n, cfg.desiredParallel)
	var next atomic.Int64
	var mu sync.Mutex
	var lats []time.Duration
	var early, timeouts, badVersion int
	var firstErr error
	var wg sync.WaitGroup
	for w := 0; w < cfg.desiredParallel; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				d := devs[i]
				_, before := d.c.Desired()
				k := int64(1000 + i)
				select { // nothing stale
				case <-d.desiredCh:
				default:
				}
				d.desiredWant.Store(k)
				t := &v1alpha1.DeviceTwin{}
				t.Namespace, t.Name = devicesNS, d.name
				patch := fmt.Sprintf(`{"spec":{"desired":{"setpoint":%d}}}`, k)
				err := k8s.Patch(ctx, t, client.RawPatch(types.MergePatchType, []byte(patch)))
				returned := time.Now()
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("patching spec.desired of %s: %w", d.name, err)
					}
					mu.Unlock()
					d.desiredWant.Store(0)
					return
				}
				timer := time.NewTimer(cfg.desiredTimeout)
				select {
				case s := <-d.desiredCh:
					timer.Stop()
					lat := s.at.Sub(returned)
					mu.Lock()
					if lat < 0 {
						early++
						lat = 0
					}
					if s.version != before+1 {
						badVersion++
						progress("  %s: desired change arrived as version %d, the device had %d", d.name, s.version, before)
					}
					lats = append(lats, lat)
					mu.Unlock()
				case <-timer.C:
					mu.Lock()
					timeouts++
					mu.Unlock()
					progress("  %s: desired setpoint %d did not reach the device within %s", d.name, k, cfg.desiredTimeout)
				case <-ctx.Done():
					timer.Stop()
				}
				d.desiredWant.Store(0)
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	slices.Sort(lats)
	res.DesiredReceived = len(lats)
	res.DesiredTimeouts = timeouts
	res.DesiredBadVersion = badVersion
	res.DesiredLatencyP50Ms = ms(percentile(lats, 50))
	res.DesiredLatencyP99Ms = ms(percentile(lats, 99))
	res.DesiredLatencyMaxMs = ms(percentile(lats, 100))
	progress("  desired: %d of %d received (p50 %.1f ms, p99 %.1f ms; %d arrived before the patch call returned)",
		len(lats), n, res.DesiredLatencyP50Ms, res.DesiredLatencyP99Ms, early)
	return nil
}
