package controllers_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
)

func createConfig(t *testing.T, ns, name string, priority int32, target, desired string, opts ...func(*v1alpha1.TwinConfiguration)) {
	t.Helper()
	c := &v1alpha1.TwinConfiguration{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	c.Spec.Priority = priority
	c.Spec.TargetCondition = target
	c.Spec.Content.Desired = rawJSON(t, desired)
	for _, o := range opts {
		o(c)
	}
	if err := k8s.Create(context.Background(), c); err != nil {
		t.Fatal(err)
	}
}

func getConfig(g Gomega, ns, name string) *v1alpha1.TwinConfiguration {
	c := &v1alpha1.TwinConfiguration{}
	g.Expect(k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, c)).To(Succeed())
	return c
}

func patchConfig(t *testing.T, ns, name, patch string) {
	t.Helper()
	c := &v1alpha1.TwinConfiguration{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if err := k8s.Patch(context.Background(), c, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
		t.Fatal(err)
	}
}

func configCond(c *v1alpha1.TwinConfiguration, typ string) metav1.Condition {
	x := meta.FindStatusCondition(c.Status.Conditions, typ)
	if x == nil {
		return metav1.Condition{}
	}
	return *x
}

// desiredJSON is a twin's spec.desired as compact JSON with sorted keys.
func desiredJSON(tw *v1alpha1.DeviceTwin) string {
	b, _ := json.Marshal(doc(tw.Spec.Desired))
	return string(b)
}

// pathOwners returns, for every leaf under spec.desired, the managers
// that own it, as kubectl get -o yaml --show-managed-fields shows them.
func pathOwners(tw *v1alpha1.DeviceTwin) map[string][]string {
	out := map[string][]string{}
	for _, mf := range tw.ManagedFields {
		if mf.FieldsV1 == nil || mf.Subresource != "" {
			continue
		}
		var f map[string]any
		_ = json.Unmarshal(mf.FieldsV1.GetRawBytes(), &f)
		spec, _ := f["f:spec"].(map[string]any)
		desired, _ := spec["f:desired"].(map[string]any)
		var walk func(prefix string, n map[string]any)
		walk = func(prefix string, n map[string]any) {
			children := 0
			for k, v := range n {
				name, ok := strings.CutPrefix(k, "f:")
				if !ok {
					continue
				}
				children++
				sub, _ := v.(map[string]any)
				p := name
				if prefix != "" {
					p = prefix + "." + name
				}
				walk(p, sub)
			}
			if children == 0 && prefix != "" {
				out[prefix] = append(out[prefix], mf.Manager)
			}
		}
		if desired != nil {
			walk("", desired)
		}
	}
	return out
}

func manager(name string) string { return controllers.ConfigurationManagerPrefix + name }

func label(name string) string { return v1alpha1.ConfigurationsLabelPrefix + name }

// TestConfigurationPriorityConflicts: per desired path the highest
// priority wins; the loser keeps the paths nobody else sets; each path is
// owned by the winner's field manager.
func TestConfigurationPriorityConflicts(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "a", ns+"-a", `{"site":"north"}`, "")
	createTwin(t, ns, "b", ns+"-b", `{"site":"south"}`, "")
	createConfig(t, ns, "base", 1, "*", `{"telemetry":{"interval":10,"mode":"eco"}}`)
	createConfig(t, ns, "north", 5, "tags.site = 'north'", `{"telemetry":{"interval":30}}`)

	g.Eventually(func(g Gomega) {
		a := getTwin(g, ns, "a")
		g.Expect(desiredJSON(a)).To(Equal(`{"telemetry":{"interval":30,"mode":"eco"}}`))
		g.Expect(pathOwners(a)).To(Equal(map[string][]string{
			"telemetry.interval": {manager("north")},
			"telemetry.mode":     {manager("base")},
		}))
		g.Expect(a.Labels).To(HaveKeyWithValue(label("north"), v1alpha1.ConfigurationApplied))
		g.Expect(a.Labels).To(HaveKeyWithValue(label("base"), v1alpha1.ConfigurationApplied))
		b := getTwin(g, ns, "b")
		g.Expect(desiredJSON(b)).To(Equal(`{"telemetry":{"interval":10,"mode":"eco"}}`))
		g.Expect(b.Labels).NotTo(HaveKey(label("north")))
	}, wait, tick).Should(Succeed())

	// A higher priority for base takes the path back.
	patchConfig(t, ns, "base", `{"spec":{"priority":9}}`)
	g.Eventually(func(g Gomega) {
		a := getTwin(g, ns, "a")
		g.Expect(desiredJSON(a)).To(Equal(`{"telemetry":{"interval":10,"mode":"eco"}}`))
		g.Expect(pathOwners(a)["telemetry.interval"]).To(Equal([]string{manager("base")}))
		g.Expect(a.Labels).To(HaveKeyWithValue(label("north"), v1alpha1.ConfigurationTargeted))
		c := getConfig(g, ns, "north")
		g.Expect(c.Status.ObservedGeneration).To(Equal(c.Generation))
		g.Expect(c.Status.TargetedCount).To(BeEquivalentTo(1))
		g.Expect(c.Status.AppliedCount).To(BeEquivalentTo(0))
	}, wait, tick).Should(Succeed())
}

