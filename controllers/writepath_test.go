package controllers_test

import (
	"context"
	"testing"

	. "github.com/onsi/gomega"

	"github.com/kubetwin/kubetwin/controllers"
)

// The operator's status entry in managedFields is one field, status, however
// much the status holds: status is atomic for server-side apply, so the API
// server neither stores nor recomputes a field set of every reported leaf,
// $metadata node and condition on each write. (With status granular, as
// before, the entry listed each of them.)
func TestStatusManagedFieldsOneEntry(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "mf", "", `{"site":"north"}`, `{"interval":5}`)
	waitObserved(t, ns, "mf")
	dev := connect(t, "mf", nil)
	if _, err := dev.Report(context.Background(), map[string]any{"a": map[string]any{"b": 1, "c": "x"}, "d": true}); err != nil {
		t.Fatal(err)
	}
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "mf")
		g.Expect(tw.Status.ReportedVersion).To(BeNumerically(">=", 1))
		var status []string
		for _, mf := range tw.ManagedFields {
			if mf.Subresource == "status" {
				status = append(status, mf.Manager+" "+mf.FieldsV1.GetRawString())
			}
		}
		g.Expect(status).To(Equal([]string{controllers.StatusManager + ` {"f:status":{}}`}))
	}, wait, tick).Should(Succeed())
}
