package operator

import (
	"encoding/json"
	"os"
	"reflect"
	"runtime"
	"testing"
	"time"
	"unsafe"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/tools/cache"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
)

// decodeTwin decodes testdata/twin.json as the cache's watch does: a twin
// created by kubectl apply (client-side), with its labels mirrored by the
// operator, one fleet configuration applied and its status written, read
// back from a real kube-apiserver.
func decodeTwin(t testing.TB) *v1alpha1.DeviceTwin {
	t.Helper()
	data, err := os.ReadFile("testdata/twin.json")
	if err != nil {
		t.Fatal(err)
	}
	s := k8sruntime.NewScheme()
	if err := v1alpha1.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	obj, _, err := serializer.NewCodecFactory(s).UniversalDeserializer().Decode(data, nil, &v1alpha1.DeviceTwin{})
	if err != nil {
		t.Fatal(err)
	}
	return obj.(*v1alpha1.DeviceTwin)
}

// The cached twin keeps, of its metadata, what the label mirroring and
// fleet configurations read: each manager's labels and desired paths.
func TestCacheTransformTrimsTwin(t *testing.T) {
	tw := decodeTwin(t)
	out, err := CacheTransform(tw)
	if err != nil {
		t.Fatal(err)
	}
	got := out.(*v1alpha1.DeviceTwin)
	if got.Annotations != nil {
		t.Errorf("annotations kept: %v", got.Annotations)
	}
	want := []metav1.ManagedFieldsEntry{
		{Manager: controllers.ConfigurationManagerPrefix + "redmond43-telemetry", Operation: metav1.ManagedFieldsOperationApply,
			FieldsV1: metav1.NewFieldsV1(`{"f:metadata":{"f:labels":{"f:configurations.kubetwin.io/redmond43-telemetry":{}}},` +
				`"f:spec":{"f:desired":{"f:reporting":{"f:batch":{}},"f:telemetry":{"f:mode":{}}}}}`)},
		{Manager: controllers.LabelManager, Operation: metav1.ManagedFieldsOperationApply,
			FieldsV1: metav1.NewFieldsV1(`{"f:metadata":{"f:labels":{"f:firmware":{},"f:location.building":{},` +
				`"f:location.floor":{},"f:location.room":{},"f:model":{},"f:owner":{}}}}`)},
		{Manager: "kubectl-client-side-apply", Operation: metav1.ManagedFieldsOperationUpdate,
			FieldsV1: metav1.NewFieldsV1(`{"f:metadata":{"f:labels":{"f:floor":{},"f:site":{}}},"f:spec":{"f:desired":` +
				`{"f:led":{},"f:telemetry":{"f:interval":{}},"f:thresholds":{"f:humidity":{"f:max":{}},"f:temperature":{"f:max":{},"f:min":{}}}}}}`)},
	}
	if len(got.ManagedFields) != len(want) {
		t.Fatalf("%d managedFields entries kept, want %d: %+v", len(got.ManagedFields), len(want), got.ManagedFields)
	}
	for i, e := range got.ManagedFields {
		w := want[i]
		if e.Manager != w.Manager || e.Operation != w.Operation || e.Subresource != "" || e.APIVersion != "" ||
			e.Time != nil || e.FieldsType != "" || e.FieldsV1.GetRawString() != w.FieldsV1.GetRawString() {
			t.Errorf("entry %d:\n got %s %s %q %q %v %q %s\nwant %s %s %s", i, e.Manager, e.Operation, e.Subresource,
				e.APIVersion, e.Time, e.FieldsType, e.FieldsV1.GetRawString(), w.Manager, w.Operation, w.FieldsV1.GetRawString())
		}
	}
	// Labels, spec and status are the stored ones.
	ref := decodeTwin(t)
	if len(got.Labels) != len(ref.Labels) || string(got.Spec.Desired.Raw) != string(ref.Spec.Desired.Raw) ||
		got.Status.ObservedGeneration != ref.Status.ObservedGeneration || len(got.Finalizers) != 1 {
		t.Error("the transform changed more than managedFields and the annotation")
	}
}

