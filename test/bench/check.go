package main

import (
	"bytes"
	"cmp"
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
// repeats (the device process checked that).
func verify(ctx context.Context, k8s client.Client, sum reportSummary, res *results) error {
	return verifyIn(ctx, k8s, devicesNS, sum, res)
}

// verifyIn is verify on the twins of namespace ns.
func verifyIn(ctx context.Context, k8s client.Client, ns string, sum reportSummary, res *results) error {
	progress("verifying every twin against its device's last acknowledged report (non-caching List)")
	var list v1alpha1.DeviceTwinList
	if err := k8s.List(ctx, &list, client.InNamespace(ns)); err != nil {
		return err
	}
	twins := map[string]*v1alpha1.DeviceTwin{}
	for i := range list.Items {
		twins[list.Items[i].Name] = &list.Items[i]
	}
	if len(sum.Devices) > 0 {
		if t, ok := twins[sum.Devices[0].Name]; ok {
			res.DeviceObjBytes = len(mustJSON(t))
		}
	}
	shown := 0
	show := func(format string, args ...any) {
		if shown < 10 {
			shown++
			progress("  "+format, args...)
		}
	}
	for _, d := range sum.Devices {
		t, ok := twins[d.Name]
		if !ok {
			res.Mismatches++
			show("%s: twin not found", d.Name)
			continue
		}
		var want map[string]any
		if d.Ver > 0 {
			want = map[string]any{"seq": json.Number(strconv.FormatInt(d.Seq, 10)), "t": d.T}
		}
		got, err := decodeReported(t)
		if err != nil {
			res.Mismatches++
			show("%s: status.reported does not decode: %v", d.Name, err)
		} else if !(len(want) == 0 && len(got) == 0) && !reflect.DeepEqual(got, want) {
			res.Mismatches++
			show("%s: status.reported = %s (reportedVersion %d), last acknowledged report = %s (version %d)",
				d.Name, rawString(t), t.Status.ReportedVersion, mustJSON(want), d.Ver)
		}
		if t.Status.ReportedVersion != d.Ver {
			res.VersionMismatches++
			show("%s: status.reportedVersion = %d, last acknowledged version = %d", d.Name, t.Status.ReportedVersion, d.Ver)
		}
		if d.VersionGap != "" {
			res.DevicesWithVersionGap++
			show("%s: %s", d.Name, d.VersionGap)
		}
	}
	if len(sum.Devices) != res.Devices {
		res.Mismatches += res.Devices - len(sum.Devices)
		show("only %d of %d devices reported their last acknowledged report", len(sum.Devices), res.Devices)
	}
	progress("  %d twins checked: %d do not hold the last acknowledged report, %d reportedVersion mismatches, %d devices with version gaps",
		len(sum.Devices), res.Mismatches, res.VersionMismatches, res.DevicesWithVersionGap)
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

// runDesired is phase (c): it changes spec.desired of the first cfg.desired
// twins, cfg.desiredParallel at a time, and times each change from the
// patch call returning to the device's OnDesired callback with it.
func runDesired(ctx context.Context, k8s client.Client, dp *deviceProc, cfg config, res *results) error {
	n := cfg.desired
	res.DesiredChanges = n
	if n == 0 {
		return nil
	}
	progress("desired: changing spec.desired of %d twins, %d at a time", n, cfg.desiredParallel)
	var next atomic.Int64
	var mu sync.Mutex
	var lats, fromStart []time.Duration
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
				name := twinName("dev-", i)
				var before v1alpha1.DeviceTwin
				if err := k8s.Get(ctx, client.ObjectKey{Namespace: devicesNS, Name: name}, &before); err != nil {
					mu.Lock()
					firstErr = cmp.Or(firstErr, err)
					mu.Unlock()
					return
				}
				k := int64(1000 + i)
				ch := dp.waitDesired(name)
				t := &v1alpha1.DeviceTwin{}
				t.Namespace, t.Name = devicesNS, name
				patch := fmt.Sprintf(`{"spec":{"desired":{"setpoint":%d}}}`, k)
				called := time.Now()
				err := k8s.Patch(ctx, t, client.RawPatch(types.MergePatchType, []byte(patch)))
				returned := time.Now()
				if err != nil {
					dp.stopWaiting(name)
					mu.Lock()
					firstErr = cmp.Or(firstErr, fmt.Errorf("patching spec.desired of %s: %w", name, err))
					mu.Unlock()
					return
				}
				timer := time.NewTimer(cfg.desiredTimeout)
			wait:
				for {
					select {
					case e := <-ch:
						if e.Setpoint != k {
							continue
						}
						timer.Stop()
						lat := time.Unix(0, e.At).Sub(returned)
						mu.Lock()
						fromStart = append(fromStart, time.Unix(0, e.At).Sub(called))
						if lat < 0 {
							early++
							lat = 0
						}
						if want := before.Status.DesiredVersion + 1; e.Version != want {
							badVersion++
							progress("  %s: desired change arrived as version %d, expected %d", name, e.Version, want)
						}
						lats = append(lats, lat)
						mu.Unlock()
						break wait
					case <-timer.C:
						mu.Lock()
						timeouts++
						mu.Unlock()
						progress("  %s: desired setpoint %d did not reach the device within %s", name, k, cfg.desiredTimeout)
						break wait
					case <-ctx.Done():
						timer.Stop()
						break wait
					}
				}
				dp.stopWaiting(name)
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
	slices.Sort(fromStart)
	res.DesiredFromStartP50 = ms(percentile(fromStart, 50))
	res.DesiredFromStartP99 = ms(percentile(fromStart, 99))
	res.DesiredEarly = early
	progress("  desired: %d of %d received (p50 %.1f ms, p99 %.1f ms; %d arrived before the patch call returned)",
		len(lats), n, res.DesiredLatencyP50Ms, res.DesiredLatencyP99Ms, early)
	return nil
}