// TestConfigurationTargetEnterLeave: a twin that comes to match gets the
// content; one that stops matching loses it and the label, and keeps its
// own desired properties.
func TestConfigurationTargetEnterLeave(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "a", ns+"-a", `{"ring":"stable"}`, `{"own":1}`)
	createConfig(t, ns, "canary", 0, "tags.ring = 'canary'", `{"firmware":{"channel":"beta"}}`)
	g.Eventually(func(g Gomega) {
		c := getConfig(g, ns, "canary")
		g.Expect(configCond(c, v1alpha1.ConditionReady).Status).To(Equal(metav1.ConditionTrue))
		g.Expect(c.Status.TargetedCount).To(BeEquivalentTo(0))
	}, wait, tick).Should(Succeed())
	g.Expect(desiredJSON(getTwin(g, ns, "a"))).To(Equal(`{"own":1}`))

	setSpec(t, ns, "a", `{"spec":{"tags":{"ring":"canary"}}}`)
	g.Eventually(func(g Gomega) {
		a := getTwin(g, ns, "a")
		g.Expect(desiredJSON(a)).To(Equal(`{"firmware":{"channel":"beta"},"own":1}`))
		g.Expect(a.Labels).To(HaveKeyWithValue(label("canary"), v1alpha1.ConfigurationApplied))
		c := getConfig(g, ns, "canary")
		g.Expect(c.Status.TargetedCount).To(BeEquivalentTo(1))
		g.Expect(c.Status.AppliedCount).To(BeEquivalentTo(1))
	}, wait, tick).Should(Succeed())

	setSpec(t, ns, "a", `{"spec":{"tags":{"ring":"stable"}}}`)
	g.Eventually(func(g Gomega) {
		a := getTwin(g, ns, "a")
		g.Expect(desiredJSON(a)).To(Equal(`{"own":1}`))
		g.Expect(a.Labels).NotTo(HaveKey(label("canary")))
		for _, mf := range a.ManagedFields {
			g.Expect(mf.Manager).NotTo(Equal(manager("canary")))
		}
		g.Expect(getConfig(g, ns, "canary").Status.TargetedCount).To(BeEquivalentTo(0))
	}, wait, tick).Should(Succeed())
}

// TestConfigurationDeletion: a deleted configuration takes its content
// back from every twin before it goes; what another configuration sets
// stays.
func TestConfigurationDeletion(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "a", ns+"-a", "", "")
	createTwin(t, ns, "b", ns+"-b", "", "")
	createConfig(t, ns, "keep", 0, "*", `{"keep":true}`)
	createConfig(t, ns, "gone", 0, "*", `{"gone":{"x":"y"}}`)
	g.Eventually(func(g Gomega) {
		for _, n := range []string{"a", "b"} {
			g.Expect(desiredJSON(getTwin(g, ns, n))).To(Equal(`{"gone":{"x":"y"},"keep":true}`))
		}
		g.Expect(getConfig(g, ns, "gone").Finalizers).To(ContainElement(controllers.ConfigurationFinalizer))
	}, wait, tick).Should(Succeed())

	g.Expect(k8s.Delete(context.Background(), &v1alpha1.TwinConfiguration{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gone"}})).To(Succeed())
	g.Eventually(func(g Gomega) {
		for _, n := range []string{"a", "b"} {
			tw := getTwin(g, ns, n)
			g.Expect(desiredJSON(tw)).To(Equal(`{"keep":true}`))
			g.Expect(tw.Labels).NotTo(HaveKey(label("gone")))
		}
		err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: "gone"}, &v1alpha1.TwinConfiguration{})
		g.Expect(err).To(HaveOccurred())
	}, wait, tick).Should(Succeed())
}

