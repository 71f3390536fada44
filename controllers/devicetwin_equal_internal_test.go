package controllers

import (
	"reflect"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// equalStatus answers as equality.Semantic.DeepEqual: for every field
// (found by reflection, so a field added to the status and not to
// equalStatus fails here) changed alone, and for the values DeepEqual
// treats specially: times in other zones or with a monotonic reading,
// nil and empty slices and raw JSON.
func TestEqualStatusAsSemanticDeepEqual(t *testing.T) {
	full := v1alpha1.DeviceTwinStatus{}
	fill(reflect.ValueOf(&full).Elem(), 1)
	check := func(name string, a, b v1alpha1.DeviceTwinStatus) {
		t.Helper()
		if got, want := equalStatus(a, b), equality.Semantic.DeepEqual(a, b); got != want {
			t.Errorf("%s: equalStatus %v, Semantic.DeepEqual %v", name, got, want)
		}
		if got, want := equalStatus(b, a), equality.Semantic.DeepEqual(b, a); got != want {
			t.Errorf("%s, swapped: equalStatus %v, Semantic.DeepEqual %v", name, got, want)
		}
	}
	check("zero", v1alpha1.DeviceTwinStatus{}, v1alpha1.DeviceTwinStatus{})
	check("full", full, *full.DeepCopy())
	check("zero and full", v1alpha1.DeviceTwinStatus{}, full)
	typ := reflect.TypeFor[v1alpha1.DeviceTwinStatus]()
	for i := range typ.NumField() {
		for _, seed := range []int{0, 2} {
			b := *full.DeepCopy()
			f := reflect.ValueOf(&b).Elem().Field(i)
			f.SetZero()
			if seed > 0 {
				fill(f, seed)
			}
			check(typ.Field(i).Name, full, b)
		}
	}

	// What DeepEqual does not compare bit for bit.
	at := time.Now() // with a monotonic reading
	st := func(f func(*v1alpha1.DeviceTwinStatus)) v1alpha1.DeviceTwinStatus {
		s := *full.DeepCopy()
		f(&s)
		return s
	}
	same := []func(*v1alpha1.DeviceTwinStatus){
		func(s *v1alpha1.DeviceTwinStatus) { s.LastActivityTime = &metav1.Time{Time: at} },
		func(s *v1alpha1.DeviceTwinStatus) {
			s.LastActivityTime = &metav1.Time{Time: at.Round(0).In(time.FixedZone("x", 3600))}
		},
		func(s *v1alpha1.DeviceTwinStatus) { s.Conditions[0].LastTransitionTime = metav1.NewTime(at) },
		func(s *v1alpha1.DeviceTwinStatus) {
			s.Conditions[0].LastTransitionTime = metav1.NewTime(at.Round(0).In(time.FixedZone("y", -7200)))
		},
		func(s *v1alpha1.DeviceTwinStatus) { s.Conditions = nil },
		func(s *v1alpha1.DeviceTwinStatus) { s.Conditions = []metav1.Condition{} },
		func(s *v1alpha1.DeviceTwinStatus) { s.Reported = &apiextensionsv1.JSON{} },
		func(s *v1alpha1.DeviceTwinStatus) { s.Reported = &apiextensionsv1.JSON{Raw: []byte{}} },
		func(s *v1alpha1.DeviceTwinStatus) { s.Reported = nil },
		func(s *v1alpha1.DeviceTwinStatus) { s.Metadata = &v1alpha1.TwinMetadata{} },
		func(s *v1alpha1.DeviceTwinStatus) { s.Metadata.Desired = &apiextensionsv1.JSON{Raw: []byte(`{"b":2}`)} },
	}
	for i, a := range same {
		for j, b := range same {
			check("variant "+string(rune('a'+i))+"/"+string(rune('a'+j)), st(a), st(b))
		}
	}
}

// fill sets every field reachable from v to a value derived from seed.
func fill(v reflect.Value, seed int) {
	switch v.Interface().(type) {
	case metav1.Time:
		v.Set(reflect.ValueOf(metav1.NewTime(time.Date(2026, 1, seed, 0, 0, 0, 0, time.UTC))))
		return
	case apiextensionsv1.JSON:
		v.Set(reflect.ValueOf(apiextensionsv1.JSON{Raw: []byte(`{"a":` + string(rune('0'+seed)) + `}`)}))
		return
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString("s" + string(rune('0'+seed)))
	case reflect.Int, reflect.Int32, reflect.Int64:
		v.SetInt(int64(seed))
	case reflect.Bool:
		v.SetBool(seed%2 == 1)
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
		fill(v.Elem(), seed)
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), 2, 2))
		fill(v.Index(0), seed)
		fill(v.Index(1), seed+1)
	case reflect.Struct:
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				fill(v.Field(i), seed)
			}
		}
	default:
		panic("fill: unhandled " + v.Type().String())
	}
}