func TestTrimTwinEntries(t *testing.T) {
	fields := metav1.NewFieldsV1
	cfg := controllers.ConfigurationManagerPrefix + "c"
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{
		Annotations: map[string]string{LastAppliedAnnotation: "{}", "keep": "me"},
		ManagedFields: []metav1.ManagedFieldsEntry{
			// Owns nothing that is read: dropped.
			{Manager: "kubectl-edit", FieldsV1: fields(`{"f:spec":{"f:deviceId":{},"f:tags":{"f:a":{}}}}`)},
			// A configuration's entry stays, emptied, and so does one
			// without fields.
			{Manager: cfg, FieldsV1: fields(`{"f:metadata":{"f:finalizers":{}}}`)},
			{Manager: cfg + "2"},
			// Only ".", "k:" and "v:" members: nothing the readers count.
			{Manager: "dots", FieldsV1: fields(`{"f:metadata":{"f:labels":{".":{}}},"f:spec":{"f:desired":{".":{}}}}`)},
			// A leaf whose only member is "." stays a leaf; "k:" members go.
			{Manager: "leaf", FieldsV1: fields(`{"f:spec":{"f:desired":{"f:x":{".":{}},"f:l":{"k:{\"a\":1}":{"f:b":{}}}}}}`)},
			// Spaces, an escaped key, a member that is not an object
			// (copied), a string holding braces.
			{Manager: "odd", FieldsV1: fields(` { "f:spec" : { "f:desired" : { "\u0066:a" : 1 , "b:c" : { "f:d" : {} } ,` +
				` "f:b" : { "k:{\"}\"" : { } } } , "f:metadata" : { "f:finalizers" : {} } } } `)},
			// Not JSON: the readers skip it.
			{Manager: "broken", FieldsV1: fields(`{"f:metadata":`)},
			{Manager: "kubetwin", Subresource: "status", FieldsV1: fields(`{"f:status":{}}`)},
			// A label key that needs escaping survives.
			{Manager: "esc", FieldsV1: fields(`{"f:metadata":{"f:labels":{"f:a\"b\u003c":{}}}}`)},
		},
	}}
	TrimTwin(tw)
	if len(tw.Annotations) != 1 || tw.Annotations["keep"] != "me" {
		t.Errorf("annotations: %v, want only keep=me", tw.Annotations)
	}
	want := map[string]string{
		cfg:       `{}`,
		cfg + "2": "<nil>",
		"leaf":    `{"f:spec":{"f:desired":{"f:x":{},"f:l":{}}}}`,
		"odd":     `{"f:spec":{"f:desired":{"\u0066:a":1,"f:b":{}}}}`,
		"esc":     `{"f:metadata":{"f:labels":{"f:a\"b\u003c":{}}}}`,
	}
	got := map[string]string{}
	for _, e := range tw.ManagedFields {
		got[e.Manager] = "<nil>"
		if e.FieldsV1 != nil {
			got[e.Manager] = e.FieldsV1.GetRawString()
		}
	}
	if len(got) != len(want) {
		t.Errorf("managers kept: %v, want %v", got, want)
	}
	for m, w := range want {
		if got[m] != w {
			t.Errorf("%s: %s, want %s", m, got[m], w)
		}
	}

	// No annotation left: none kept.
	tw = &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{LastAppliedAnnotation: "{}"}}}
	TrimTwin(tw)
	if tw.Annotations != nil || tw.ManagedFields != nil {
		t.Errorf("empty twin: %v %v", tw.Annotations, tw.ManagedFields)
	}
}

// Other objects keep their entries but the status ones, with their times
// (the service API reads a TwinConfiguration's).
func TestCacheTransformOtherObjects(t *testing.T) {
	now := metav1.NewTime(time.Now())
	c := &v1alpha1.TwinConfiguration{ObjectMeta: metav1.ObjectMeta{
		Annotations: map[string]string{LastAppliedAnnotation: "{}"},
		ManagedFields: []metav1.ManagedFieldsEntry{
			{Manager: "kubectl", Time: &now, FieldsV1: metav1.NewFieldsV1(`{"f:spec":{}}`)},
			{Manager: "kubetwin", Subresource: "status", FieldsV1: metav1.NewFieldsV1(`{"f:status":{}}`)},
		}}}
	if _, err := CacheTransform(c); err != nil {
		t.Fatal(err)
	}
	if len(c.ManagedFields) != 1 || c.ManagedFields[0].Time == nil || c.Annotations[LastAppliedAnnotation] == "" {
		t.Errorf("configuration: %+v", c.ObjectMeta)
	}
	tomb := cache.DeletedFinalStateUnknown{Key: "ns/a", Obj: c}
	if out, err := CacheTransform(tomb); err != nil || out != any(tomb) {
		t.Fatalf("tombstone: %v, %v", out, err)
	}
}

