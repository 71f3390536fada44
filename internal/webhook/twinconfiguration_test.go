package webhook_test

import (
	"context"
	"strings"
	"testing"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/webhook"
)

func newConfig(ns, target, desired string) *v1alpha1.TwinConfiguration {
	c := &v1alpha1.TwinConfiguration{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "cfg"}}
	c.Spec.TargetCondition = target
	c.Spec.Content.Desired = &apiextensionsv1.JSON{Raw: []byte(desired)}
	return c
}

// TestValidateConfiguration: each part of a configuration is checked and
// named with its field path; content breaks the DeviceTwin rules with the
// same messages.
func TestValidateConfiguration(t *testing.T) {
	for name, tc := range map[string]struct {
		mutate func(*v1alpha1.TwinConfiguration)
		want   string // "" for valid
	}{
		"valid":      {func(*v1alpha1.TwinConfiguration) {}, ""},
		"every twin": {func(c *v1alpha1.TwinConfiguration) { c.Spec.TargetCondition = "*" }, ""},
		"condition error at its own column": {func(c *v1alpha1.TwinConfiguration) {
			c.Spec.TargetCondition = "tags.a = = 'x'"
		}, "spec.targetCondition: line 1, column 10: "},
		"array in content": {func(c *v1alpha1.TwinConfiguration) {
			c.Spec.Content.Desired.Raw = []byte(`{"telemetry":{"intervals":[1,2]}}`)
		}, "spec.content.desired.telemetry.intervals: " + ruleArray},
		"dotted key in content": {func(c *v1alpha1.TwinConfiguration) {
			c.Spec.Content.Desired.Raw = []byte(`{"a.b":1}`)
		}, `spec.content.desired: key "a.b" must not contain '.'`},
		"metric that does not parse": {func(c *v1alpha1.TwinConfiguration) {
			c.Spec.Metrics = []v1alpha1.ConfigurationMetric{{Name: "m", Query: "SELECT deviceId FROM devices WHERE"}}
		}, "spec.metrics[0].query: line 1, column "},
		"metric with an aggregate": {func(c *v1alpha1.TwinConfiguration) {
			c.Spec.Metrics = []v1alpha1.ConfigurationMetric{{Name: "m", Query: "SELECT COUNT() FROM devices"}}
		}, "spec.metrics[0].query: a metric counts twins"},
		"health metric not defined": {func(c *v1alpha1.TwinConfiguration) {
			c.Spec.Rollout = &v1alpha1.RolloutSpec{MaxInFlight: intstr.FromInt32(1), HealthMetric: "failed"}
		}, `spec.rollout.healthMetric: no metric named "failed" in spec.metrics`},
		"maxInFlight zero": {func(c *v1alpha1.TwinConfiguration) {
			c.Spec.Rollout = &v1alpha1.RolloutSpec{MaxInFlight: intstr.FromInt32(0)}
		}, "spec.rollout.maxInFlight: must be at least 1"},
		"maxInFlight not a percentage": {func(c *v1alpha1.TwinConfiguration) {
			c.Spec.Rollout = &v1alpha1.RolloutSpec{MaxInFlight: intstr.FromString("ten")}
		}, "spec.rollout.maxInFlight: must be a number or a percentage"},
	} {
		t.Run(name, func(t *testing.T) {
			c := newConfig("ns", "tags.a = 'x'", `{"telemetry":{"interval":10}}`)
			tc.mutate(c)
			errs := webhook.ValidateConfiguration(c)
			if tc.want == "" {
				if len(errs) > 0 {
					t.Fatalf("refused a valid configuration: %v", errs)
				}
				return
			}
			if len(errs) != 1 || !strings.HasPrefix(errs[0].Error(), tc.want) {
				t.Fatalf("errors %v, want one starting with %q", errs, tc.want)
			}
		})
	}
}

// TestConfigurationAdmission: the API server refuses an invalid
// configuration through the webhook (config/webhook/manifests.yaml), with
// the field path and rule, and stores nothing.
func TestConfigurationAdmission(t *testing.T) {
	apiServer(t)
	ctx := context.Background()
	ns := newNamespace(t)
	bad := newConfig(ns, "tags.a = 'x'", `{"telemetry":{"intervals":[1,2]}}`)
	err := k8s.Create(ctx, bad)
	if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "spec.content.desired.telemetry.intervals: "+ruleArray) {
		t.Fatalf("create: %v, want 422 naming spec.content.desired.telemetry.intervals", err)
	}
	bad = newConfig(ns, "tags.a = ", `{}`)
	if err := k8s.Create(ctx, bad); !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "spec.targetCondition: line 1, column ") {
		t.Fatalf("create: %v, want 422 naming spec.targetCondition and a position", err)
	}
	good := newConfig(ns, "tags.a = 'x'", `{"telemetry":{"interval":10}}`)
	if err := k8s.Create(ctx, good); err != nil {
		t.Fatalf("a valid configuration was refused: %v", err)
	}
}
