package controllers_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/pkg/device"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

const (
	wait = 20 * time.Second
	tick = 50 * time.Millisecond
)

func rawJSON(t *testing.T, s string) *apiextensionsv1.JSON {
	t.Helper()
	if !json.Valid([]byte(s)) {
		t.Fatalf("bad JSON in test: %s", s)
	}
	return &apiextensionsv1.JSON{Raw: []byte(s)}
}

func newNamespace(t *testing.T) string {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "t-"}}
	if err := k8s.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
	return ns.Name
}

func createTwin(t *testing.T, ns, name, id, tags, desired string) *v1alpha1.DeviceTwin {
	t.Helper()
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	tw.Spec.DeviceID = id
	if tags != "" {
		tw.Spec.Tags = rawJSON(t, tags)
	}
	if desired != "" {
		tw.Spec.Desired = rawJSON(t, desired)
	}
	if err := k8s.Create(context.Background(), tw); err != nil {
		t.Fatal(err)
	}
	return tw
}

// waitObserved waits until the operator has reconciled a twin's spec.
func waitObserved(t *testing.T, ns, name string) {
	t.Helper()
	NewWithT(t).Eventually(func(g Gomega) {
		tw := getTwin(g, ns, name)
		g.Expect(tw.Status.ObservedGeneration).To(Equal(tw.Generation))
	}, wait, tick).Should(Succeed())
}

// setSpec merge-patches a twin.
func setSpec(t *testing.T, ns, name, patch string) {
	t.Helper()
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if err := k8s.Patch(context.Background(), tw, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
		t.Fatal(err)
	}
}

func getTwin(g Gomega, ns, name string) *v1alpha1.DeviceTwin {
	tw := &v1alpha1.DeviceTwin{}
	g.Expect(k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, tw)).To(Succeed())
	return tw
}

func cond(tw *v1alpha1.DeviceTwin, typ string) metav1.Condition {
	c := meta.FindStatusCondition(tw.Status.Conditions, typ)
	if c == nil {
		return metav1.Condition{}
	}
	return *c
}

func doc(j *apiextensionsv1.JSON) map[string]any {
	out := map[string]any{}
	if j != nil {
		_ = json.Unmarshal(j.Raw, &out)
	}
	return out
}

func connect(t *testing.T, id string, onDesired func(device.Update)) *device.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := device.Connect(ctx, device.Options{BrokerURL: brokerURL, DeviceID: id, OnDesired: onDesired})
	if err != nil {
		t.Fatalf("device %s: %v", id, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// updates collects desired updates a device receives.
type updates struct {
	mu  sync.Mutex
	all []device.Update
}

func (u *updates) add(x device.Update) { u.mu.Lock(); u.all = append(u.all, x); u.mu.Unlock() }
func (u *updates) list() []device.Update {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]device.Update(nil), u.all...)
}