// keySecretJSON is a twin's key Secret as the API server returns it after
// the operator's CreateOrUpdate, with the keys the operator writes.
const keySecretJSON = `{"apiVersion":"v1","kind":"Secret","metadata":{"name":"dev-000042-keys","namespace":"scale",` +
	`"uid":"5b0e7f0c-3c55-4a0e-9a4b-1d8e2f7a6c11","resourceVersion":"123456","creationTimestamp":"2026-12-07T00:20:00Z",` +
	`"labels":{"app.kubernetes.io/managed-by":"kubetwin","kubetwin.io/device-keys":"true"},` +
	`"ownerReferences":[{"apiVersion":"kubetwin.io/v1alpha1","kind":"DeviceTwin","name":"dev-000042",` +
	`"uid":"0a6f3c2e-8d4b-4f7e-b1a9-3e5d7c9f2b10","controller":true,"blockOwnerDeletion":true}],` +
	`"managedFields":[{"manager":"manager","operation":"Update","apiVersion":"v1","time":"2026-12-07T00:20:00Z",` +
	`"fieldsType":"FieldsV1","fieldsV1":{"f:data":{".":{},"f:connectionString":{},"f:primaryKey":{},"f:secondaryKey":{}},` +
	`"f:metadata":{"f:labels":{".":{},"f:app.kubernetes.io/managed-by":{},"f:kubetwin.io/device-keys":{}},` +
	`"f:ownerReferences":{".":{},"k:{\"uid\":\"0a6f3c2e-8d4b-4f7e-b1a9-3e5d7c9f2b10\"}":{}}},"f:type":{}}}]},` +
	`"data":{"primaryKey":"cXZ0YjVhT2xKd3RqV0NqQ2Vzb2x4b3V6cW9tQWJ5a2FvY2hsZz0=",` +
	`"secondaryKey":"b2Z6bXd4a3ZyS2x0b0h2a2Z6d3F6bGJ0c3RqY2Zyb2xkcGI9",` +
	`"connectionString":"SG9zdE5hbWU9YmVuY2gtaHViLmt1YmV0d2luLnRlc3Q7RGV2aWNlSWQ9ZGV2LTAwMDA0MjtTaGFyZWRBY2Nlc3NLZXk9cXZ0YjVhT2xKd3RqV0NqQ2Vzb2x4b3V6cW9tQWJ5a2FvY2hsZz0="},` +
	`"type":"Opaque"}`

// TestCacheTransformTrimsKeySecret: a cached key Secret keeps what the
// operator reads (data, type, labels, owner) and every annotation (the
// operator updates key Secrets from cached copies), and loses its
// managedFields.
func TestCacheTransformTrimsKeySecret(t *testing.T) {
	s := &corev1.Secret{}
	if err := json.Unmarshal([]byte(keySecretJSON), s); err != nil {
		t.Fatal(err)
	}
	s.Annotations = map[string]string{LastAppliedAnnotation: "{}", "team": "edge"}
	want := s.DeepCopy()
	if _, err := CacheTransform(s); err != nil {
		t.Fatal(err)
	}
	if s.ManagedFields != nil || !reflect.DeepEqual(s.Annotations, want.Annotations) {
		t.Errorf("managedFields %v, annotations %v: want none, and every annotation (an update from the cache would delete one)", s.ManagedFields, s.Annotations)
	}
	if !reflect.DeepEqual(s.Data, want.Data) || s.Type != want.Type || !reflect.DeepEqual(s.Labels, want.Labels) ||
		!reflect.DeepEqual(s.OwnerReferences, want.OwnerReferences) || s.Name != want.Name || s.ResourceVersion != want.ResourceVersion {
		t.Errorf("trimmed %+v, want the read fields of %+v", s, want)
	}
}

// BenchmarkCachedKeySecretHeap reports the heap one cached key Secret
// costs (heap-B/secret), as decoded ("none") and through CacheTransform
// ("trimmed").
func BenchmarkCachedKeySecretHeap(b *testing.B) {
	s := k8sruntime.NewScheme()
	if err := corev1.AddToScheme(s); err != nil {
		b.Fatal(err)
	}
	dec := serializer.NewCodecFactory(s).UniversalDeserializer()
	for _, v := range []struct {
		name string
		f    func(any) (any, error)
	}{
		{"none", func(o any) (any, error) { return o, nil }},
		{"trimmed", CacheTransform},
	} {
		b.Run(v.name, func(b *testing.B) {
			b.ReportMetric(heapPerObject(b, func() (k8sruntime.Object, error) {
				obj, _, err := dec.Decode([]byte(keySecretJSON), nil, &corev1.Secret{})
				return obj, err
			}, v.f), "heap-B/secret")
		})
	}
}

