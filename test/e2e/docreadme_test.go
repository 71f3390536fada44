package e2e

import (
	"testing"

	. "github.com/onsi/gomega"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// The README's examples of a converged twin hold: the twin of "What a twin
// looks like" is applied, a simulated device reports its connectivity and
// applies its desired properties (as make demo's does), and then the
// console blocks of that section and of "Querying the fleet" run as
// docs/protocol.md's session does (see TestDocSession), printing what the
// README shows.
func TestReadmeExamples(t *testing.T) {
	var steps []docStep
	for _, h := range []string{"## What a twin looks like", "## Querying the fleet"} {
		s, err := parseDocSection("README.md", h)
		if err != nil {
			t.Fatal(err)
		}
		steps = append(steps, s...)
	}
	if steps[0].yaml == "" {
		t.Fatalf("%s: no YAML twin before the first console block", steps[0].where())
	}
	ns, op := setup(t, embeddedBroker)
	host, port := splitAddr(t, op.brokerAddr)
	r := newDocRunner(t, ns, "-h "+host+" -p "+port)
	r.run(docStep{file: steps[0].file, line: steps[0].line, yaml: steps[0].yaml,
		cmd: "kubectl apply -f mydeviceid.yaml", output: []string{"devicetwin.kubetwin.io/mydeviceid created"}})

	// The device starts once the operator has taken the twin in (claimed
	// its device id), as make demo's does: a first twin GET before that is
	// answered 404, which ends device-sim.
	waitObserved(t, ns, "mydeviceid")
	startDeviceSim(t, "--broker", op.brokerURL(), "--id", "myDeviceId",
		"--report", `{"connectivity":{"type":"cellular"}}`, "--apply-desired")
	NewWithT(t).Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "mydeviceid")
		g.Expect(cond(tw, v1alpha1.ConditionInSync).Status).To(BeEquivalentTo("True"), "InSync")
		g.Expect(cond(tw, v1alpha1.ConditionConnected).Status).To(BeEquivalentTo("True"), "Connected")
		g.Expect(tw.Status.ReportedVersion).To(BeEquivalentTo(2), "status.reportedVersion")
	}, wait, tick).Should(Succeed(), "the simulated device did not converge")

	for _, st := range steps {
		r.run(st)
	}
}
