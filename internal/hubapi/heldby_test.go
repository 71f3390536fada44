package hubapi

import (
	"errors"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// TestHeldBy reads the holder out of the admission webhook's refusal as
// the API server relays it (internal/webhook.Invalid with
// deviceid.HeldError's text).
func TestHeldBy(t *testing.T) {
	gk := schema.GroupKind{Group: "kubetwin.io", Kind: "DeviceTwin"}
	for _, tc := range []struct {
		name     string
		err      error
		ns, twin string
	}{
		{"webhook", apierrors.NewForbidden(schema.GroupResource{Group: "kubetwin.io", Resource: "devicetwins"}, "b",
			errors.New(`admission webhook "vdevicetwin.kubetwin.io" denied the request: DeviceTwin.kubetwin.io "b" is invalid: spec.deviceId: device id "x" is already held by DeviceTwin plant-1/a`)),
			"plant-1", "a"},
		{"invalid, no holder", apierrors.NewInvalid(gk, "b", nil),
			"", ""},
		{"deleting suffix", errors.New(`spec.deviceId: device id "x" is already held by DeviceTwin plant-1/a, which is being deleted: retry once it is gone`),
			"plant-1", "a"},
		{"several errors", errors.New(`DeviceTwin.kubetwin.io "b" is invalid: [spec.tags: too big, spec.deviceId: device id "x" is already held by DeviceTwin p/a]`),
			"p", "a"},
		{"other refusal", errors.New(`DeviceTwin.kubetwin.io "b" is invalid: spec.desired: arrays are not allowed`), "", ""},
	} {
		ns, name, ok := heldBy(tc.err)
		if ok != (tc.ns != "") || ns != tc.ns || name != tc.twin {
			t.Errorf("%s: heldBy = %q %q %v, want %q %q", tc.name, ns, name, ok, tc.ns, tc.twin)
		}
	}
}