// heapPerObject is the heap that each of 2,000 objects from decode costs
// once passed through transform and kept, measured between two GCs on
// every round of b.
func heapPerObject(b *testing.B, decode func() (k8sruntime.Object, error), transform func(any) (any, error)) float64 {
	const n = 2000
	kept := make([]any, n)
	var per float64
	for b.Loop() {
		clear(kept)
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for i := range kept {
			obj, err := decode()
			if err != nil {
				b.Fatal(err)
			}
			if kept[i], err = transform(obj); err != nil {
				b.Fatal(err)
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		per = float64(after.HeapAlloc-before.HeapAlloc) / n
	}
	runtime.KeepAlive(kept)
	return per
}

// capturedTwin returns testdata/twin.json and a decoder of DeviceTwins.
func capturedTwin(b *testing.B) ([]byte, k8sruntime.Decoder) {
	b.Helper()
	data, err := os.ReadFile("testdata/twin.json")
	if err != nil {
		b.Fatal(err)
	}
	s := k8sruntime.NewScheme()
	if err := v1alpha1.AddToScheme(s); err != nil {
		b.Fatal(err)
	}
	return data, serializer.NewCodecFactory(s).UniversalDeserializer()
}

// BenchmarkCachedTwinHeap reports the heap one cached twin costs
// (heap-B/twin): decoded as the cache's watch does, then as stored
// ("none"), through the old transform ("status") and through
// CacheTransform ("trimmed").
func BenchmarkCachedTwinHeap(b *testing.B) {
	data, dec := capturedTwin(b)
	for _, v := range []struct {
		name string
		f    func(any) (any, error)
	}{
		{"none", func(o any) (any, error) { return o, nil }},
		{"status", DropStatusManagedFields},
		{"trimmed", CacheTransform},
	} {
		b.Run(v.name, func(b *testing.B) {
			b.ReportMetric(heapPerObject(b, func() (k8sruntime.Object, error) {
				obj, _, err := dec.Decode(data, nil, &v1alpha1.DeviceTwin{})
				return obj, err
			}, v.f), "heap-B/twin")
			b.ReportMetric(float64(len(data)), "json-B/twin")
		})
	}
}

// BenchmarkCacheTransform is the CPU a watch event of a twin costs: the
// decode alone ("decode") and with the transform ("trimmed").
func BenchmarkCacheTransform(b *testing.B) {
	data, dec := capturedTwin(b)
	for _, v := range []struct {
		name string
		f    func(any) (any, error)
	}{
		{"decode", func(o any) (any, error) { return o, nil }},
		{"status", DropStatusManagedFields},
		{"trimmed", CacheTransform},
	} {
		b.Run(v.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				obj, _, err := dec.Decode(data, nil, &v1alpha1.DeviceTwin{})
				if err != nil {
					b.Fatal(err)
				}
				if _, err := v.f(obj); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Strings from a small set are shared by all cached twins, not allocated
// again by the decoder for each one.
func TestCacheTransformSharesStrings(t *testing.T) {
	a, b := decodeTwin(t), decodeTwin(t)
	for _, tw := range []*v1alpha1.DeviceTwin{a, b} {
		if _, err := CacheTransform(tw); err != nil {
			t.Fatal(err)
		}
	}
	same := func(what, x, y string) {
		t.Helper()
		if x == "" || unsafe.StringData(x) != unsafe.StringData(y) {
			t.Errorf("%s %q: not shared", what, x)
		}
	}
	same("namespace", a.Namespace, b.Namespace)
	same("finalizer", a.Finalizers[0], b.Finalizers[0])
	same("manager", a.ManagedFields[0].Manager, b.ManagedFields[0].Manager)
	same("condition type", a.Status.Conditions[0].Type, b.Status.Conditions[0].Type)
	same("condition reason", a.Status.Conditions[0].Reason, b.Status.Conditions[0].Reason)
	same("connection state", a.Status.ConnectionState, b.Status.ConnectionState)
	for k := range a.Labels {
		for k2 := range b.Labels {
			if k == k2 {
				same("label key", k, k2)
			}
		}
	}
}