// The getting-started scenario through the real API server and broker.
func TestScenario(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	createTwin(t, ns, "mydeviceid", "myDeviceId",
		`{"location":{"region":"US","plant":"Redmond43"}}`, `{"telemetryConfig":{"sendFrequencyInSecs":60}}`)

	// Tags become labels; the twin is found by label; nothing connected yet.
	g.Eventually(func(g Gomega) {
		var list v1alpha1.DeviceTwinList
		g.Expect(k8s.List(ctx, &list, client.InNamespace(ns), client.MatchingLabels{"location.plant": "Redmond43"})).To(Succeed())
		g.Expect(list.Items).To(HaveLen(1))
		tw := list.Items[0]
		g.Expect(tw.Labels).To(HaveKeyWithValue("location.region", "US"))
		g.Expect(tw.Finalizers).To(ContainElement(controllers.Finalizer))
		g.Expect(tw.Status.DeviceID).To(Equal("myDeviceId"))
		g.Expect(tw.Status.DesiredVersion).To(BeEquivalentTo(1))
		g.Expect(cond(&tw, v1alpha1.ConditionConnected).Reason).To(Equal(v1alpha1.ReasonNeverConnected))
		g.Expect(cond(&tw, v1alpha1.ConditionInSync).Reason).To(Equal(v1alpha1.ReasonDesiredNotSeen))
		g.Expect(tw.Status.ObservedGeneration).To(Equal(tw.Generation))
	}, wait, tick).Should(Succeed())

	// The device connects and gets its desired state.
	var got updates
	dev := connect(t, "myDeviceId", got.add)
	desired, v := dev.Desired()
	g.Expect(v).To(BeEquivalentTo(1))
	g.Expect(fmt.Sprint(desired)).To(Equal("map[telemetryConfig:map[sendFrequencyInSecs:60]]"))

	// It reports cellular connectivity; the report is persisted before the 204.
	rv, err := dev.Report(ctx, map[string]any{"connectivity": map[string]any{"type": "cellular"}})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(rv).To(BeEquivalentTo(1))
	tw := getTwin(g, ns, "mydeviceid")
	g.Expect(doc(tw.Status.Reported)).To(HaveKeyWithValue("connectivity", map[string]any{"type": "cellular"}))
	g.Expect(tw.Status.ReportedVersion).To(BeEquivalentTo(1))
	g.Expect(tw.Status.DeltaCount).To(BeEquivalentTo(1))
	g.Expect(doc(tw.Status.Metadata.Reported)).To(HaveKey("connectivity"))

	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "mydeviceid")
		g.Expect(cond(tw, v1alpha1.ConditionConnected).Status).To(Equal(metav1.ConditionTrue))
		g.Expect(tw.Status.ConnectionState).To(Equal(v1alpha1.ConnectionStateConnected))
		g.Expect(cond(tw, v1alpha1.ConditionInSync).Reason).To(Equal(v1alpha1.ReasonConverging))
	}, wait, tick).Should(Succeed())

	// It applies the desired value: in sync.
	_, err = dev.Report(ctx, map[string]any{"telemetryConfig": map[string]any{"sendFrequencyInSecs": 60}})
	g.Expect(err).NotTo(HaveOccurred())
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "mydeviceid")
		g.Expect(cond(tw, v1alpha1.ConditionInSync).Status).To(Equal(metav1.ConditionTrue))
		g.Expect(tw.Status.Delta).To(BeNil())
	}, wait, tick).Should(Succeed())

	// A desired change reaches the device as a patch with the next version,
	// and InSync drops until the device reports it.
	setSpec(t, ns, "mydeviceid", `{"spec":{"desired":{"telemetryConfig":{"sendFrequencyInSecs":30}}}}`)
	g.Eventually(func(g Gomega) {
		us := got.list()
		g.Expect(us).NotTo(BeEmpty())
		last := us[len(us)-1]
		g.Expect(last.Version).To(BeEquivalentTo(2))
		g.Expect(fmt.Sprint(last.Patch)).To(Equal("map[telemetryConfig:map[sendFrequencyInSecs:30]]"))
	}, wait, tick).Should(Succeed())
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "mydeviceid")
		g.Expect(tw.Status.DesiredVersion).To(BeEquivalentTo(2))
		g.Expect(tw.Status.DeviceDesiredVersion).To(BeEquivalentTo(2))
		g.Expect(cond(tw, v1alpha1.ConditionInSync).Reason).To(Equal(v1alpha1.ReasonConverging))
		g.Expect(doc(tw.Status.Delta)).To(HaveKeyWithValue("telemetryConfig", map[string]any{"sendFrequencyInSecs": float64(30)}))
	}, wait, tick).Should(Succeed())

	// Deleting a desired key is sent as null.
	setSpec(t, ns, "mydeviceid", `{"spec":{"desired":{"telemetryConfig":null}}}`)
	g.Eventually(func(g Gomega) {
		us := got.list()
		last := us[len(us)-1]
		g.Expect(last.Version).To(BeEquivalentTo(3))
		g.Expect(last.Patch).To(HaveKeyWithValue("telemetryConfig", BeNil()))
		g.Expect(last.Desired).To(BeEmpty())
	}, wait, tick).Should(Succeed())
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "mydeviceid")
		g.Expect(cond(tw, v1alpha1.ConditionInSync).Status).To(Equal(metav1.ConditionTrue))
	}, wait, tick).Should(Succeed())

	// Reported null deletes.
	rv, err = dev.Report(ctx, map[string]any{"connectivity": nil})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(rv).To(BeEquivalentTo(3))
	tw = getTwin(g, ns, "mydeviceid")
	g.Expect(doc(tw.Status.Reported)).NotTo(HaveKey("connectivity"))

	// Disconnect shows.
	g.Expect(dev.Close()).To(Succeed())
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "mydeviceid")
		g.Expect(cond(tw, v1alpha1.ConditionConnected).Reason).To(Equal(v1alpha1.ReasonDisconnected))
		g.Expect(tw.Status.ConnectionState).To(Equal(v1alpha1.ConnectionStateDisconnected))
		g.Expect(tw.Status.LastActivityTime).NotTo(BeNil())
	}, wait, tick).Should(Succeed())
}

