package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// newNamespace creates a namespace for one test. It is not deleted: the
// control plane has no namespace controller, and the twins keep the
// operator's finalizer once their operator is gone.
func newNamespace(t *testing.T) string {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "e2e-"}}
	if err := k8s.Create(context.Background(), ns); err != nil {
		t.Fatalf("creating a namespace: %v", err)
	}
	return ns.Name
}

func rawJSON(t *testing.T, s string) *apiextensionsv1.JSON {
	t.Helper()
	if !json.Valid([]byte(s)) {
		t.Fatalf("bad JSON in test: %s", s)
	}
	return &apiextensionsv1.JSON{Raw: []byte(s)}
}

// createTwin creates a DeviceTwin; desired may be "".
func createTwin(t *testing.T, ns, name, deviceID, desired string) {
	t.Helper()
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	tw.Spec.DeviceID = deviceID
	if desired != "" {
		tw.Spec.Desired = rawJSON(t, desired)
	}
	if err := k8s.Create(context.Background(), tw); err != nil {
		t.Fatalf("creating DeviceTwin %s/%s: %v", ns, name, err)
	}
}

// patchTwin merge-patches a twin (spec changes, as a back end would make them).
func patchTwin(t *testing.T, ns, name, patch string) {
	t.Helper()
	if !json.Valid([]byte(patch)) {
		t.Fatalf("bad JSON in test: %s", patch)
	}
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if err := k8s.Patch(context.Background(), tw, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
		t.Fatalf("patching DeviceTwin %s/%s with %s: %v", ns, name, patch, err)
	}
}

// getTwin reads a twin from the API server.
func getTwin(g Gomega, ns, name string) *v1alpha1.DeviceTwin {
	tw := &v1alpha1.DeviceTwin{}
	g.Expect(k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, tw)).To(Succeed())
	return tw
}

// waitObserved waits until the operator has processed the twin's current
// spec (and so published its desired document).
func waitObserved(t *testing.T, ns, name string) *v1alpha1.DeviceTwin {
	t.Helper()
	var tw *v1alpha1.DeviceTwin
	NewWithT(t).Eventually(func(g Gomega) {
		tw = getTwin(g, ns, name)
		g.Expect(tw.Status.ObservedGeneration).To(Equal(tw.Generation), "status.observedGeneration")
	}, wait, tick).Should(Succeed(), "the operator did not process DeviceTwin %s/%s", ns, name)
	return tw
}

// cond returns a condition of a twin (the zero value if it has none).
func cond(tw *v1alpha1.DeviceTwin, typ string) metav1.Condition {
	c := meta.FindStatusCondition(tw.Status.Conditions, typ)
	if c == nil {
		return metav1.Condition{}
	}
	return *c
}

// doc decodes a JSON document of the status (numbers as json.Number).
func doc(j *apiextensionsv1.JSON) map[string]any {
	out := map[string]any{}
	if j != nil {
		_ = decodeJSON(j.Raw, &out)
	}
	return out
}

// decodeJSON decodes with numbers as json.Number, so that they compare
// exactly.
func decodeJSON(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	return dec.Decode(v)
}

// obj is shorthand for a JSON object in expectations.
type obj = map[string]any

// num is a JSON number as decodeJSON returns it.
func num(s string) json.Number { return json.Number(s) }
