package e2e

import (
	"testing"

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

		sub := startSub(t, "late device", op.brokerAddr, "-i", id+"-late", "-q", "1", "-t", protocol.DesiredTopic(id))
		m := sub.waitFor("the retained desired document", protocol.DesiredTopic(id), nil)
		g.Expect(m.Retained).To(BeTrue(), "%s", m)
		g.Expect(m.JSON()).To(HaveKeyWithValue("mode", "eco"), "%s", m)
		g.Expect(m.JSON()).To(HaveKey("$version"), "%s", m)
	})
}
