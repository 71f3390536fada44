package controllers

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

func testConfig(name string, priority int32, created time.Time, target, desired string) *compiled {
	c := &v1alpha1.TwinConfiguration{ObjectMeta: metav1.ObjectMeta{
		Name: name, UID: types.UID(name), Generation: 1, CreationTimestamp: metav1.NewTime(created),
	}}
	c.Spec.Priority = priority
	c.Spec.TargetCondition = target
	c.Spec.Content.Desired = &apiextensionsv1.JSON{Raw: []byte(desired)}
	return compileConfiguration(c)
}

func testTwin(tags, desired string, managed map[string]string) *v1alpha1.DeviceTwin {
	t := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Name: "tw", Namespace: "ns", UID: "tw", ResourceVersion: "1"}}
	if tags != "" {
		t.Spec.Tags = &apiextensionsv1.JSON{Raw: []byte(tags)}
	}
	if desired != "" {
		t.Spec.Desired = &apiextensionsv1.JSON{Raw: []byte(desired)}
	}
	for m, fields := range managed {
		t.ManagedFields = append(t.ManagedFields, metav1.ManagedFieldsEntry{
			Manager: m, Operation: metav1.ManagedFieldsOperationApply, FieldsV1: metav1.NewFieldsV1(fields),
		})
	}
	return t
}

func allAdmitted(*compiled, *v1alpha1.DeviceTwin) bool { return true }

// wonPaths renders a plan as manager: label path=value,...
func wonPaths(plan []twinApply) map[string]string {
	out := map[string]string{}
	for _, a := range plan {
		var parts []string
		for _, l := range a.won {
			v, _ := json.Marshal(l.value)
			parts = append(parts, strings.Join(l.segs, ".")+"="+string(v))
		}
		out[strings.TrimPrefix(a.manager, ConfigurationManagerPrefix)] = a.label + " " + strings.Join(parts, ",")
	}
	return out
}

func TestPlanTwin(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for name, tc := range map[string]struct {
		cfgs []*compiled
		twin *v1alpha1.DeviceTwin
		want map[string]string
	}{
		"higher priority wins the path": {
			cfgs: []*compiled{
				testConfig("lo", 1, t0.Add(time.Hour), "*", `{"a":1,"b":1}`),
				testConfig("hi", 2, t0, "*", `{"a":2}`),
			},
			twin: testTwin("", "", nil),
			want: map[string]string{"lo": "Applied b=1", "hi": "Applied a=2"},
		},
		"tie: the newest wins": {
			cfgs: []*compiled{
				testConfig("old", 1, t0, "*", `{"a":1}`),
				testConfig("new", 1, t0.Add(time.Second), "*", `{"a":2}`),
			},
			twin: testTwin("", "", nil),
			want: map[string]string{"old": "Targeted ", "new": "Applied a=2"},
		},
		"tie at the same second: the name first in order wins": {
			cfgs: []*compiled{
				testConfig("b", 1, t0, "*", `{"a":1}`),
				testConfig("a", 1, t0, "*", `{"a":2}`),
			},
			twin: testTwin("", "", nil),
			want: map[string]string{"b": "Targeted ", "a": "Applied a=2"},
		},
		"an object against a scalar: the winner's shape": {
			cfgs: []*compiled{
				testConfig("hi", 2, t0, "*", `{"t":{"x":1}}`),
				testConfig("lo", 1, t0, "*", `{"t":"flat","u":true}`),
			},
			twin: testTwin("", "", nil),
			want: map[string]string{"hi": "Applied t.x=1", "lo": "Applied u=true"},
		},
		"the manifest's paths are never taken": {
			cfgs: []*compiled{testConfig("c", 1, t0, "*", `{"t":{"x":1,"y":2}}`)},
			twin: testTwin("", `{"t":{"x":5}}`, map[string]string{"kubectl": `{"f:spec":{"f:desired":{"f:t":{"f:x":{}}}}}`}),
			want: map[string]string{"c": "Applied t.y=2"},
		},
		"not targeted: nothing, label included": {
			cfgs: []*compiled{testConfig("c", 1, t0, "tags.ring = 'canary'", `{"a":1}`)},
			twin: testTwin(`{"ring":"stable"}`, "", nil),
			want: map[string]string{"c": " "},
		},
		"a configuration that is gone releases everything": {
			cfgs: nil,
			twin: testTwin("", `{"a":1}`, map[string]string{ConfigurationManagerPrefix + "gone": `{"f:spec":{"f:desired":{"f:a":{}}}}`}),
			want: map[string]string{"gone": " "},
		},
		"an invalid configuration keeps its paths from others": {
			cfgs: []*compiled{
				testConfig("bad", 9, t0, "tags.a = = 1", `{"a":1}`),
				testConfig("lo", 1, t0, "*", `{"a":2,"b":2}`),
			},
			twin: testTwin("", `{"a":1}`, map[string]string{ConfigurationManagerPrefix + "bad": `{"f:spec":{"f:desired":{"f:a":{}}}}`}),
			want: map[string]string{"lo": "Applied b=2"},
		},
	} {
		t.Run(name, func(t *testing.T) {
			var ec evalCache
			tw := tc.twin
			got := wonPaths(planTwin(tw, tc.cfgs, managedBy(tw), nil, &ec, allAdmitted))
			if len(got) != len(tc.want) {
				t.Fatalf("plan %v, want %v", got, tc.want)
			}
			for k, v := range tc.want {
				if got[k] != v {
					t.Errorf("%s: %q, want %q (plan %v)", k, got[k], v, got)
				}
			}
		})
	}
}