// TestConfigurationContentChange: a changed content replaces the values
// and removes the paths it no longer has.
func TestConfigurationContentChange(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "a", ns+"-a", "", "")
	createConfig(t, ns, "cfg", 0, "*", `{"telemetry":{"interval":10,"mode":"eco"}}`)
	g.Eventually(func(g Gomega) {
		g.Expect(desiredJSON(getTwin(g, ns, "a"))).To(Equal(`{"telemetry":{"interval":10,"mode":"eco"}}`))
	}, wait, tick).Should(Succeed())

	// A merge patch computed from the read copy, not an Update: the
	// controller's status write after the first apply bumps the
	// resourceVersion, and an Update of a copy read before it fails with
	// Conflict (about 1 run in 25).
	c := getConfig(g, ns, "cfg")
	base := c.DeepCopy()
	c.Spec.Content.Desired = rawJSON(t, `{"telemetry":{"interval":20},"led":"on"}`)
	g.Expect(k8s.Patch(context.Background(), c, client.MergeFrom(base))).To(Succeed())
	g.Eventually(func(g Gomega) {
		g.Expect(desiredJSON(getTwin(g, ns, "a"))).To(Equal(`{"led":"on","telemetry":{"interval":20}}`))
	}, wait, tick).Should(Succeed())
}

// TestConfigurationManifestWins: a path the twin's own manifest sets keeps
// the manifest's value; the configuration sets the others. A manifest
// applied later with --force-conflicts takes a path from the
// configuration, which then lets it go.
func TestConfigurationManifestWins(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	createTwin(t, ns, "a", ns+"-a", "", `{"telemetry":{"interval":5}}`)
	createConfig(t, ns, "cfg", 0, "*", `{"telemetry":{"interval":10,"mode":"eco"},"led":"off"}`)
	g.Eventually(func(g Gomega) {
		a := getTwin(g, ns, "a")
		g.Expect(desiredJSON(a)).To(Equal(`{"led":"off","telemetry":{"interval":5,"mode":"eco"}}`))
		owners := pathOwners(a)
		g.Expect(owners["telemetry.mode"]).To(Equal([]string{manager("cfg")}))
		g.Expect(owners["telemetry.interval"]).NotTo(ContainElement(manager("cfg")))
		g.Expect(a.Labels).To(HaveKeyWithValue(label("cfg"), v1alpha1.ConfigurationApplied))
		c := getConfig(g, ns, "cfg")
		g.Expect(c.Status.AppliedCount).To(BeEquivalentTo(1))
	}, wait, tick).Should(Succeed())

	// GitOps applies the twin's manifest with led: on (forced, as Flux and
	// Argo CD's server-side apply do).
	u := &unstructured.Unstructured{}
	u.SetAPIVersion(v1alpha1.GroupVersion.String())
	u.SetKind("DeviceTwin")
	u.SetNamespace(ns)
	u.SetName("a")
	u.Object["spec"] = map[string]any{"deviceId": ns + "-a", "desired": map[string]any{"telemetry": map[string]any{"interval": int64(5)}, "led": "on"}}
	g.Expect(k8s.Apply(ctx, client.ApplyConfigurationFromUnstructured(u), client.FieldOwner("gitops"), client.ForceOwnership)).To(Succeed())
	g.Eventually(func(g Gomega) {
		a := getTwin(g, ns, "a")
		g.Expect(desiredJSON(a)).To(Equal(`{"led":"on","telemetry":{"interval":5,"mode":"eco"}}`))
		owners := pathOwners(a)
		g.Expect(owners["led"]).To(Equal([]string{"gitops"}))
		g.Expect(owners["telemetry.mode"]).To(Equal([]string{manager("cfg")}))
	}, wait, tick).Should(Succeed())

	// The configuration no longer setting mode removes it (only it had it);
	// led stays the manifest's.
	patchConfig(t, ns, "cfg", `{"spec":{"content":{"desired":{"telemetry":{"mode":null}}}}}`)
	g.Eventually(func(g Gomega) {
		g.Expect(desiredJSON(getTwin(g, ns, "a"))).To(Equal(`{"led":"on","telemetry":{"interval":5}}`))
	}, wait, tick).Should(Succeed())
}

