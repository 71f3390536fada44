package e2e

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	. "github.com/onsi/gomega"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// Bridge metrics the test follows, scraped from the operator process.
const (
	metricTwinsInMemory = "kubetwin_bridge_twins_in_memory"
	metricIdleDropped   = "kubetwin_bridge_idle_states_dropped_total"
	metricIdleReloaded  = "kubetwin_bridge_idle_states_reloaded_total"
)

// TestIdleStateDropAndReload: with --bridge-idle-state-ttl=1s the bridge
// drops the working state of a twin whose device went away, and a device
// that comes back sees exactly what it would have seen had the state been
// kept: the same retained desired document (not published again), the same
// GET answer, a resent report answered with the version it got (and not
// stored again), and the next reported and desired $version after those it
// had. Dropped again, the state is loaded by the reconcile of a desired
// change made while the device is away, which gets the next version too.
// The unit tests of internal/bridge drive the same code on a simulated
// cache; here the state goes through a real kube-apiserver and broker.
func TestIdleStateDropAndReload(t *testing.T) {
	forEachBroker(t, testIdleStateDropAndReload)
}

func testIdleStateDropAndReload(t *testing.T, kind brokerKind) {
	g := NewWithT(t)
	ns := newNamespace(t)
	var addr string
	if kind == mosquittoBroker {
		addr = startMosquitto(t)
	}
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	op := newOperator(t, kind, ns, addr)
	op.extraArgs = []string{"--bridge-idle-state-ttl=1s", "--metrics-bind-address=" + metrics, "--metrics-secure=false"}
	op.start()
	metric := func(g Gomega, name string) float64 { return metricSum(g, metrics, name) }

	id := "Idle-" + randomSuffix()
	name := strings.ToLower(id)
	createTwin(t, ns, name, id, `{"mode":"eco","telemetry":{"intervalSecs":5}}`)
	g.Expect(waitObserved(t, ns, name).Status.DesiredVersion).To(Equal(int64(1)))

	// The device's first session: two reports, the desired version
	// acknowledged, a GET.
	dev := connectIdleDevice(t, kind, op.brokerAddr, id)
	firstDesired := dev.waitFor(t, "the retained desired document", protocol.DesiredTopic(id), 1)
	g.Expect(firstDesired.retained).To(BeTrue(), "%s", firstDesired)
	g.Expect(firstDesired.json(t)).To(Equal(obj{"$version": num("1"), "mode": "eco", "telemetry": obj{"intervalSecs": num("5")}}))
	resent := `{"temperature":21.5,"firmware":{"version":"1.0.0"}}`
	g.Expect(dev.request(t, protocol.ReportedTopic(id, "r1"), `{"temperature":20}`, "r1")).
		To(Equal(obj{"status": num("204"), "version": num("1")}))
	g.Expect(dev.request(t, protocol.ReportedTopic(id, "r2"), resent, "r2")).
		To(Equal(obj{"status": num("204"), "version": num("2")}))
	dev.publish(t, protocol.AckTopic(id), `{"$version":1}`, false)
	g.Eventually(func(g Gomega) {
		st := getTwin(g, ns, name).Status
		g.Expect(st.ReportedVersion).To(Equal(int64(2)), "status.reportedVersion")
		g.Expect(st.DeviceDesiredVersion).To(Equal(int64(1)), "status.deviceDesiredVersion")
	}, wait, tick).Should(Succeed())
	get := dev.request(t, protocol.GetTopic(id, "g1"), "", "g1")
	g.Expect(get).To(Equal(obj{
		"status":   num("200"),
		"desired":  obj{"$version": num("1"), "mode": "eco", "telemetry": obj{"intervalSecs": num("5")}},
		"reported": obj{"$version": num("2"), "temperature": num("21.5"), "firmware": obj{"version": "1.0.0"}},
	}))

	// Connected, the device's state is in memory.
	var droppedBefore float64
	g.Eventually(func(g Gomega) {
		g.Expect(metric(g, metricTwinsInMemory)).To(Equal(1.0), metricTwinsInMemory)
		droppedBefore = metric(g, metricIdleDropped)
	}, wait, tick).Should(Succeed())

	// The device goes away; once the status shows it, the state is idle.
	dev.disconnect(t)
	var before v1alpha1.DeviceTwinStatus
	var beforeRV string
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, name)
		before, beforeRV = tw.Status, tw.ResourceVersion
		g.Expect(before.ConnectionState).To(Equal(v1alpha1.ConnectionStateDisconnected), "status.connectionState")
	}, wait, tick).Should(Succeed())
	g.Expect(before.ReportedVersion).To(Equal(int64(2)), "status.reportedVersion")
	g.Expect(before.Metadata).NotTo(BeNil(), "status.metadata")

	// Dropped after the TTL: nothing of the twin is left in memory.
	var reloadedAfterDrop float64
	g.Eventually(func(g Gomega) {
		g.Expect(metric(g, metricTwinsInMemory)).To(BeZero(), metricTwinsInMemory)
		g.Expect(metric(g, metricIdleDropped)).To(Equal(droppedBefore+1), metricIdleDropped)
		reloadedAfterDrop = metric(g, metricIdleReloaded)
	}, wait, tick).Should(Succeed(), "the idle twin's state was not dropped")
	// Dropping writes nothing.
	g.Expect(getTwin(g, ns, name).ResourceVersion).To(Equal(beforeRV), "the twin was written after the device went away")

	// The device comes back: its presence loads the state from the cached
	// status and what the status does not hold (request ids, retained).
	dev = connectIdleDevice(t, kind, op.brokerAddr, id)
	again := dev.waitFor(t, "the retained desired document after the drop", protocol.DesiredTopic(id), 1)
	g.Expect(again.retained).To(BeTrue(), "%s", again)
	g.Expect(again.payload).To(Equal(firstDesired.payload), "the retained desired document changed")
	g.Eventually(func(g Gomega) {
		g.Expect(metric(g, metricIdleReloaded)).To(BeNumerically(">", reloadedAfterDrop), metricIdleReloaded)
		g.Expect(metric(g, metricTwinsInMemory)).To(Equal(1.0), metricTwinsInMemory)
	}, wait, tick).Should(Succeed(), "the state was not loaded again")

	g.Expect(dev.request(t, protocol.GetTopic(id, "g2"), "", "g2")).To(Equal(get), "GET after the reload")
	// A resend of the last report (same rid and payload, as a device that
	// got no answer sends it) is answered with the version it got.
	g.Expect(dev.request(t, protocol.ReportedTopic(id, "r2"), resent, "r2")).
		To(Equal(obj{"status": num("204"), "version": num("2")}), "the resent report")
	g.Expect(dev.request(t, protocol.ReportedTopic(id, "r1"), `{"temperature":20}`, "r1")).
		To(Equal(obj{"status": num("204"), "version": num("1")}), "the resent first report")
	// A new report gets the next version: the resend was not stored.
	g.Expect(dev.request(t, protocol.ReportedTopic(id, "r3"), `{"temperature":22}`, "r3")).
		To(Equal(obj{"status": num("204"), "version": num("3")}), "the report after the reload")
	g.Eventually(func(g Gomega) {
		st := getTwin(g, ns, name).Status
		g.Expect(st.ReportedVersion).To(Equal(int64(3)), "status.reportedVersion")
		g.Expect(doc(st.Reported)).To(Equal(obj{"temperature": num("22"), "firmware": obj{"version": "1.0.0"}}), "status.reported")
		// What the new report did not touch keeps its $metadata.
		g.Expect(doc(st.Metadata.Reported)["firmware"]).To(Equal(doc(before.Metadata.Reported)["firmware"]), "status.metadata.reported.firmware")
	}, wait, tick).Should(Succeed())

	// Desired goes on from the version the device has.
	patchTwin(t, ns, name, `{"spec":{"desired":{"mode":"boost"}}}`)
	patch := dev.waitFor(t, "desired patch version 2", protocol.DesiredPatchTopic(id), 1)
	g.Expect(patch.json(t)).To(Equal(obj{"$version": num("2"), "mode": "boost"}))
	full := dev.waitFor(t, "desired document version 2", protocol.DesiredTopic(id), 2)
	g.Expect(full.json(t)).To(Equal(obj{"$version": num("2"), "mode": "boost", "telemetry": obj{"intervalSecs": num("5")}}),
		"the second desired document since the device came back (the first came on subscribing): the reload published version 1 again?")
	// The reload did not publish the unchanged document again: the device
	// got it once, on subscribing, then version 2.
	g.Expect(dev.topics(protocol.DesiredTopic(id), protocol.DesiredPatchTopic(id))).To(Equal([]string{
		protocol.DesiredTopic(id) + " " + firstDesired.payload,
		protocol.DesiredPatchTopic(id) + " " + patch.payload,
		protocol.DesiredTopic(id) + " " + full.payload,
	}), "desired messages since the device came back")
	dev.publish(t, protocol.AckTopic(id), `{"$version":2}`, false)
	g.Eventually(func(g Gomega) {
		st := getTwin(g, ns, name).Status
		g.Expect(st.DesiredVersion).To(Equal(int64(2)), "status.desiredVersion")
		g.Expect(st.DeviceDesiredVersion).To(Equal(int64(2)), "status.deviceDesiredVersion")
	}, wait, tick).Should(Succeed())

	// Away again, the state dropped again; desired changes meanwhile: the
	// reconcile loads the state and publishes version 3.
	droppedBefore = metric(g, metricIdleDropped)
	dev.disconnect(t)
	g.Eventually(func(g Gomega) {
		g.Expect(getTwin(g, ns, name).Status.ConnectionState).To(Equal(v1alpha1.ConnectionStateDisconnected), "status.connectionState")
		g.Expect(metric(g, metricTwinsInMemory)).To(BeZero(), metricTwinsInMemory)
		g.Expect(metric(g, metricIdleDropped)).To(Equal(droppedBefore+1), metricIdleDropped)
		reloadedAfterDrop = metric(g, metricIdleReloaded)
	}, wait, tick).Should(Succeed(), "the idle twin's state was not dropped a second time")
	patchTwin(t, ns, name, `{"spec":{"desired":{"telemetry":{"intervalSecs":60}}}}`)
	g.Eventually(func(g Gomega) {
		g.Expect(getTwin(g, ns, name).Status.DesiredVersion).To(Equal(int64(3)), "status.desiredVersion")
		g.Expect(metric(g, metricIdleReloaded)).To(BeNumerically(">", reloadedAfterDrop), metricIdleReloaded)
	}, wait, tick).Should(Succeed())

	// The device comes back to the retained version 3, and its GET has
	// the reported document it left.
	dev = connectIdleDevice(t, kind, op.brokerAddr, id)
	want3 := obj{"$version": num("3"), "mode": "boost", "telemetry": obj{"intervalSecs": num("60")}}
	m := dev.waitFor(t, "the retained desired document version 3", protocol.DesiredTopic(id), 1)
	g.Expect(m.retained).To(BeTrue(), "%s", m)
	g.Expect(m.json(t)).To(Equal(want3))
	g.Expect(dev.request(t, protocol.GetTopic(id, "g3"), "", "g3")).To(Equal(obj{
		"status":   num("200"),
		"desired":  want3,
		"reported": obj{"$version": num("3"), "temperature": num("22"), "firmware": obj{"version": "1.0.0"}},
	}), "GET after the second reload")
	dev.publish(t, protocol.AckTopic(id), `{"$version":3}`, false)
	g.Eventually(func(g Gomega) {
		g.Expect(getTwin(g, ns, name).Status.DeviceDesiredVersion).To(Equal(int64(3)), "status.deviceDesiredVersion")
	}, wait, tick).Should(Succeed())
	g.Expect(dev.topics(protocol.DesiredTopic(id), protocol.DesiredPatchTopic(id))).To(HaveLen(1),
		"desired messages since the device came back the second time: only the retained document")
}

