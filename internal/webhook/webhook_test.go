package webhook

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admission/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

func twinOf(name, id, tags, desired string) *v1alpha1.DeviceTwin {
	t := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name}}
	t.Spec.DeviceID = id
	if tags != "" {
		t.Spec.Tags = &apiextensionsv1.JSON{Raw: []byte(tags)}
	}
	if desired != "" {
		t.Spec.Desired = &apiextensionsv1.JSON{Raw: []byte(desired)}
	}
	return t
}

func TestValidate(t *testing.T) {
	const allowed = "(allowed: ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ ')"
	tests := map[string]struct {
		old, new *v1alpha1.DeviceTwin
		want     []string // "path: rule"
	}{
		"valid":           {nil, twinOf("pump", "Pump:7", `{"site":"n"}`, `{"mode":"eco"}`), nil},
		"no spec":         {nil, twinOf("pump", "", "", ""), nil},
		"null sections":   {nil, twinOf("pump", "", "null", "null"), nil},
		"array":           {nil, twinOf("pump", "", "", `{"telemetry":{"intervals":[1]}}`), []string{"spec.desired.telemetry.intervals: arrays are not allowed in device twins"}},
		"tags not object": {nil, twinOf("pump", "", `[1]`, ""), []string{"spec.tags: twin document must be a JSON object, got an array"}},
		"bad device id":   {nil, twinOf("pump", "bay/3", "", ""), []string{"spec.deviceId: device id must not contain '/' " + allowed}},
		"long name as id": {nil, twinOf(strings.Repeat("n", 129), "", "", ""), []string{
			"metadata.name: device id is 129 characters, more than the 128 allowed (metadata.name is the device id when spec.deviceId is unset; set spec.deviceId)"}},
		"long name with an id": {nil, twinOf(strings.Repeat("n", 129), "n", "", ""), nil},
		"every part bad": {nil, twinOf("pump", "a b", `{"a.b":1}`, `{"s":[]}`), []string{
			"spec.deviceId: device id must not contain ' ' " + allowed,
			`spec.tags: key "a.b" must not contain '.'`,
			"spec.desired.s: arrays are not allowed in device twins"}},

		"update: device id changes": {twinOf("pump", "p-1", "", ""), twinOf("pump", "p-2", "", ""), []string{
			`spec.deviceId: the device id is immutable: it is "p-1" (spec.deviceId, else metadata.name)`}},
		"update: device id removed": {twinOf("pump", "p-1", "", ""), twinOf("pump", "", "", ""), []string{
			`spec.deviceId: the device id is immutable: it is "p-1" (spec.deviceId, else metadata.name)`}},
		"update: unset id set to the name":   {twinOf("pump", "", "", ""), twinOf("pump", "pump", "", ""), nil},
		"update: unchanged bad section kept": {twinOf("pump", "", "", `{"a":[1]}`), twinOf("pump", "", `{"x":1}`, `{"a":[1]}`), nil},
		"update: bad section changed": {twinOf("pump", "", "", `{"a":[1]}`), twinOf("pump", "", "", `{"a":[1,2]}`), []string{
			"spec.desired.a: arrays are not allowed in device twins"}},
		"update: long name not checked again": {twinOf(strings.Repeat("n", 129), "", "", ""), twinOf(strings.Repeat("n", 129), "", `{"a":1}`, ""), nil},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			var got []string
			for _, e := range Validate(tt.old, tt.new) {
				got = append(got, e.Error())
			}
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Errorf("Validate =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
		})
	}
}