// TestSettled: an apply is needed exactly when the manager's label, paths
// or values differ from the plan.
func TestSettled(t *testing.T) {
	owned := `{"f:metadata":{"f:labels":{"f:configurations.kubetwin.io/c":{}}},"f:spec":{"f:desired":{"f:t":{"f:x":{}}}}}`
	plan := twinApply{manager: ConfigurationManagerPrefix + "c", label: v1alpha1.ConfigurationApplied,
		won: []leaf{{segs: []string{"t", "x"}, value: json.Number("1")}}}
	for name, tc := range map[string]struct {
		desired, label string
		want           bool
	}{
		"same":                  {`{"t":{"x":1.0}}`, "Applied", true},
		"other value":           {`{"t":{"x":2}}`, "Applied", false},
		"other label":           {`{"t":{"x":1}}`, "Targeted", false},
		"path missing (edited)": {`{"t":{}}`, "Applied", false},
	} {
		t.Run(name, func(t *testing.T) {
			tw := testTwin("", tc.desired, map[string]string{plan.manager: owned})
			tw.Labels = map[string]string{"configurations.kubetwin.io/c": tc.label}
			o := managedBy(tw)[plan.manager]
			if got := settled(plan, o, tw, desiredDoc(tw)); got != tc.want {
				t.Errorf("settled = %v, want %v", got, tc.want)
			}
		})
	}
}

// BenchmarkSurvey10k is one status pass of a configuration over 10,000
// twins of which half are targeted, with a second configuration in the
// namespace and query answers already cached (the steady state).
func BenchmarkSurvey10k(b *testing.B) { benchmarkSurvey(b, false) }

// BenchmarkSurvey10kCold is the same pass with nothing cached: the first
// pass after a start, or after every twin changed.
func BenchmarkSurvey10kCold(b *testing.B) { benchmarkSurvey(b, true) }