// idleMessage is a message an idleDevice received.
type idleMessage struct {
	topic, payload string
	retained       bool
}

func (m idleMessage) String() string {
	return fmt.Sprintf("%s retained=%v %s", m.topic, m.retained, m.payload)
}

func (m idleMessage) json(t *testing.T) map[string]any {
	t.Helper()
	out := map[string]any{}
	if err := decodeJSON([]byte(m.payload), &out); err != nil {
		t.Fatalf("%s: %v", m, err)
	}
	return out
}

// idleDevice is a device on a raw MQTT connection, so the test chooses its
// request ids (to resend one). With Mosquitto it announces its presence
// itself; the embedded broker tells the operator of connections.
type idleDevice struct {
	kind brokerKind
	id   string
	c    paho.Client

	mu  sync.Mutex
	got []idleMessage
}

func connectIdleDevice(t *testing.T, kind brokerKind, addr, id string) *idleDevice {
	t.Helper()
	d := &idleDevice{kind: kind, id: id}
	o := paho.NewClientOptions().AddBroker("tcp://"+addr).SetClientID(id).SetProtocolVersion(4).
		SetCleanSession(true).SetAutoReconnect(false).SetConnectTimeout(5*time.Second).
		SetWill(protocol.PresenceTopic(id), `{"online":false}`, 1, true).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
			d.mu.Lock()
			d.got = append(d.got, idleMessage{topic: m.Topic(), payload: string(m.Payload()), retained: m.Retained()})
			d.mu.Unlock()
		})
	d.c = paho.NewClient(o)
	if tok := d.c.Connect(); !tok.WaitTimeout(wait) || tok.Error() != nil {
		t.Fatalf("device %s connecting to %s: %v", id, addr, tok.Error())
	}
	t.Cleanup(func() { d.c.Disconnect(0) })
	for _, f := range []string{protocol.ResponseFilter(id), protocol.DesiredFilter(id)} {
		if tok := d.c.Subscribe(f, 1, nil); !tok.WaitTimeout(wait) || tok.Error() != nil {
			t.Fatalf("device %s subscribing to %s: %v", id, f, tok.Error())
		}
	}
	if kind == mosquittoBroker {
		d.publish(t, protocol.PresenceTopic(id), `{"online":true}`, true)
	}
	return d
}

