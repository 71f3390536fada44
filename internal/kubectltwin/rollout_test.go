package kubectltwin

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// fakeSource lists one configuration (or none) and hands out a watcher the
// test drives.
type fakeSource struct {
	first   *v1alpha1.TwinConfiguration
	watcher *watch.FakeWatcher
	// onWatch runs when the follower starts watching.
	onWatch func()
}

func (s *fakeSource) list(context.Context) (*v1alpha1.TwinConfigurationList, error) {
	l := &v1alpha1.TwinConfigurationList{ListMeta: metav1.ListMeta{ResourceVersion: "1"}}
	if s.first != nil {
		l.Items = append(l.Items, *s.first)
	}
	return l, nil
}

func (s *fakeSource) watch(context.Context, string) (watch.Interface, error) {
	if s.onWatch != nil {
		s.onWatch()
	}
	return s.watcher, nil
}

// status returns the configuration at generation 2 with the operator's
// status: its counts and a Ready condition with reason (True for
// Applied); observed false leaves the status at generation 1.
func status(targeted, applied, inSync int32, reason, msg string, observed bool) *v1alpha1.TwinConfiguration {
	c := &v1alpha1.TwinConfiguration{ObjectMeta: metav1.ObjectMeta{Name: "telemetry-30s", Namespace: "fleet", Generation: 2}}
	gen := int64(2)
	if !observed {
		gen = 1
	}
	c.Status = v1alpha1.TwinConfigurationStatus{ObservedGeneration: gen, TargetedCount: targeted, AppliedCount: applied, InSyncCount: inSync}
	ready := metav1.ConditionFalse
	if reason == v1alpha1.ReasonApplied {
		ready = metav1.ConditionTrue
	}
	c.Status.Conditions = []metav1.Condition{{Type: v1alpha1.ConditionReady, Status: ready, Reason: reason, Message: msg, ObservedGeneration: gen}}
	if reason == v1alpha1.ReasonRolloutHalted || reason == v1alpha1.ReasonInvalidConfiguration {
		c.Status.Conditions = append(c.Status.Conditions, metav1.Condition{Type: v1alpha1.ConditionStalled, Status: metav1.ConditionTrue,
			Reason: reason, Message: msg, ObservedGeneration: gen})
	}
	return c
}

// follow runs FollowRollout over src while send pushes events, and
// returns its error and output.
func follow(t *testing.T, ctx context.Context, src *fakeSource, tty bool, send func(w *watch.FakeWatcher)) (string, error) {
	t.Helper()
	src.watcher = watch.NewFake()
	var out bytes.Buffer
	p := &progress{w: &out, tty: tty}
	done := make(chan error, 1)
	go func() { done <- FollowRollout(ctx, src, "telemetry-30s", p) }()
	if send != nil {
		send(src.watcher)
	}
	err := <-done
	return out.String(), err
}

func TestFollowRolloutToReady(t *testing.T) {
	src := &fakeSource{first: status(0, 0, 0, v1alpha1.ReasonApplied, "", false)}
	out, err := follow(t, context.Background(), src, false, func(w *watch.FakeWatcher) {
		w.Modify(status(10, 4, 0, v1alpha1.ReasonApplying, "6 of 10 targeted twins are being given the content", true))
		w.Modify(status(10, 4, 0, v1alpha1.ReasonApplying, "6 of 10 targeted twins are being given the content", true)) // no change: no line
		w.Modify(status(10, 10, 7, v1alpha1.ReasonWaitingForDevices, "7 of 10 twins with the content report it back", true))
		w.Modify(status(10, 10, 10, v1alpha1.ReasonApplied, "10 twins have the content", true))
	})
	if err != nil {
		t.Fatalf("error %v; output:\n%s", err, out)
	}
	want := strings.Join([]string{
		"telemetry-30s: 0/0 in sync, 0/0 applied, 0 targeted (waiting for the operator to observe the current spec)",
		"telemetry-30s: 0/10 in sync, 4/10 applied, 10 targeted (Applying)",
		"telemetry-30s: 7/10 in sync, 10/10 applied, 10 targeted (WaitingForDevices)",
		"telemetry-30s: 10/10 in sync, 10/10 applied, 10 targeted (Applied)",
		`configuration "telemetry-30s" successfully rolled out`,
	}, "\n") + "\n"
	if out != want {
		t.Errorf("output\n%s\nwant\n%s", out, want)
	}
}

