package controllers_test

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/operator"
)

// TestCacheTransformKeepsWhatIsRead: the label mirroring and fleet
// configurations read the same from a cached twin (operator.CacheTransform)
// as from the stored one, for a twin read back from kube-apiserver and for
// entries the transform empties or rewrites.
func TestCacheTransformKeepsWhatIsRead(t *testing.T) {
	data, err := os.ReadFile("../internal/operator/testdata/twin.json")
	if err != nil {
		t.Fatal(err)
	}
	stored := &v1alpha1.DeviceTwin{}
	if err := json.Unmarshal(data, stored); err != nil {
		t.Fatal(err)
	}
	fields := metav1.NewFieldsV1
	cfg := controllers.ConfigurationManagerPrefix + "c"
	synthetic := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{ManagedFields: []metav1.ManagedFieldsEntry{
		{Manager: controllers.LabelManager, FieldsV1: fields(`{"f:metadata":{"f:finalizers":{},"f:labels":{".":{},"f:a":{},"f:b.c":{}}}}`)},
		{Manager: cfg, FieldsV1: fields(`{"f:metadata":{"f:finalizers":{}}}`)},
		{Manager: cfg + "2", FieldsV1: fields(`{"f:spec":{"f:desired":{"f:x":{".":{},"f:y":{}},"f:z":{".":{}},"f:l":{"k:{\"a\":1}":{"f:b":{}}}}}}`)},
		{Manager: "kubectl-edit", FieldsV1: fields(`{"f:spec":{"f:deviceId":{},"f:tags":{"f:a":{}}}}`)},
		{Manager: "gitops", FieldsV1: fields(`{"f:metadata":{"f:labels":{}},"f:spec":{"f:desired":{}}}`)},
		{Manager: "broken", FieldsV1: fields(`{"f:metadata":`)},
		{Manager: controllers.StatusManager, Subresource: "status", FieldsV1: fields(`{"f:status":{}}`)},
	}}}
	for name, tw := range map[string]*v1alpha1.DeviceTwin{"stored": stored, "synthetic": synthetic} {
		before := controllers.ReadManagedFields(tw)
		cached := tw.DeepCopy()
		if _, err := operator.CacheTransform(cached); err != nil {
			t.Fatal(err)
		}
		if after := controllers.ReadManagedFields(cached); after != before {
			t.Errorf("%s: read from the stored twin:\n%s\nfrom the cached one:\n%s", name, before, after)
		}
		if !strings.Contains(before, "configuration manager") || !strings.Contains(before, "paths=[") {
			t.Errorf("%s: the test twin has no configuration content:\n%s", name, before)
		}
	}
}