// TestConfigurationRollout: a staged rollout gives the content to
// maxInFlight twins at a time, in name order, and to the next ones as
// devices report it back; it halts while its health metric is over the
// threshold (Stalled, RolloutHalted), goes on when it comes back, and
// stops while paused. Metric counts and inSyncCount follow the reports.
func TestConfigurationRollout(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	names := []string{"r1", "r2", "r3", "r4"}
	devs := map[string]interface {
		Report(context.Context, map[string]any) (int64, error)
	}{}
	for _, n := range names {
		createTwin(t, ns, n, ns+"-"+n, `{"fleet":"x"}`, "")
		waitObserved(t, ns, n)
		devs[n] = connect(t, ns+"-"+n, nil)
	}
	createConfig(t, ns, "fw", 0, "tags.fleet = 'x'", `{"firmware":{"version":"2.0"}}`, func(c *v1alpha1.TwinConfiguration) {
		c.Spec.Metrics = []v1alpha1.ConfigurationMetric{{Name: "failed",
			Query: "SELECT deviceId FROM devices WHERE properties.reported.firmware.status = 'failed'"}}
		c.Spec.Rollout = &v1alpha1.RolloutSpec{MaxInFlight: intstr.FromInt32(1), HealthMetric: "failed"}
	})
	report := func(n, status string) {
		t.Helper()
		fw := map[string]any{"version": "2.0"}
		if status != "" {
			fw["status"] = status
		}
		if _, err := devs[n].Report(ctx, map[string]any{"firmware": fw}); err != nil {
			t.Fatal(err)
		}
	}
	// expect waits for the status of a pass that saw the first `have`
	// twins with the content, the others without, and checks the twins.
	expect := func(have int, reason string, inSync, failed int32) {
		t.Helper()
		g.Eventually(func(g Gomega) {
			c := getConfig(g, ns, "fw")
			g.Expect(c.Status.TargetedCount).To(BeEquivalentTo(4))
			g.Expect(c.Status.AppliedCount).To(BeEquivalentTo(have))
			g.Expect(c.Status.InSyncCount).To(Equal(inSync))
			g.Expect(c.Status.Metrics).To(Equal([]v1alpha1.ConfigurationMetricResult{{Name: "failed", Count: failed}}))
			g.Expect(configCond(c, v1alpha1.ConfigConditionProgressing).Reason).To(Equal(reason))
			for i, n := range names {
				tw := getTwin(g, ns, n)
				if i < have {
					g.Expect(desiredJSON(tw)).To(Equal(`{"firmware":{"version":"2.0"}}`), n)
					g.Expect(tw.Labels).To(HaveKeyWithValue(label("fw"), v1alpha1.ConfigurationApplied), n)
				} else {
					g.Expect(desiredJSON(tw)).To(Equal(`{}`), n)
					g.Expect(tw.Labels).To(HaveKeyWithValue(label("fw"), v1alpha1.ConfigurationTargeted), n)
				}
			}
		}, wait, tick).Should(Succeed())
	}
	expect(1, v1alpha1.ReasonWaitingForDevices, 0, 0)

	report("r1", "")
	expect(2, v1alpha1.ReasonWaitingForDevices, 1, 0)

	// r2 reports the version, and that it failed: the rollout halts.
	report("r2", "failed")
	expect(2, v1alpha1.ReasonRolloutHalted, 2, 1)
	c := getConfig(g, ns, "fw")
	g.Expect(configCond(c, v1alpha1.ConfigConditionProgressing).Status).To(Equal(metav1.ConditionFalse))
	g.Expect(configCond(c, v1alpha1.ConditionStalled).Status).To(Equal(metav1.ConditionTrue))
	g.Expect(configCond(c, v1alpha1.ConditionReady).Status).To(Equal(metav1.ConditionFalse))
	g.Expect(configCond(c, v1alpha1.ConditionStalled).ObservedGeneration).To(Equal(c.Generation))

	// It recovers: the rollout goes on.
	report("r2", "ok")
	expect(3, v1alpha1.ReasonWaitingForDevices, 2, 0)

	// Paused: r3 in sync lets nobody else in.
	patchConfig(t, ns, "fw", `{"spec":{"rollout":{"paused":true}}}`)
	g.Eventually(func(g Gomega) {
		c := getConfig(g, ns, "fw")
		g.Expect(c.Status.ObservedGeneration).To(Equal(c.Generation))
	}, wait, tick).Should(Succeed())
	report("r3", "")
	expect(3, v1alpha1.ReasonRolloutPaused, 3, 0)
	g.Expect(meta.FindStatusCondition(getConfig(g, ns, "fw").Status.Conditions, v1alpha1.ConditionStalled)).To(BeNil())

	patchConfig(t, ns, "fw", `{"spec":{"rollout":{"paused":false}}}`)
	expect(4, v1alpha1.ReasonWaitingForDevices, 3, 0)
	report("r4", "")
	expect(4, v1alpha1.ReasonApplied, 4, 0)
	g.Expect(configCond(getConfig(g, ns, "fw"), v1alpha1.ConditionReady).Status).To(Equal(metav1.ConditionTrue))

	// New content rolls out the same way: the twins the rollout has not
	// reached yet keep the previous content.
	patchConfig(t, ns, "fw", `{"spec":{"content":{"desired":{"firmware":{"version":"3.0"}}}}}`)
	versions := func(want ...string) {
		t.Helper()
		g.Eventually(func(g Gomega) {
			c := getConfig(g, ns, "fw")
			g.Expect(c.Status.ObservedGeneration).To(Equal(c.Generation))
			for i, n := range names {
				g.Expect(desiredJSON(getTwin(g, ns, n))).To(Equal(`{"firmware":{"version":"`+want[i]+`"}}`), n)
			}
			g.Expect(configCond(c, v1alpha1.ConfigConditionProgressing).Reason).To(Equal(v1alpha1.ReasonWaitingForDevices))
		}, wait, tick).Should(Succeed())
	}
	versions("3.0", "2.0", "2.0", "2.0")
	if _, err := devs["r1"].Report(ctx, map[string]any{"firmware": map[string]any{"version": "3.0"}}); err != nil {
		t.Fatal(err)
	}
	versions("3.0", "3.0", "2.0", "2.0")
}

