package e2e

import (
	"context"
	"testing"

	. "github.com/onsi/gomega"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// TestIoTHubConfigurations runs IoT Hub's automatic device configurations
// through the unmodified service SDK (registry.addConfiguration,
// getConfiguration, getConfigurations, updateConfiguration with an etag
// and forced, removeConfiguration, applyConfigurationContentOnDevice)
// against the operator: the configuration is a TwinConfiguration, its
// content reaches the targeted twins' spec and a device, the service
// query language finds the twins by configurations.[[id]].status, and
// removing it takes the content away again.
func TestIoTHubConfigurations(t *testing.T) {
	requireNodeSDKs(t)
	h := startHub(t)
	g := NewWithT(t)
	ctx := context.Background()
	const cfg = "telemetry-30s"
	label := v1alpha1.ConfigurationsLabelPrefix + cfg
	for name, plant := range map[string]string{"cfg-dev-1": "Redmond43", "cfg-dev-2": "Redmond43", "cfg-dev-3": "Munich7"} {
		createTwin(t, h.ns, name, name, `{"firmware":"1.0"}`)
		patchTwin(t, h.ns, name, `{"spec":{"tags":{"location":{"plant":"`+plant+`"}}}}`)
		waitObserved(t, h.ns, name)
	}

	out := h.run(t, h.service(), "Configurations.js", "create", "cfg-dev-1")
	g.Expect(out).To(Equal([]string{
		"added " + cfg + " schemaVersion 1.0 etag set",
		"add again: DeviceAlreadyExistsError",
		`got priority 10 content {"properties.desired.telemetry":{"interval":30}} targetCondition tags.location.plant='Redmond43' labels {"team":"ops"}`,
		"listed " + cfg,
		"updated priority 20, etag changed true",
		"stale etag: InvalidEtagError",
		"forced priority 30",
		"applied to cfg-dev-1",
	}))

	// The configuration is a TwinConfiguration of the registry namespace.
	c := &v1alpha1.TwinConfiguration{}
	g.Expect(k8s.Get(ctx, client.ObjectKey{Namespace: h.ns, Name: cfg}, c)).To(Succeed())
	g.Expect(c.Spec.Priority).To(BeEquivalentTo(30))
	g.Expect(c.Spec.TargetCondition).To(Equal("tags.location.plant='Redmond43'"))
	g.Expect(doc(c.Spec.Content.Desired)).To(Equal(obj{"telemetry": obj{"interval": num("30")}}))
	g.Expect(c.Labels).To(Equal(map[string]string{"team": "ops"}))
	g.Expect(c.Spec.Metrics).To(HaveLen(1))

	// The operator gives the targeted twins the content (the applied
	// content of cfg-dev-1 is its own desired property, mode).
	for _, name := range []string{"cfg-dev-1", "cfg-dev-2"} {
		g.Eventually(func(g Gomega) {
			tw := getTwin(g, h.ns, name)
			g.Expect(doc(tw.Spec.Desired)).To(HaveKeyWithValue("telemetry", obj{"interval": num("30")}))
			g.Expect(tw.Labels).To(HaveKeyWithValue(label, v1alpha1.ConfigurationApplied))
		}, wait, tick).Should(Succeed(), "twin %s did not get the configuration's content", name)
	}
	g.Expect(doc(getTwin(g, h.ns, "cfg-dev-1").Spec.Desired)).To(HaveKeyWithValue("mode", "eco"))
	tw3 := getTwin(g, h.ns, "cfg-dev-3")
	g.Expect(doc(tw3.Spec.Desired)).NotTo(HaveKey("telemetry"))
	g.Expect(tw3.Labels).NotTo(HaveKey(label))

	// The service SDK's query finds them by the configuration's status.
	g.Expect(h.run(t, h.service(), "QueryRows.js",
		"SELECT deviceId FROM devices WHERE configurations.[["+cfg+"]].status = 'Applied'", "10")).To(Equal([]string{
		`page 1: [{"deviceId":"cfg-dev-1"},{"deviceId":"cfg-dev-2"}]`, "done",
	}))

	// A device gets the content and reports it back: it is in sync.
	dev := h.startNode(t, map[string]string{"DEVICE_CONNECTION_STRING": h.deviceCS(t, "cfg-dev-2")}, "DesiredDevice.js")
	dev.waitOutput("ready")
	dev.waitOutput(`"telemetry":{"interval":30}`)
	dev.send(`report {"telemetry":{"interval":30}}`)
	dev.waitOutput(`reported {"telemetry":{"interval":30}}`)
	g.Eventually(func(g Gomega) {
		c := &v1alpha1.TwinConfiguration{}
		g.Expect(k8s.Get(ctx, client.ObjectKey{Namespace: h.ns, Name: cfg}, c)).To(Succeed())
		g.Expect(c.Status.TargetedCount).To(BeEquivalentTo(2))
		g.Expect(c.Status.AppliedCount).To(BeEquivalentTo(2))
		g.Expect(c.Status.InSyncCount).To(BeEquivalentTo(1))
		g.Expect(c.Status.Metrics).To(ConsistOf(v1alpha1.ConfigurationMetricResult{Name: "inSync", Count: 1}))
	}, wait, tick).Should(Succeed())

	// Removed through the SDK: the content leaves the twins (what the
	// apply wrote to cfg-dev-1 as its own desired property stays).
	out = h.run(t, h.service(), "Configurations.js", "remove")
	g.Expect(out).To(Equal([]string{"removed " + cfg, "get after remove: Not found"}))
	for _, name := range []string{"cfg-dev-1", "cfg-dev-2"} {
		g.Eventually(func(g Gomega) {
			tw := getTwin(g, h.ns, name)
			g.Expect(doc(tw.Spec.Desired)).NotTo(HaveKey("telemetry"))
			g.Expect(tw.Labels).NotTo(HaveKey(label))
		}, wait, tick).Should(Succeed(), "twin %s kept the removed configuration's content", name)
	}
	g.Expect(doc(getTwin(g, h.ns, "cfg-dev-1").Spec.Desired)).To(Equal(obj{"firmware": "1.0", "mode": "eco"}))
	g.Eventually(func() bool {
		return apierrors.IsNotFound(k8s.Get(ctx, client.ObjectKey{Namespace: h.ns, Name: cfg}, &v1alpha1.TwinConfiguration{}))
	}, wait, tick).Should(BeTrue(), "the TwinConfiguration was not deleted")
}