// A bad reported patch gets an error naming the path and rule, and changes nothing.
func TestBadReportRefused(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	createTwin(t, ns, "bad", "bad-1", "", "")
	waitObserved(t, ns, "bad")
	dev := connect(t, "bad-1", nil)
	_, err := dev.Report(ctx, map[string]any{"ok": 1})
	g.Expect(err).NotTo(HaveOccurred())

	cases := map[string]struct {
		patch map[string]any
		msg   string
	}{
		"array":      {map[string]any{"telemetry": map[string]any{"intervals": []any{1, 2}}}, "reported.telemetry.intervals: arrays are not allowed in device twins"},
		"dot key":    {map[string]any{"a.b": 1}, "must not contain '.'"},
		"$ key":      {map[string]any{"$version": 7}, "read-only"},
		"long value": {map[string]any{"s": strings.Repeat("x", 4097)}, "reported.s"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			g := NewWithT(t)
			_, err := dev.Report(ctx, tc.patch)
			var re *device.RequestError
			g.Expect(errors.As(err, &re)).To(BeTrue(), "error %v", err)
			g.Expect(re.Status).To(Equal(protocol.StatusBadRequest))
			g.Expect(re.Message).To(ContainSubstring(tc.msg))
		})
	}
	tw := getTwin(g, ns, "bad")
	g.Expect(tw.Status.ReportedVersion).To(BeEquivalentTo(1))
	g.Expect(doc(tw.Status.Reported)).To(Equal(map[string]any{"ok": float64(1)}))
}

// Labels follow tags exactly, and labels the user set are left alone.
func TestTagLabelsFollowTags(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	tw := createTwin(t, ns, "labels", "", `{"site":{"name":"north","floor":3},"ok":true,"bad":"has space","deep":{"x":{"y":"z"}}}`, "")
	base := tw.DeepCopy()
	tw.Labels = map[string]string{"team": "ops"}
	g.Expect(k8s.Patch(ctx, tw, client.MergeFrom(base))).To(Succeed())
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "labels")
		g.Expect(tw.Labels).To(Equal(map[string]string{
			"team": "ops", "site.name": "north", "site.floor": "3", "ok": "true", "deep.x.y": "z",
		}))
		g.Expect(tw.Status.DeviceID).To(Equal("labels"))
	}, wait, tick).Should(Succeed())

	setSpec(t, ns, "labels", `{"spec":{"tags":{"site":{"name":"south","floor":null},"ok":null,"bad":null,"deep":null}}}`)
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "labels")
		g.Expect(tw.Labels).To(Equal(map[string]string{"team": "ops", "site.name": "south"}))
	}, wait, tick).Should(Succeed())

	// A mirrored label someone removes comes back.
	tw = getTwin(g, ns, "labels")
	g.Expect(k8s.Patch(ctx, tw, client.RawPatch(types.MergePatchType, []byte(`{"metadata":{"labels":{"site.name":null}}}`)))).To(Succeed())
	g.Eventually(func(g Gomega) {
		g.Expect(getTwin(g, ns, "labels").Labels).To(HaveKeyWithValue("site.name", "south"))
	}, wait, tick).Should(Succeed())
}

