package e2e

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"

	. "github.com/onsi/gomega"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// A device made of mosquitto_sub and mosquitto_pub (as in the worked
// session of docs/protocol.md, which TestDocSession runs from the document)
// receives desired changes as patches, deletions as null, and still gets
// the change made while the operator was stopped: Mosquitto kept the
// retained document meanwhile, the embedded broker gets it anew.
func TestDesiredAcrossOperatorRestart(t *testing.T) {
	forEachBroker(t, testDesiredAcrossOperatorRestart)
}

func testDesiredAcrossOperatorRestart(t *testing.T, kind brokerKind) {
	g := NewWithT(t)
	ns, op := setup(t, kind)
	addr := op.brokerAddr

	// Device ids with upper case letters, as in the document: the twin's
	// name is the lower-case form.
	sfx := randomSuffix()
	id := "RestartDevice-" + sfx
	name := strings.ToLower(id)
	lateID := "LateDevice-" + sfx
	lateName := strings.ToLower(lateID)
	createTwin(t, ns, name, id, `{"telemetryConfig":{"sendFrequencyInSecs":5},"mode":"eco"}`)
	createTwin(t, ns, lateName, lateID, `{"firmware":{"channel":"stable"}}`)
	g.Expect(waitObserved(t, ns, name).Status.DesiredVersion).To(Equal(int64(1)))
	g.Expect(waitObserved(t, ns, lateName).Status.DesiredVersion).To(Equal(int64(1)))

	prefix := protocol.DevicePrefix(id)
	g.Expect(prefix).To(Equal("kubetwin/v1/"+id), "the id needs no escaping")
	// The publisher is a second client, so it needs its own client id.
	pub := func(args ...string) { t.Helper(); mosquittoPub(t, addr, id+"-pub", args...) }
	// Terminal 1 of the document: the device's subscriptions, with the
	// device id as client id, a persistent session and the last will.
	deviceSub := func(what, clientID, p string) *mosquittoSub {
		return startSub(t, what, addr, "-i", clientID, "-c", "-q", "1",
			"--will-topic", p+"/presence", "--will-payload", `{"online":false}`, "--will-qos", "1", "--will-retain",
			"-t", p+"/res/+", "-t", p+"/desired/#")
	}

	sub := deviceSub("device", id, prefix)
	m := sub.waitFor("the retained desired document", prefix+"/desired", nil)
	g.Expect(m.Retained).To(BeTrue(), "%s", m)
	g.Expect(m.JSON()).To(Equal(obj{"$version": num("1"), "telemetryConfig": obj{"sendFrequencyInSecs": num("5")}, "mode": "eco"}), "%s", m)
	pub("-r", "-t", prefix+"/presence", "-m", `{"online":true}`)
	pub("-t", prefix+"/reported/r1", "-m", `{"connectivity":{"type":"cellular"}}`)
	m = sub.waitFor("the reported patch's response", prefix+"/res/r1", nil)
	g.Expect(m.JSON()).To(Equal(obj{"status": num("204"), "version": num("1")}), "%s", m)
	pub("-t", prefix+"/ack", "-m", `{"$version":1}`)

	// A desired change made with the client arrives as a patch with the
	// next version (and the retained document is forwarded too).
	patchTwin(t, ns, name, `{"spec":{"desired":{"telemetryConfig":{"sendFrequencyInSecs":30}}}}`)
	m = sub.waitFor("desired patch version 2", prefix+"/desired/patch", versionIs(2))
	g.Expect(m.Retained).To(BeFalse(), "%s", m)
	g.Expect(m.JSON()).To(Equal(obj{"$version": num("2"), "telemetryConfig": obj{"sendFrequencyInSecs": num("30")}}), "%s", m)
	m = sub.waitFor("desired document version 2", prefix+"/desired", versionIs(2))
	g.Expect(m.JSON()).To(Equal(obj{"$version": num("2"), "telemetryConfig": obj{"sendFrequencyInSecs": num("30")}, "mode": "eco"}), "%s", m)
	pub("-t", prefix+"/ack", "-m", `{"$version":2}`)

	// A key removed from desired arrives as null.
	patchTwin(t, ns, name, `{"spec":{"desired":{"mode":null}}}`)
	m = sub.waitFor("desired patch version 3", prefix+"/desired/patch", versionIs(3))
	g.Expect(m.JSON()).To(Equal(obj{"$version": num("3"), "mode": nil}), "%s", m)
	pub("-t", prefix+"/ack", "-m", `{"$version":3}`)
	g.Eventually(func(g Gomega) {
		g.Expect(getTwin(g, ns, name).Status.DeviceDesiredVersion).To(Equal(int64(3)), "status.deviceDesiredVersion")
	}, wait, tick).Should(Succeed())

	// The operator stops; desired changes meanwhile.
	op.stop()
	if kind == embeddedBroker {
		// The broker went down with the operator, and the device's
		// connection with it. The device will connect again below.
		sub.stop()
	} else {
		// Mosquitto keeps running: a device that connects now still gets
		// its desired document, retained by the broker.
		latePrefix := protocol.DevicePrefix(lateID)
		late := deviceSub("late device", lateID, latePrefix)
		m := late.waitFor("the retained desired document while the operator is stopped", latePrefix+"/desired", nil)
		g.Expect(m.Retained).To(BeTrue(), "%s", m)
		g.Expect(m.JSON()).To(Equal(obj{"$version": num("1"), "firmware": obj{"channel": "stable"}}), "%s", m)
	}
	patchTwin(t, ns, name, `{"spec":{"desired":{"telemetryConfig":{"sendFrequencyInSecs":60}}}}`)
	op.start()

	want4 := obj{"$version": num("4"), "telemetryConfig": obj{"sendFrequencyInSecs": num("60")}}
	if kind == mosquittoBroker {
		// The subscriber kept running through the restart gets the patch.
		m = sub.waitFor("desired patch version 4 after the restart", prefix+"/desired/patch", versionIs(4))
		g.Expect(m.JSON()).To(Equal(want4), "%s", m)
	} else {
		// The operator records a desired version once it has published it.
		g.Eventually(func(g Gomega) {
			g.Expect(getTwin(g, ns, name).Status.DesiredVersion).To(Equal(int64(4)), "status.desiredVersion")
		}, wait, tick).Should(Succeed())
		// The device reconnects: the retained document has the new version.
		sub = deviceSub("device after the restart", id, prefix)
		m = sub.waitFor("the retained desired document after the restart", prefix+"/desired", nil)
		g.Expect(m.Retained).To(BeTrue(), "%s", m)
		g.Expect(m.JSON()).To(Equal(want4), "%s", m)
		pub("-r", "-t", prefix+"/presence", "-m", `{"online":true}`)
	}
	// And a GET returns it, with the reported document from before.
	pub("-t", prefix+"/get/g2", "-n")
	m = sub.waitFor("the GET response after the restart", prefix+"/res/g2", nil)
	g.Expect(m.JSON()).To(Equal(obj{
		"status":   num("200"),
		"desired":  want4,
		"reported": obj{"$version": num("1"), "connectivity": obj{"type": "cellular"}},
	}), "%s", m)
	pub("-t", prefix+"/ack", "-m", `{"$version":4}`)
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, name)
		g.Expect(tw.Status.DeviceDesiredVersion).To(Equal(int64(4)), "status.deviceDesiredVersion")
		g.Expect(cond(tw, v1alpha1.ConditionConnected).Status).To(BeEquivalentTo("True"), "Connected condition")
	}, wait, tick).Should(Succeed())
}

// versionIs matches a desired document or patch with the given $version.
func versionIs(v int) func(cliMessage) bool {
	want := json.Number(strconv.Itoa(v))
	return func(m cliMessage) bool {
		j := m.JSON()
		return j != nil && j[protocol.VersionKey] == want
	}
}
