package controllers_test

import (
	"encoding/json"
	"testing"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	. "github.com/onsi/gomega"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// A request id used again for another payload (a device that restarted its
// counter, or an SDK that sends every report with one rid) is a new report:
// stored, with a new version. The exact resend of it is answered with that
// version and writes nothing.
func TestReusedRequestIDNewPayloadStored(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "reuse", "reuse-1", "", "")
	waitObserved(t, ns, "reuse")

	c := mqtt.NewClient(mqtt.NewClientOptions().AddBroker(brokerURL).SetClientID("reuse-1"))
	tok := c.Connect()
	g.Expect(tok.WaitTimeout(wait)).To(BeTrue())
	g.Expect(tok.Error()).NotTo(HaveOccurred())
	defer c.Disconnect(50)
	responses := make(chan protocol.Response, 4)
	c.Subscribe(protocol.ResponseFilter("reuse-1"), 1, func(_ mqtt.Client, m mqtt.Message) {
		var r protocol.Response
		_ = json.Unmarshal(m.Payload(), &r)
		responses <- r
	}).WaitTimeout(wait)
	send := func(payload string, wantVersion int64) {
		t.Helper()
		pt := c.Publish(protocol.ReportedTopic("reuse-1", "r1"), 1, false, []byte(payload))
		g.Expect(pt.WaitTimeout(wait)).To(BeTrue())
		var r protocol.Response
		g.Eventually(responses, wait).Should(Receive(&r))
		g.Expect(r.Status).To(Equal(protocol.StatusNoContent))
		g.Expect(r.Version).To(Equal(wantVersion), "response %+v to %s", r, payload)
	}

	send(`{"temp":30}`, 1)
	send(`{"temp":35}`, 2)
	tw := getTwin(g, ns, "reuse")
	g.Expect(tw.Status.ReportedVersion).To(BeEquivalentTo(2))
	g.Expect(doc(tw.Status.Reported)).To(Equal(map[string]any{"temp": float64(35)}))

	send(`{"temp":35}`, 2)
	again := getTwin(g, ns, "reuse")
	g.Expect(again.ResourceVersion).To(Equal(tw.ResourceVersion), "the resend wrote the twin")
	g.Expect(again.Status.ReportedVersion).To(BeEquivalentTo(2))
}