// Invalid desired state is not sent, and InSync says why.
func TestInvalidDesiredNotSent(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "inv", "inv-1", "", `{"mode":"eco"}`)
	g.Eventually(func(g Gomega) {
		g.Expect(getTwin(g, ns, "inv").Status.DesiredVersion).To(BeEquivalentTo(1))
	}, wait, tick).Should(Succeed())
	var got updates
	dev := connect(t, "inv-1", got.add)
	_, v := dev.Desired()
	g.Expect(v).To(BeEquivalentTo(1))

	setSpec(t, ns, "inv", `{"spec":{"desired":{"telemetry":{"intervals":[1,2]}}}}`)
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "inv")
		c := cond(tw, v1alpha1.ConditionInSync)
		g.Expect(c.Reason).To(Equal(v1alpha1.ReasonInvalidDesired))
		g.Expect(c.Message).To(ContainSubstring("spec.desired.telemetry.intervals: arrays are not allowed in device twins"))
		g.Expect(c.ObservedGeneration).To(Equal(tw.Generation))
		g.Expect(tw.Status.DesiredVersion).To(BeEquivalentTo(1))
	}, wait, tick).Should(Succeed())
	g.Expect(got.list()).To(HaveLen(1)) // version 1, applied at connect
	g.Consistently(func() int { return len(got.list()) }, time.Second, tick).Should(Equal(1))
	_, v = dev.Desired()
	g.Expect(v).To(BeEquivalentTo(1))
}

// Many reports from one device are coalesced into far fewer status writes,
// and the final state is exactly the last report. The writes are counted on
// a watch of this twin alone: every change of its status is one write.
func TestReportsCoalesced(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	createTwin(t, ns, "busy", "busy-1", "", "")
	waitObserved(t, ns, "busy")
	dev := connect(t, "busy-1", nil)

	// The state after the connect settled: Connected, version 0.
	var before *v1alpha1.DeviceTwin
	g.Eventually(func(g Gomega) {
		before = getTwin(g, ns, "busy")
		g.Expect(before.Status.ObservedGeneration).To(Equal(before.Generation))
		g.Expect(cond(before, v1alpha1.ConditionConnected).Status).To(BeEquivalentTo("True"))
	}, wait, tick).Should(Succeed())
	writes := watchStatusWrites(t, before)

	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := dev.Report(ctx, map[string]any{fmt.Sprintf("k%03d", i): i})
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		g.Expect(err).NotTo(HaveOccurred())
	}
	tw := getTwin(g, ns, "busy")
	g.Expect(tw.Status.ReportedVersion).To(BeEquivalentTo(n))
	g.Expect(doc(tw.Status.Reported)).To(HaveLen(n))

	// Every 204 came after its report was stored, so the watch has (or
	// is about to have) the write that reached version n.
	w := writes.until(t, func(tw *v1alpha1.DeviceTwin) bool { return tw.Status.ReportedVersion == n })
	t.Logf("%d reports -> %d status writes to the twin (reportedVersion after each: %v)", n, len(w), w)
	g.Expect(len(w)).To(BeNumerically("<", n/2), "reports were not coalesced: reportedVersion after each write %v", w)
}

// statusWrites follows one twin's status writes through a watch from a
// resource version on: a watch sees every change of the object, in order.
type statusWrites struct {
	mu       sync.Mutex
	versions []int64 // status.reportedVersion after each status write
	last     *v1alpha1.DeviceTwin
	changed  chan struct{}
	err      error
}

func watchStatusWrites(t *testing.T, from *v1alpha1.DeviceTwin) *statusWrites {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := k8s.Watch(ctx, &v1alpha1.DeviceTwinList{}, client.InNamespace(from.Namespace),
		client.MatchingFields{"metadata.name": from.Name},
		&client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: from.ResourceVersion}})
	if err != nil {
		cancel()
		t.Fatalf("watching DeviceTwin %s/%s: %v", from.Namespace, from.Name, err)
	}
	s := &statusWrites{last: from, changed: make(chan struct{})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range w.ResultChan() {
			tw, ok := ev.Object.(*v1alpha1.DeviceTwin)
			s.mu.Lock()
			switch {
			case !ok:
				s.err = fmt.Errorf("watch event %s: %v", ev.Type, ev.Object)
			case !equality.Semantic.DeepEqual(tw.Status, s.last.Status):
				s.versions = append(s.versions, tw.Status.ReportedVersion)
				s.last = tw
			}
			close(s.changed)
			s.changed = make(chan struct{})
			s.mu.Unlock()
		}
	}()
	t.Cleanup(func() { w.Stop(); cancel(); <-done })
	return s
}