// counterValue reads a counter of the operator's registry (the suite's
// manager runs in this process).
func counterValue(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	metric:
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if want, ok := labels[l.GetName()]; ok && want != l.GetValue() {
					continue metric
				}
			}
			sum += m.GetCounter().GetValue()
		}
	}
	return sum
}

// TestConfigurationNoWriteWhenNothingChanges: planning every twin again
// (a new generation of the configuration wakes all of them) sends no apply
// and writes no twin when their share is already right.
func TestConfigurationNoWriteWhenNothingChanges(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	const n = 5
	for i := range n {
		createTwin(t, ns, fmt.Sprintf("t%d", i), fmt.Sprintf("%s-t%d", ns, i), "", `{"own":1}`)
	}
	createConfig(t, ns, "hi", 2, "*", `{"a":1,"b":{"c":"x"}}`)
	createConfig(t, ns, "lo", 1, "*", `{"a":2,"d":true}`)
	g.Eventually(func(g Gomega) {
		for i := range n {
			g.Expect(desiredJSON(getTwin(g, ns, fmt.Sprintf("t%d", i)))).To(Equal(`{"a":1,"b":{"c":"x"},"d":true,"own":1}`))
		}
		for _, name := range []string{"hi", "lo"} {
			c := getConfig(g, ns, name)
			g.Expect(configCond(c, v1alpha1.ConditionReady).Reason).To(Equal(v1alpha1.ReasonWaitingForDevices))
			g.Expect(c.Status.AppliedCount).To(BeEquivalentTo(n))
		}
	}, wait, tick).Should(Succeed())

	var list v1alpha1.DeviceTwinList
	g.Expect(k8s.List(ctx, &list, client.InNamespace(ns))).To(Succeed())
	w, err := k8s.Watch(ctx, &v1alpha1.DeviceTwinList{}, client.InNamespace(ns), &client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: list.ResourceVersion}})
	g.Expect(err).NotTo(HaveOccurred())
	defer w.Stop()
	applies := counterValue(t, "kubetwin_configuration_applies_total", nil)
	reconciles := counterValue(t, "controller_runtime_reconcile_total", map[string]string{"controller": "twinconfiguration-apply"})

	// One new generation wakes every twin it targets; each twin's plan
	// covers both configurations.
	patchConfig(t, ns, "lo", `{"spec":{"metrics":[{"name":"all","query":"SELECT deviceId FROM devices"}]}}`)
	g.Eventually(func(g Gomega) {
		c := getConfig(g, ns, "lo")
		g.Expect(c.Status.ObservedGeneration).To(Equal(c.Generation))
		g.Expect(c.Status.Metrics).To(Equal([]v1alpha1.ConfigurationMetricResult{{Name: "all", Count: n}}))
		got := counterValue(t, "controller_runtime_reconcile_total", map[string]string{"controller": "twinconfiguration-apply"})
		g.Expect(got - reconciles).To(BeNumerically(">=", n))
	}, wait, tick).Should(Succeed())
	g.Expect(counterValue(t, "kubetwin_configuration_applies_total", nil) - applies).To(BeZero())
	for {
		select {
		case e := <-w.ResultChan():
			tw, _ := e.Object.(*v1alpha1.DeviceTwin)
			if tw != nil {
				t.Errorf("twin %s written (%s) though nothing changed", tw.Name, e.Type)
			}
			continue
		default:
		}
		break
	}
}