func benchmarkSurvey(b *testing.B, cold bool) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	self := testConfig("fw", 2, t0, "tags.ring = 'canary'", `{"firmware":{"version":"2.0","channel":"stable"}}`)
	self.metrics = []compiledMetric{}
	other := testConfig("base", 1, t0, "*", `{"telemetry":{"interval":30}}`)
	twins := make([]v1alpha1.DeviceTwin, 10000)
	owned := `{"f:metadata":{"f:labels":{"f:configurations.kubetwin.io/fw":{}}},"f:spec":{"f:desired":{"f:firmware":{"f:version":{},"f:channel":{}}}}}`
	for i := range twins {
		ring := "stable"
		if i%2 == 0 {
			ring = "canary"
		}
		managed := map[string]string{ConfigurationManagerPrefix + "base": `{"f:spec":{"f:desired":{"f:telemetry":{"f:interval":{}}}}}`}
		desired := `{"telemetry":{"interval":30}}`
		labels := map[string]string{"ring": ring}
		if ring == "canary" {
			managed[ConfigurationManagerPrefix+"fw"] = owned
			desired = `{"firmware":{"version":"2.0","channel":"stable"},"telemetry":{"interval":30}}`
			labels["configurations.kubetwin.io/fw"] = "Applied"
		}
		tw := testTwin(`{"ring":"`+ring+`"}`, desired, managed)
		tw.Name = fmt.Sprintf("tw%05d", i)
		tw.UID = types.UID(tw.Name)
		tw.Labels = labels
		tw.Status.Reported = &apiextensionsv1.JSON{Raw: []byte(`{"firmware":{"version":"2.0","channel":"stable"}}`)}
		twins[i] = *tw
	}
	r := &TwinConfigurationReconciler{}
	cfgs := []*compiled{self, other}
	s := r.survey(self, cfgs, twins)
	if s.targeted != 5000 || s.inSync != 5000 || s.unsettled != 0 {
		b.Fatalf("survey: targeted %d, in sync %d, unsettled %d", s.targeted, s.inSync, s.unsettled)
	}
	b.ResetTimer()
	for range b.N {
		if cold {
			r.evals = evalCache{}
		}
		r.survey(self, cfgs, twins)
	}
}

// TestApplierRateBound: past a burst of DefaultMaxConfigurationApplies, the
// applier SetupWithManager builds waits for
// DefaultConfigurationAppliesPerSecond, counted as throttled. The API
// server here answers at once, so the limiter alone sets the pace; the
// envtest TestConfigurationAppliesAreRateBound cannot show the waits on a
// loaded machine, whose API server may itself be slower than the rate.
func TestApplierRateBound(t *testing.T) {
	var applies atomic.Int32
	c := interceptor.NewClient(fake.NewClientBuilder().Build(), interceptor.Funcs{
		Apply: func(context.Context, client.WithWatch, runtime.ApplyConfiguration, ...client.ApplyOption) error {
			applies.Add(1)
			return nil
		},
	})
	// No API server is contacted: SetupWithManager only registers.
	sch := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(sch); err != nil {
		t.Fatal(err)
	}
	mgr, err := ctrl.NewManager(&rest.Config{Host: "http://127.0.0.1:1"}, ctrl.Options{
		Scheme: sch, Metrics: metricsserver.Options{BindAddress: "0"}, HealthProbeBindAddress: "0",
		Controller: config.Controller{SkipNameValidation: ptr.To(true)},
	})
	if err != nil {
		t.Fatal(err)
	}
	r := &TwinConfigurationReconciler{Client: c}
	if err := r.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	a := configurationApplier{r}
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "tw", UID: "tw"}}
	p := twinApply{manager: ConfigurationManagerPrefix + "cfg", label: v1alpha1.ConfigurationApplied}

	const n = 20
	throttled := testutil.ToFloat64(configApplyThrottled)
	start := time.Now()
	var wg sync.WaitGroup
	for range DefaultMaxConfigurationApplies { // the applier's workers
		wg.Go(func() {
			for applies.Load() < n {
				if err := a.apply(context.Background(), tw, p); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	got := int(applies.Load())
	// The burst goes at once; each apply after it waits for its token.
	if least := time.Duration(float64(got-DefaultMaxConfigurationApplies) / DefaultConfigurationAppliesPerSecond * float64(time.Second)); elapsed < least {
		t.Errorf("%d applies took %v, want at least %v at %v/s past a burst of %d",
			got, elapsed, least, DefaultConfigurationAppliesPerSecond, DefaultMaxConfigurationApplies)
	}
	if d := testutil.ToFloat64(configApplyThrottled) - throttled; d < 1 {
		t.Errorf("throttled applies rose by %v, want at least 1", d)
	}
}