func TestFollowRolloutHalts(t *testing.T) {
	halted := status(10, 4, 2, v1alpha1.ReasonRolloutHalted, "metric failed counts 2 twins, more than the 1 allowed: 6 targeted twins wait for the content", true)
	halted.Spec.Rollout = &v1alpha1.RolloutSpec{MaxInFlight: intstr.FromInt32(2), HealthMetric: "failed", MaxUnhealthy: &intstr.IntOrString{Type: intstr.String, StrVal: "25%"}}
	halted.Status.Metrics = []v1alpha1.ConfigurationMetricResult{{Name: "failed", Count: 2}}
	out, err := follow(t, context.Background(), &fakeSource{first: status(10, 2, 1, v1alpha1.ReasonWaitingForDevices, "", true)}, false,
		func(w *watch.FakeWatcher) { w.Modify(halted) })
	if err == nil || err.Error() != "rollout of configuration telemetry-30s halted: metric failed counts 2 twins, more than the 1 allowed: 6 targeted twins wait for the content" {
		t.Fatalf("error %v", err)
	}
	if !strings.HasSuffix(out, "telemetry-30s: 2/10 in sync, 4/10 applied, 10 targeted, health failed 2/1 (RolloutHalted: metric failed counts 2 twins, "+
		"more than the 1 allowed: 6 targeted twins wait for the content)\n") {
		t.Errorf("output:\n%s", out)
	}
}

func TestFollowRolloutEnds(t *testing.T) {
	// Deleted while followed.
	_, err := follow(t, context.Background(), &fakeSource{first: status(3, 1, 0, v1alpha1.ReasonApplying, "", true)}, false,
		func(w *watch.FakeWatcher) { w.Delete(status(3, 1, 0, v1alpha1.ReasonApplying, "", true)) })
	if err == nil || err.Error() != "configuration telemetry-30s was deleted" {
		t.Errorf("deleted: %v", err)
	}
	// Not there at all.
	_, err = follow(t, context.Background(), &fakeSource{}, false, nil)
	if !apierrors.IsNotFound(err) {
		t.Errorf("missing: %v", err)
	}
	// Invalid.
	_, err = follow(t, context.Background(), &fakeSource{first: status(0, 0, 0, v1alpha1.ReasonInvalidConfiguration, "spec.targetCondition: bad", true)}, false, nil)
	if err == nil || err.Error() != "configuration telemetry-30s is invalid: spec.targetCondition: bad" {
		t.Errorf("invalid: %v", err)
	}
	// A paused rollout is waited for, until the timeout.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	paused := &fakeSource{first: status(10, 2, 2, v1alpha1.ReasonRolloutPaused, "rollout paused: 8 targeted twins wait for the content", true), onWatch: cancel}
	out, err := follow(t, ctx, paused, false, nil)
	if err == nil || !errors.Is(ctx.Err(), context.Canceled) || err.Error() != "timed out waiting for configuration telemetry-30s: "+
		"telemetry-30s: 2/10 in sync, 2/10 applied, 10 targeted (RolloutPaused: rollout paused: 8 targeted twins wait for the content)" {
		t.Errorf("paused: %v\n%s", err, out)
	}
}

// TestRolloutBar: on a terminal the bar is redrawn in place and the line
// ends once the rollout does.
func TestRolloutBar(t *testing.T) {
	out, err := follow(t, context.Background(), &fakeSource{first: status(10, 5, 2, v1alpha1.ReasonWaitingForDevices, "", true)}, true,
		func(w *watch.FakeWatcher) { w.Modify(status(10, 10, 10, v1alpha1.ReasonApplied, "", true)) })
	if err != nil {
		t.Fatal(err)
	}
	want := "\r\033[K[######.........] telemetry-30s: 2/10 in sync, 5/10 applied, 10 targeted (WaitingForDevices)" +
		"\r\033[K[##############################] telemetry-30s: 10/10 in sync, 10/10 applied, 10 targeted (Applied)\n" +
		`configuration "telemetry-30s" successfully rolled out` + "\n"
	want = strings.Replace(want, "[######.........]", "["+strings.Repeat("#", 6)+strings.Repeat("=", 9)+strings.Repeat(".", 15)+"]", 1)
	if out != want {
		t.Errorf("output %q\nwant   %q", out, want)
	}
	if b := bar(rolloutView{}); b != "["+strings.Repeat(" ", barWidth)+"]" {
		t.Errorf("bar of nothing targeted: %q", b)
	}
}