// TestConfigurationConflictPaths: the paths of a real server-side apply
// conflict (what the applier falls back on when its cache is behind the
// twin's manifest) are read back as desired paths, naming no
// configuration's manager.
func TestConfigurationConflictPaths(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	tw := createTwin(t, ns, "a", ns+"-a", "", `{"t":{"x":1},"y":"own"}`)
	u := &unstructured.Unstructured{}
	u.SetAPIVersion(v1alpha1.GroupVersion.String())
	u.SetKind("DeviceTwin")
	u.SetNamespace(ns)
	u.SetName("a")
	u.SetUID(tw.UID)
	u.Object["spec"] = map[string]any{"desired": map[string]any{"t": map[string]any{"x": int64(2)}, "y": "cfg", "z": true}}
	err := k8s.Apply(ctx, client.ApplyConfigurationFromUnstructured(u), client.FieldOwner(manager("probe")))
	g.Expect(err).To(HaveOccurred())
	paths, ours := controllers.ConflictPaths(err)
	g.Expect(ours).To(BeFalse())
	g.Expect(paths).To(ConsistOf([]string{"t", "x"}, []string{"y"}))
	g.Expect(desiredJSON(getTwin(g, ns, "a"))).To(Equal(`{"t":{"x":1},"y":"own"}`))
}

// TestConfigurationInvalidReported: without the webhook (this suite has
// none) an invalid configuration is stored; the operator reports it
// (Stalled, InvalidConfiguration, naming the field) and changes no twin.
func TestConfigurationInvalidReported(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "a", ns+"-a", "", `{"own":1}`)
	createConfig(t, ns, "bad", 0, "*", `{"telemetry":{"intervals":[1,2]}}`)
	g.Eventually(func(g Gomega) {
		c := getConfig(g, ns, "bad")
		g.Expect(c.Status.ObservedGeneration).To(Equal(c.Generation))
		st := configCond(c, v1alpha1.ConditionStalled)
		g.Expect(st.Status).To(Equal(metav1.ConditionTrue))
		g.Expect(st.Reason).To(Equal(v1alpha1.ReasonInvalidConfiguration))
		g.Expect(st.Message).To(Equal("spec.content.desired.telemetry.intervals: arrays are not allowed in device twins"))
		g.Expect(configCond(c, v1alpha1.ConditionReady).Status).To(Equal(metav1.ConditionFalse))
	}, wait, tick).Should(Succeed())
	a := getTwin(g, ns, "a")
	g.Expect(desiredJSON(a)).To(Equal(`{"own":1}`))
	g.Expect(a.Labels).NotTo(HaveKey(label("bad")))
}

