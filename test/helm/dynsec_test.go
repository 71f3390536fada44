package helm

import (
	"slices"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// TestWatchNamespaceDynsecSecret: with watchNamespace and an external
// broker, the operator's Role in the release namespace lets it create and
// read (by name only) the Secret of --mosquitto-dynsec's fingerprint key;
// without an external broker it is not named.
func TestWatchNamespaceDynsecSecret(t *testing.T) {
	named := func(objs []*unstructured.Unstructured) (names []string, create bool) {
		for _, o := range objs {
			if o.GetKind() != "Role" || o.GetNamespace() != "kubetwin-system" || o.GetName() != "kt-kubetwin-manager" {
				continue
			}
			rules, _, _ := unstructured.NestedSlice(o.Object, "rules")
			for _, r := range rules {
				rule := r.(map[string]any)
				res, _, _ := unstructured.NestedStringSlice(rule, "resources")
				verbs, _, _ := unstructured.NestedStringSlice(rule, "verbs")
				if !slices.Contains(res, "secrets") {
					continue
				}
				if slices.Contains(verbs, "create") {
					create = true
				}
				if slices.Contains(verbs, "get") {
					n, _, _ := unstructured.NestedStringSlice(rule, "resourceNames")
					names = append(names, n...)
				}
			}
		}
		return names, create
	}
	names, create := named(render(t, "kt", "kubetwin-system", "--set", "watchNamespace=tenant",
		"--set", "broker.external.url=ssl://mosquitto:8883"))
	if !slices.Contains(names, "kubetwin-dynsec-fingerprint") || !create {
		t.Errorf("external broker: Secrets by name %v (create: %v), want kubetwin-dynsec-fingerprint among them and create", names, create)
	}
	names, _ = named(render(t, "kt", "kubetwin-system", "--set", "watchNamespace=tenant"))
	if slices.Contains(names, "kubetwin-dynsec-fingerprint") {
		t.Errorf("embedded broker: Secrets by name %v name the dynsec key", names)
	}
}
