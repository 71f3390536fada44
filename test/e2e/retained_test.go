package e2e

import (
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	. "github.com/onsi/gomega"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// After an operator restart with an unchanged desired document, the broker
// still (or again) holds the retained desired document: the embedded broker
// lost it with the process, so the operator publishes it anew.
func TestRetainedDesiredAfterRestart(t *testing.T) {
	forEachBroker(t, func(t *testing.T, kind brokerKind) {
		g := NewWithT(t)
		ns, op := setup(t, kind)
		id := "ret-" + randomSuffix()
		createTwin(t, ns, "ret", id, `{"mode":"eco"}`)
		waitObserved(t, ns, "ret")

		op.stop()
		op.start()
		// The operator answers devices once its caches are in; it
		// republishes when it reconciles the twin, which may come a moment
		// later.
		g.Eventually(func() bool { return holdsRetained(t, op.brokerAddr, protocol.DesiredTopic(id)) }, wait, tick).
			Should(BeTrue(), "the broker does not hold the retained desired document again")

		sub := startSub(t, "late device", op.brokerAddr, "-i", id+"-late", "-q", "1", "-t", protocol.DesiredTopic(id))
		m := sub.waitFor("the retained desired document", protocol.DesiredTopic(id), nil)
		g.Expect(m.Retained).To(BeTrue(), "%s", m)
		g.Expect(m.JSON()).To(HaveKeyWithValue("mode", "eco"), "%s", m)
		g.Expect(m.JSON()).To(HaveKey("$version"), "%s", m)
	})
}

// holdsRetained reports whether a new subscriber to topic gets a retained
// message within a second.
func holdsRetained(t *testing.T, addr, topic string) bool {
	t.Helper()
	got := make(chan bool, 1)
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID("retained-probe-" + randomSuffix()).
		SetProtocolVersion(4).SetCleanSession(true).SetAutoReconnect(false).SetConnectTimeout(2 * time.Second)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		return false
	}
	defer c.Disconnect(0)
	c.Subscribe(topic, 1, func(_ paho.Client, m paho.Message) {
		select {
		case got <- m.Retained():
		default:
		}
	}).WaitTimeout(5 * time.Second)
	select {
	case r := <-got:
		return r
	case <-time.After(time.Second):
		return false
	}
}