// TestConfigurationRestartWritesNothing: an operator starting over twins
// its configurations already gave their content (a restart, a new leader)
// plans every twin again and sends no apply, writes no twin and no status.
func TestConfigurationRestartWritesNothing(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	const n = 20
	for i := range n {
		createTwin(t, ns, fmt.Sprintf("t%02d", i), fmt.Sprintf("%s-t%02d", ns, i), fmt.Sprintf(`{"ring":"r%d"}`, i%2), `{"own":{"x":1}}`)
	}
	createConfig(t, ns, "all", 1, "*", `{"own":{"x":2,"y":2},"z":"all"}`)
	createConfig(t, ns, "ring0", 2, "tags.ring = 'r0'", `{"z":"ring0"}`)
	g.Eventually(func(g Gomega) {
		c := getConfig(g, ns, "all")
		g.Expect(c.Status.AppliedCount).To(BeEquivalentTo(n))
		g.Expect(configCond(c, v1alpha1.ConditionReady).Reason).To(Equal(v1alpha1.ReasonWaitingForDevices))
		r := getConfig(g, ns, "ring0")
		g.Expect(r.Status.AppliedCount).To(BeEquivalentTo(n / 2))
		g.Expect(configCond(r, v1alpha1.ConditionReady).Reason).To(Equal(v1alpha1.ReasonWaitingForDevices))
		g.Expect(desiredJSON(getTwin(g, ns, "t00"))).To(Equal(`{"own":{"x":1,"y":2},"z":"ring0"}`))
		g.Expect(desiredJSON(getTwin(g, ns, "t01"))).To(Equal(`{"own":{"x":1,"y":2},"z":"all"}`))
	}, wait, tick).Should(Succeed())

	var twins v1alpha1.DeviceTwinList
	g.Expect(k8s.List(ctx, &twins, client.InNamespace(ns))).To(Succeed())
	tw, err := k8s.Watch(ctx, &v1alpha1.DeviceTwinList{}, client.InNamespace(ns), &client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: twins.ResourceVersion}})
	g.Expect(err).NotTo(HaveOccurred())
	defer tw.Stop()
	var cfgs v1alpha1.TwinConfigurationList
	g.Expect(k8s.List(ctx, &cfgs, client.InNamespace(ns))).To(Succeed())
	cw, err := k8s.Watch(ctx, &v1alpha1.TwinConfigurationList{}, client.InNamespace(ns), &client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: cfgs.ResourceVersion}})
	g.Expect(err).NotTo(HaveOccurred())
	defer cw.Stop()
	applies := counterValue(t, "kubetwin_configuration_applies_total", nil)
	reconciles := counterValue(t, "controller_runtime_reconcile_total", map[string]string{"controller": "twinconfiguration-apply"})

	// A second operator (its own cache, nothing remembered) starts.
	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme: testScheme, Metrics: metricsserver.Options{BindAddress: "0"}, HealthProbeBindAddress: "0",
		Controller: config.Controller{SkipNameValidation: ptr.To(true)},
		Cache:      cache.Options{DefaultNamespaces: map[string]cache.Config{ns: {}}},
	})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect((&controllers.TwinConfigurationReconciler{Client: mgr.GetClient()}).SetupWithManager(mgr)).To(Succeed())
	mctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- mgr.Start(mctx) }()
	defer func() { cancel(); <-done }()

	// Every twin is planned (the new cache's create events).
	g.Eventually(func(g Gomega) {
		got := counterValue(t, "controller_runtime_reconcile_total", map[string]string{"controller": "twinconfiguration-apply"})
		g.Expect(got - reconciles).To(BeNumerically(">=", n))
	}, wait, tick).Should(Succeed())
	g.Expect(counterValue(t, "kubetwin_configuration_applies_total", nil) - applies).To(BeZero())
	for _, w := range []watch.Interface{tw, cw} {
	drain:
		for {
			select {
			case e := <-w.ResultChan():
				if o, ok := e.Object.(client.Object); ok {
					t.Errorf("%T %s written (%s) at start-up", o, o.GetName(), e.Type)
				}
			default:
				break drain
			}
		}
	}
}

