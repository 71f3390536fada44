package e2e

import (
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// Bad reported patches sent over the wire (not JSON; an array) get a 400
// response that says what is wrong, and change nothing.
func TestBadInputOverTheWire(t *testing.T) {
	forEachBroker(t, testBadInputOverTheWire)
}

func testBadInputOverTheWire(t *testing.T, kind brokerKind) {
	g := NewWithT(t)
	ns, op := setup(t, kind)
	addr := op.brokerAddr
	id := "BadInput-" + randomSuffix()
	name := strings.ToLower(id)
	createTwin(t, ns, name, id, `{"mode":"eco"}`)
	waitObserved(t, ns, name)

	prefix := protocol.DevicePrefix(id)
	pub := func(args ...string) { t.Helper(); mosquittoPub(t, addr, id+"-pub", args...) }
	sub := startSub(t, "device", addr, "-i", id, "-c", "-q", "1",
		"--will-topic", prefix+"/presence", "--will-payload", `{"online":false}`, "--will-qos", "1", "--will-retain",
		"-t", prefix+"/res/+", "-t", prefix+"/desired/#")
	sub.waitFor("the retained desired document", prefix+"/desired", nil)
	pub("-r", "-t", prefix+"/presence", "-m", `{"online":true}`)
	pub("-t", prefix+"/get/g1", "-n")
	sub.waitFor("the GET response", prefix+"/res/g1", nil)
	pub("-t", prefix+"/reported/r1", "-m", `{"temperature":21.5,"sensors":{"count":2}}`)
	m := sub.waitFor("the response to a good report", prefix+"/res/r1", nil)
	g.Expect(m.JSON()).To(Equal(obj{"status": num("204"), "version": num("1")}), "%s", m)

	// Let the status settle (presence, the GET's desired version, the report).
	var before *v1alpha1.DeviceTwin
	g.Eventually(func(g Gomega) {
		before = getTwin(g, ns, name)
		g.Expect(cond(before, v1alpha1.ConditionConnected).Status).To(BeEquivalentTo("True"), "Connected condition")
		g.Expect(before.Status.DeviceDesiredVersion).To(Equal(int64(1)), "status.deviceDesiredVersion")
		g.Expect(before.Status.ReportedVersion).To(Equal(int64(1)), "status.reportedVersion")
	}, wait, tick).Should(Succeed())
	g.Consistently(func(g Gomega) {
		g.Expect(getTwin(g, ns, name).ResourceVersion).To(Equal(before.ResourceVersion), "the twin keeps changing")
	}, time.Second, tick).Should(Succeed())
	before = getTwin(NewWithT(t), ns, name)

	// Not JSON.
	pub("-t", prefix+"/reported/b1", "-m", `temperature=22`)
	m = sub.waitFor("the response to a report that is not JSON", prefix+"/res/b1", nil)
	r := m.JSON()
	g.Expect(r).NotTo(BeNil(), "%s", m)
	g.Expect(r["status"]).To(Equal(num("400")), "%s", m)
	g.Expect(r["error"]).To(And(BeAssignableToTypeOf(""), Not(BeEmpty())), "%s", m)
	t.Logf("refused: %s", m)

	// An array, nested: the error names its path.
	pub("-t", prefix+"/reported/b2", "-m", `{"temperature":30,"sensors":{"list":["a","b"]}}`)
	m = sub.waitFor("the response to a report with an array", prefix+"/res/b2", nil)
	r = m.JSON()
	g.Expect(r).NotTo(BeNil(), "%s", m)
	g.Expect(r["status"]).To(Equal(num("400")), "%s", m)
	g.Expect(r["error"]).To(And(ContainSubstring("sensors.list"), ContainSubstring("array")), "%s", m)
	g.Expect(r).NotTo(HaveKey("version"), "%s", m)
	t.Logf("refused: %s", m)

	// Nothing changed: not in the API server...
	g.Consistently(func(g Gomega) {
		tw := getTwin(g, ns, name)
		g.Expect(tw.ResourceVersion).To(Equal(before.ResourceVersion), "the twin was written")
		g.Expect(tw.Status).To(Equal(before.Status))
	}, 2*time.Second, tick).Should(Succeed())
	tw := getTwin(g, ns, name)
	g.Expect(doc(tw.Status.Reported)).To(Equal(obj{"temperature": num("21.5"), "sensors": obj{"count": num("2")}}))
	// ... nor in the operator's working state: a GET shows the same.
	pub("-t", prefix+"/get/g2", "-n")
	m = sub.waitFor("the GET response after the bad reports", prefix+"/res/g2", nil)
	g.Expect(m.JSON()).To(Equal(obj{
		"status":   num("200"),
		"desired":  obj{"$version": num("1"), "mode": "eco"},
		"reported": obj{"$version": num("1"), "temperature": num("21.5"), "sensors": obj{"count": num("2")}},
	}), "%s", m)
	// And the next good report gets the next version.
	pub("-t", prefix+"/reported/r2", "-m", `{"temperature":22}`)
	m = sub.waitFor("the response to the next good report", prefix+"/res/r2", nil)
	g.Expect(m.JSON()).To(Equal(obj{"status": num("204"), "version": num("2")}), "%s", m)
}
