package operator

import (
	"testing"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// countingMapper answers every kind as namespaced and counts the lookups.
type countingMapper struct {
	meta.RESTMapper
	calls map[schema.GroupKind]int
}

func (m *countingMapper) RESTMapping(gk schema.GroupKind, versions ...string) (*meta.RESTMapping, error) {
	m.calls[gk]++
	if gk.Kind == "Missing" {
		return nil, &meta.NoKindMatchError{GroupKind: gk}
	}
	return &meta.RESTMapping{GroupVersionKind: gk.WithVersion(versions[0]), Scope: meta.RESTScopeNamespace}, nil
}

// The mappings of kubetwin.io and core kinds are looked up once; other
// groups' (whose CRDs may change) and failed lookups every time.
func TestStableMapperKeepsStableKinds(t *testing.T) {
	base := &countingMapper{calls: map[schema.GroupKind]int{}}
	m := &stableMapper{RESTMapper: base}
	claim := schema.GroupKind{Group: v1alpha1.GroupVersion.Group, Kind: "DeviceIDClaim"}
	secret := schema.GroupKind{Kind: "Secret"}
	other := schema.GroupKind{Group: "example.com", Kind: "Widget"}
	missing := schema.GroupKind{Group: v1alpha1.GroupVersion.Group, Kind: "Missing"}
	for range 3 {
		for _, gk := range []schema.GroupKind{claim, secret, other} {
			r, err := m.RESTMapping(gk, "v1")
			if err != nil || r.GroupVersionKind != gk.WithVersion("v1") {
				t.Fatalf("%v: %v, %v", gk, r, err)
			}
		}
		if _, err := m.RESTMapping(missing, "v1"); !meta.IsNoMatchError(err) {
			t.Fatalf("missing kind: %v, want a no-match error", err)
		}
	}
	if _, err := m.RESTMapping(claim, "v2"); err != nil {
		t.Fatal(err)
	}
	want := map[schema.GroupKind]int{claim: 2, secret: 1, other: 3, missing: 3}
	for gk, n := range want {
		if base.calls[gk] != n {
			t.Errorf("%v looked up %d times, want %d", gk, base.calls[gk], n)
		}
	}
}