// TestConfigurationStaysInItsNamespace: a configuration targets only the
// twins of its own namespace, even with "*": a tenant who may create
// configurations in one namespace reaches no twin of another.
func TestConfigurationStaysInItsNamespace(t *testing.T) {
	g := NewWithT(t)
	mine, other := newNamespace(t), newNamespace(t)
	createTwin(t, other, "b", other+"-b", `{"site":"north"}`, `{"own":1}`)
	createTwin(t, mine, "a", mine+"-a", `{"site":"north"}`, "")
	createConfig(t, mine, "everyone", 100, "*", `{"firmware":{"channel":"beta"}}`)
	g.Eventually(func(g Gomega) {
		c := getConfig(g, mine, "everyone")
		g.Expect(c.Status.ObservedGeneration).To(Equal(c.Generation))
		g.Expect(c.Status.TargetedCount).To(BeEquivalentTo(1), "targetedCount counts only this namespace's twin")
		g.Expect(c.Status.AppliedCount).To(BeEquivalentTo(1))
		g.Expect(desiredJSON(getTwin(g, mine, "a"))).To(Equal(`{"firmware":{"channel":"beta"}}`))
	}, wait, tick).Should(Succeed())
	b := getTwin(g, other, "b")
	g.Expect(desiredJSON(b)).To(Equal(`{"own":1}`))
	g.Expect(b.Labels).NotTo(HaveKey(label("everyone")))
	for _, mf := range b.ManagedFields {
		g.Expect(mf.Manager).NotTo(HavePrefix(controllers.ConfigurationManagerPrefix), "a configuration wrote a twin of another namespace")
	}
}

// registryValue is the value of an unlabelled counter or gauge in the
// manager's metrics registry (what /metrics serves).
func registryValue(t *testing.T, name string) float64 {
	t.Helper()
	mfs, err := metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			if g := m.GetGauge(); g != nil {
				return g.GetValue()
			}
		}
	}
	t.Fatalf("metric %s is not registered", name)
	return 0
}

// TestConfigurationAppliesAreRateBound: a configuration over many twins
// does not send its applies as fast as the API server takes them: past a
// burst of --max-configuration-applies, they wait for
// --configuration-applies-per-second (defaults 4 and 50/s here); every
// twin still gets the content. Whether an apply waits depends on the API
// server being faster than the rate, which a loaded machine's is not (4
// applies in flight taking 80 ms or more each never wait: the throttled
// counter stayed at 0 at load 14); TestApplierRateBound shows the waits
// against an API server that answers at once.
func TestConfigurationAppliesAreRateBound(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	const n = 40
	for i := range n {
		createTwin(t, ns, fmt.Sprintf("t%02d", i), fmt.Sprintf("%s-%02d", ns, i), "", "")
	}
	start := time.Now()
	createConfig(t, ns, "many", 0, "*", `{"firmware":{"channel":"beta"}}`)
	g.Eventually(func(g Gomega) {
		c := getConfig(g, ns, "many")
		g.Expect(c.Status.AppliedCount).To(BeEquivalentTo(n))
	}, wait, tick).Should(Succeed())
	elapsed := time.Since(start)
	// 40 applies with a burst of 4 at 50/s take at least 0.72 s whatever
	// the machine's speed; without the limiter, on a quiet machine, they
	// take what the API server takes.
	g.Expect(elapsed).To(BeNumerically(">=", time.Duration(float64(n-controllers.DefaultMaxConfigurationApplies)/controllers.DefaultConfigurationAppliesPerSecond*float64(time.Second))))
	g.Expect(registryValue(t, "kubetwin_configuration_applies_in_flight")).To(BeNumerically("<=", controllers.DefaultMaxConfigurationApplies))
}
