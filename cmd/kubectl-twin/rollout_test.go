package main

import (
	"context"
	"strings"
	"testing"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// newConfiguration creates a TwinConfiguration in the fleet namespace and
// gives it the status an operator would, Ready or halted.
func newConfiguration(t *testing.T, name string, ready bool) *v1alpha1.TwinConfiguration {
	t.Helper()
	ctx := context.Background()
	c := &v1alpha1.TwinConfiguration{ObjectMeta: metav1.ObjectMeta{Namespace: "fleet", Name: name}}
	c.Spec.TargetCondition = "tags.location.plant = 'Redmond43'"
	c.Spec.Content.Desired = &apiextensionsv1.JSON{Raw: []byte(`{"telemetry":{"interval":30}}`)}
	if err := k8s.Create(ctx, c); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), c) })
	cond := metav1.Condition{Type: v1alpha1.ConditionReady, Status: metav1.ConditionTrue, Reason: v1alpha1.ReasonApplied,
		Message: "2 twins have the content and report it back (2 targeted)", ObservedGeneration: c.Generation, LastTransitionTime: metav1.Now()}
	c.Status = v1alpha1.TwinConfigurationStatus{ObservedGeneration: c.Generation, TargetedCount: 2, AppliedCount: 2, InSyncCount: 2}
	if !ready {
		cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, v1alpha1.ReasonRolloutHalted, "metric failed counts 1 twins, more than the 0 allowed"
		c.Status.InSyncCount = 1
		stalled := cond
		stalled.Type = v1alpha1.ConditionStalled
		stalled.Status = metav1.ConditionTrue
		c.Status.Conditions = append(c.Status.Conditions, stalled)
	}
	c.Status.Conditions = append(c.Status.Conditions, cond)
	if err := k8s.Status().Update(ctx, c); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRolloutStatus: kubectl twin rollout status reads a TwinConfiguration
// through the API server and exits 0 when it is Ready, 1 when its rollout
// halted or it does not exist.
func TestRolloutStatus(t *testing.T) {
	newConfiguration(t, "rolled-out", true)
	r := ok(t, "rollout", "status", "rolled-out", "--timeout", "30s")
	if want := "rolled-out: 2/2 in sync, 2/2 applied, 2 targeted (Applied)\nconfiguration \"rolled-out\" successfully rolled out\n"; r.stdout != want {
		t.Errorf("stdout %q, want %q", r.stdout, want)
	}

	newConfiguration(t, "halted", false)
	r = twinctl(t, "rollout", "status", "halted", "--timeout", "30s")
	if r.code != 1 || strings.TrimSpace(r.stderr) != "error: rollout of configuration halted halted: metric failed counts 1 twins, more than the 0 allowed" {
		t.Errorf("halted: exit %d, stderr %q", r.code, r.stderr)
	}

	// Followed until the operator reports it Ready (through the watch,
	// unless the status is written before the plugin lists it).
	c := &v1alpha1.TwinConfiguration{ObjectMeta: metav1.ObjectMeta{Namespace: "fleet", Name: "followed"}}
	c.Spec.TargetCondition = "*"
	c.Spec.Content.Desired = &apiextensionsv1.JSON{Raw: []byte(`{"x":1}`)}
	if err := k8s.Create(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), c) })
	done := make(chan result, 1)
	go func() { done <- twinctl(t, "rollout", "status", "followed", "--timeout", "30s") }()
	c.Status = v1alpha1.TwinConfigurationStatus{ObservedGeneration: c.Generation, TargetedCount: 1, AppliedCount: 1, InSyncCount: 1,
		Conditions: []metav1.Condition{{Type: v1alpha1.ConditionReady, Status: metav1.ConditionTrue, Reason: v1alpha1.ReasonApplied,
			Message: "1 twins have the content", ObservedGeneration: c.Generation, LastTransitionTime: metav1.Now()}}}
	if err := k8s.Status().Update(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.code != 0 || !strings.HasSuffix(r.stdout, "followed: 1/1 in sync, 1/1 applied, 1 targeted (Applied)\n"+
		"configuration \"followed\" successfully rolled out\n") {
		t.Errorf("followed: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}

	r = twinctl(t, "rollout", "status", "nope")
	if r.code != 1 || strings.TrimSpace(r.stderr) != `Error from server (NotFound): twinconfigurations.kubetwin.io "nope" not found` {
		t.Errorf("missing: exit %d, stderr %q", r.code, r.stderr)
	}
	r = twinctl(t, "rollout", "status", "rolled-out", "-A")
	if r.code != 1 || !strings.HasPrefix(r.stderr, "error: a TwinConfiguration is in one namespace: use -n, not -A") {
		t.Errorf("-A: exit %d, stderr %q", r.code, r.stderr)
	}
}