func (d *idleDevice) publish(t *testing.T, topic, payload string, retained bool) {
	t.Helper()
	if tok := d.c.Publish(topic, 1, retained, payload); !tok.WaitTimeout(wait) || tok.Error() != nil {
		t.Fatalf("device %s publishing on %s: %v", d.id, topic, tok.Error())
	}
}

// disconnect ends the session as a device shutting down does: with
// Mosquitto it says it goes offline first.
func (d *idleDevice) disconnect(t *testing.T) {
	t.Helper()
	if d.kind == mosquittoBroker {
		d.publish(t, protocol.PresenceTopic(d.id), `{"online":false}`, true)
	}
	d.c.Disconnect(250)
}

// received returns the messages received on topic.
func (d *idleDevice) received(topic string) []idleMessage {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []idleMessage
	for _, m := range d.got {
		if m.topic == topic {
			out = append(out, m)
		}
	}
	return out
}

// topics returns "topic payload" of the messages received on any of
// topics, in order.
func (d *idleDevice) topics(topics ...string) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for _, m := range d.got {
		for _, tp := range topics {
			if m.topic == tp {
				out = append(out, m.topic+" "+m.payload)
			}
		}
	}
	return out
}

// waitFor waits for the n-th message on topic and returns it.
func (d *idleDevice) waitFor(t *testing.T, what, topic string, n int) idleMessage {
	t.Helper()
	var m idleMessage
	NewWithT(t).Eventually(func() int {
		got := d.received(topic)
		if len(got) >= n {
			m = got[n-1]
		}
		return len(got)
	}, wait, 10*time.Millisecond).Should(BeNumerically(">=", n), "device %s: %s (message %d on %s)", d.id, what, n, topic)
	return m
}

// request publishes payload on topic and returns the answer to rid that
// follows (a rid used again gets a second answer on the same topic).
func (d *idleDevice) request(t *testing.T, topic, payload, rid string) map[string]any {
	t.Helper()
	resp := protocol.ResponseTopic(d.id, rid)
	n := len(d.received(resp))
	d.publish(t, topic, payload, false)
	return d.waitFor(t, "the answer to "+topic, resp, n+1).json(t)
}
