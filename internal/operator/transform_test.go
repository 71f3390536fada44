package operator

import (
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// The cache keeps every managedFields entry but the status subresource's:
// the label mirroring and fleet configurations read their own managers'.
func TestDropStatusManagedFields(t *testing.T) {
	entry := func(manager, sub string) metav1.ManagedFieldsEntry {
		return metav1.ManagedFieldsEntry{Manager: manager, Subresource: sub,
			FieldsV1: metav1.NewFieldsV1(`{"f:metadata":{}}`)}
	}
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Name: "a", ManagedFields: []metav1.ManagedFieldsEntry{
		entry("kubetwin-labels", ""), entry("kubetwin", "status"), entry("kubectl", ""), entry("other", "status"),
	}}}
	out, err := DropStatusManagedFields(tw)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range out.(*v1alpha1.DeviceTwin).ManagedFields {
		got = append(got, e.Manager)
	}
	if len(got) != 2 || got[0] != "kubetwin-labels" || got[1] != "kubectl" {
		t.Fatalf("managers kept: %v, want [kubetwin-labels kubectl]", got)
	}

	// Nothing to drop: the object is untouched.
	plain := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{ManagedFields: []metav1.ManagedFieldsEntry{entry("x", "")}}}
	if out, _ := DropStatusManagedFields(plain); len(out.(*v1alpha1.DeviceTwin).ManagedFields) != 1 {
		t.Fatal("an entry of the main resource was dropped")
	}
	// A tombstone (not an object) passes through.
	tomb := cache.DeletedFinalStateUnknown{Key: "ns/a", Obj: tw}
	if out, err := DropStatusManagedFields(tomb); err != nil || out != any(tomb) {
		t.Fatalf("tombstone: %v, %v", out, err)
	}
}