func TestInvalid(t *testing.T) {
	if Invalid(twinOf("pump", "", "", ""), nil) != nil {
		t.Fatal("no errors must give nil")
	}
	tw := twinOf("pump", "", `{"a":[1]}`, `{"b.c":1}`)
	err := Invalid(tw, Validate(nil, tw))
	var se *apierrors.StatusError
	if !errors.As(err, &se) || !apierrors.IsInvalid(err) || se.ErrStatus.Code != http.StatusUnprocessableEntity {
		t.Fatalf("not a 422 Invalid: %#v", err)
	}
	want := `DeviceTwin.kubetwin.io "pump" is invalid: [spec.tags.a: arrays are not allowed in device twins, spec.desired: key "b.c" must not contain '.']`
	if err.Error() != want {
		t.Errorf("message\n got %s\nwant %s", err, want)
	}
	d := se.ErrStatus.Details
	if d == nil || d.Kind != "DeviceTwin" || d.Group != "kubetwin.io" || d.Name != "pump" || len(d.Causes) != 2 ||
		d.Causes[0] != (metav1.StatusCause{Type: metav1.CauseTypeFieldValueInvalid, Field: "spec.tags.a", Message: "arrays are not allowed in device twins"}) {
		t.Errorf("details = %+v", d)
	}
	one := Invalid(tw, Validate(nil, twinOf("pump", "", "", `{"a":[1]}`)))
	if want := `DeviceTwin.kubetwin.io "pump" is invalid: spec.desired.a: arrays are not allowed in device twins`; one.Error() != want {
		t.Errorf("single error message %q", one)
	}
}

func TestDefaulter(t *testing.T) {
	scheme := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	d := &Defaulter{decoder: admission.NewDecoder(scheme)}
	const head = `{"apiVersion":"kubetwin.io/v1alpha1","kind":"DeviceTwin","metadata":{"name":"pump","namespace":"ns"}`
	tests := map[string]struct {
		op    admissionv1.Operation
		obj   string
		patch string // JSON of the patch operations, "" for none
	}{
		"no spec":        {admissionv1.Create, head + `}`, `[{"op":"add","path":"/spec","value":{"deviceId":"pump"}}]`},
		"null spec":      {admissionv1.Create, head + `,"spec":null}`, `[{"op":"add","path":"/spec","value":{"deviceId":"pump"}}]`},
		"spec, no id":    {admissionv1.Create, head + `,"spec":{"desired":{"n":4503599627370497}}}`, `[{"op":"add","path":"/spec/deviceId","value":"pump"}]`},
		"empty id":       {admissionv1.Create, head + `,"spec":{"deviceId":""}}`, `[{"op":"add","path":"/spec/deviceId","value":"pump"}]`},
		"id set":         {admissionv1.Create, head + `,"spec":{"deviceId":"Pump:7"}}`, ""},
		"update":         {admissionv1.Update, head + `,"spec":{}}`, ""},
		"generated name": {admissionv1.Create, `{"apiVersion":"kubetwin.io/v1alpha1","kind":"DeviceTwin","metadata":{"generateName":"p-","namespace":"ns"},"spec":{}}`, ""},
		"name too long for an id": {admissionv1.Create,
			`{"apiVersion":"kubetwin.io/v1alpha1","kind":"DeviceTwin","metadata":{"name":"` + strings.Repeat("n", 129) + `"},"spec":{}}`, ""},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			req := admission.Request{AdmissionRequest: admissionv1.AdmissionRequest{
				Operation: tt.op, Object: runtime.RawExtension{Raw: []byte(tt.obj)}}}
			resp := d.Handle(context.Background(), req)
			if !resp.Allowed {
				t.Fatalf("not allowed: %+v", resp.Result)
			}
			got := ""
			if len(resp.Patches) > 0 {
				b, _ := json.Marshal(resp.Patches)
				got = string(b)
			}
			if got != tt.patch {
				t.Errorf("patch = %s, want %s", got, tt.patch)
			}
		})
	}
	resp := d.Handle(context.Background(), admission.Request{AdmissionRequest: admissionv1.AdmissionRequest{
		Operation: admissionv1.Create, Object: runtime.RawExtension{Raw: []byte(`{"kind":`)}}})
	if resp.Allowed || resp.Result.Code != http.StatusBadRequest {
		t.Errorf("malformed object: %+v", resp)
	}
}
