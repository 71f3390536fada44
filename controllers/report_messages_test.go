package controllers_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	. "github.com/onsi/gomega"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/twin/twintest"
	"github.com/kubetwin/kubetwin/internal/webhook"
	"github.com/kubetwin/kubetwin/pkg/device"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// Content the admission webhook refuses in spec.desired is refused in a
// device's reported patch with the same message, the path prefix aside
// ("reported" instead of "spec.desired"), and changes nothing.
func TestBadReportSameMessageAsWebhook(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	createTwin(t, ns, "same-msg", "same-msg-1", "", "")
	waitObserved(t, ns, "same-msg")
	dev := connect(t, "same-msg-1", nil)
	_, err := dev.Report(ctx, map[string]any{"ok": 1})
	g.Expect(err).NotTo(HaveOccurred())

	for _, b := range twintest.BadContent() {
		t.Run(b.Name, func(t *testing.T) {
			g := NewWithT(t)
			// What the webhook says about it in spec.desired.
			tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "same-msg"}}
			tw.Spec.Desired = rawJSON(t, b.JSON)
			errs := webhook.Validate(nil, tw)
			g.Expect(errs).To(HaveLen(1))
			g.Expect(errs[0].Error()).To(Equal(b.Message("spec.desired")))

			// What the bridge answers the device.
			_, err := dev.Report(ctx, patchOf(t, b.JSON))
			var re *device.RequestError
			g.Expect(errors.As(err, &re)).To(BeTrue(), "error %v", err)
			g.Expect(re.Status).To(Equal(protocol.StatusBadRequest))
			g.Expect(re.Message).To(Equal(b.Message("reported")))
			g.Expect(strings.TrimPrefix(re.Message, "reported")).To(Equal(strings.TrimPrefix(errs[0].Error(), "spec.desired")))
		})
	}

	// A patch that would push reported over 32 KB is refused whole, with
	// the section's own limit in the message (the webhook says "desired
	// is ..." for spec.desired). Reported already holds "ok": 1 (2+8 bytes).
	_, err = dev.Report(ctx, patchOf(t, twintest.Sized(9, 32769-2-8)))
	var re *device.RequestError
	g.Expect(errors.As(err, &re)).To(BeTrue(), "error %v", err)
	g.Expect(re.Message).To(Equal("reported: reported is 32769 bytes, more than the 32768 allowed"))

	tw := getTwin(g, ns, "same-msg")
	g.Expect(tw.Status.ReportedVersion).To(BeEquivalentTo(1))
	g.Expect(doc(tw.Status.Reported)).To(Equal(map[string]any{"ok": float64(1)}))
}

// patchOf decodes a JSON object keeping numbers as written.
func patchOf(t *testing.T, s string) map[string]any {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader([]byte(s)))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("bad JSON in test: %v", err)
	}
	return m
}