// until waits until the last status written satisfies done and returns the
// reportedVersion after each write so far.
func (s *statusWrites) until(t *testing.T, done func(*v1alpha1.DeviceTwin) bool) []int64 {
	t.Helper()
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		last, versions, err, ch := s.last, append([]int64(nil), s.versions...), s.err, s.changed
		s.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		if done(last) {
			return versions
		}
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("the watch did not see the expected status within %s; writes so far (reportedVersion after each): %v", wait, versions)
		}
	}
}

// A device with no twin is told so.
func TestUnknownDevice(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	_, err := device.Connect(ctx, device.Options{BrokerURL: brokerURL, DeviceID: "nobody-here"})
	var re *device.RequestError
	if !errors.As(err, &re) || re.Status != protocol.StatusNotFound {
		t.Fatalf("want a 404 RequestError, got %v", err)
	}
}

// Deleting a twin clears its retained desired document, then lets it go.
func TestDeleteClearsRetained(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	createTwin(t, ns, "gone", "gone-1", "", `{"a":1}`)
	g.Eventually(func() (string, error) { return retained(protocol.DesiredTopic("gone-1")) }, wait, tick).Should(ContainSubstring(`"a":1`))

	tw := getTwin(g, ns, "gone")
	g.Expect(k8s.Delete(ctx, tw)).To(Succeed())
	g.Eventually(func() bool {
		err := k8s.Get(ctx, client.ObjectKeyFromObject(tw), &v1alpha1.DeviceTwin{})
		return apierrors.IsNotFound(err)
	}, wait, tick).Should(BeTrue())
	g.Expect(retained(protocol.DesiredTopic("gone-1"))).To(BeEmpty())
}

// retained returns the retained message on topic ("" if none within 500ms).
func retained(topic string) (string, error) {
	o := mqtt.NewClientOptions().AddBroker(brokerURL).SetClientID(fmt.Sprintf("probe-%d", time.Now().UnixNano()))
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		return "", fmt.Errorf("probe connect: %v", tok.Error())
	}
	defer c.Disconnect(50)
	ch := make(chan string, 1)
	c.Subscribe(topic, 1, func(_ mqtt.Client, m mqtt.Message) {
		select {
		case ch <- string(m.Payload()):
		default:
		}
	}).WaitTimeout(5 * time.Second)
	select {
	case s := <-ch:
		return s, nil
	case <-time.After(500 * time.Millisecond):
		return "", nil
	}
}

// A reported patch resent with the same request id is answered with the
// version the first copy got and not applied twice.
func TestResendSameRequestIDAppliedOnce(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "resend", "resend-1", "", "")
	waitObserved(t, ns, "resend")

	o := mqtt.NewClientOptions().AddBroker(brokerURL).SetClientID("resend-1")
	c := mqtt.NewClient(o)
	tok := c.Connect()
	g.Expect(tok.WaitTimeout(wait)).To(BeTrue())
	g.Expect(tok.Error()).NotTo(HaveOccurred())
	defer c.Disconnect(50)
	responses := make(chan protocol.Response, 4)
	c.Subscribe(protocol.ResponseFilter("resend-1"), 1, func(_ mqtt.Client, m mqtt.Message) {
		var r protocol.Response
		_ = json.Unmarshal(m.Payload(), &r)
		responses <- r
	}).WaitTimeout(wait)

	for range 2 {
		pt := c.Publish(protocol.ReportedTopic("resend-1", "same-rid"), 1, false, []byte(`{"n":1}`))
		g.Expect(pt.WaitTimeout(wait)).To(BeTrue())
		var r protocol.Response
		g.Eventually(responses, wait).Should(Receive(&r))
		g.Expect(r.Status).To(Equal(protocol.StatusNoContent))
		g.Expect(r.Version).To(BeEquivalentTo(1))
	}
	tw := getTwin(g, ns, "resend")
	g.Expect(tw.Status.ReportedVersion).To(BeEquivalentTo(1))
}
