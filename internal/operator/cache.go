package operator

import (
	"bytes"
	"encoding/json"
	"slices"
	"strings"
	"unique"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
)

// LastAppliedAnnotation is kubectl's client-side apply record: a copy of
// the whole manifest that nothing in the operator reads.
const LastAppliedAnnotation = "kubectl.kubernetes.io/last-applied-configuration"

// CacheTransform is the operator's cache transform
// (cache.Options.DefaultTransform). DeviceTwins are trimmed by TrimTwin;
// other objects lose their status managedFields entries
// (DropStatusManagedFields), since the service API reads the times of a
// TwinConfiguration's entries.
//
// A cached twin is no longer what the API server stores, so nothing may
// Update a DeviceTwin from a cached copy (an Update that carries
// managedFields replaces the stored ones); the operator writes twins with
// merge patches between two cached copies and with server-side apply,
// which never send managedFields or the annotation.
func CacheTransform(obj any) (any, error) {
	if t, ok := obj.(*v1alpha1.DeviceTwin); ok {
		TrimTwin(t)
		return t, nil
	}
	return DropStatusManagedFields(obj)
}

// TrimTwin drops from t what the operator never reads, so that each of
// the fleet's cached twins costs less heap: kubectl's last-applied
// annotation, the status subresource's managedFields entries and, of the
// other entries, everything but the manager's name, operation and the two
// subtrees of FieldsV1 that are read (f:metadata.f:labels for the label
// mirroring, f:metadata.f:labels and f:spec.f:desired for fleet
// configurations), with only their "f:" members. An entry left empty goes,
// unless its manager is a configuration's: that name alone tells the
// configuration controller the twin may hold a configuration's content.
func TrimTwin(t *v1alpha1.DeviceTwin) {
	if _, ok := t.Annotations[LastAppliedAnnotation]; ok {
		delete(t.Annotations, LastAppliedAnnotation)
		if len(t.Annotations) == 0 {
			t.Annotations = nil
		}
	}
	var keep []metav1.ManagedFieldsEntry
	for _, e := range t.ManagedFields {
		if e.Subresource == "status" {
			continue
		}
		configuration := strings.HasPrefix(e.Manager, controllers.ConfigurationManagerPrefix)
		var fields *metav1.FieldsV1
		if e.FieldsV1 != nil {
			if raw := readFields(e.FieldsV1.Raw); raw != nil {
				fields = &metav1.FieldsV1{Raw: raw}
			} else if configuration {
				fields = &metav1.FieldsV1{Raw: []byte("{}")}
			}
		}
		if fields == nil && !configuration {
			continue
		}
		keep = append(keep, metav1.ManagedFieldsEntry{
			// Every twin has the same few managers: share their names.
			Manager:     unique.Make(e.Manager).Value(),
			Operation:   operation(e.Operation),
			Subresource: e.Subresource,
			FieldsV1:    fields,
		})
	}
	t.ManagedFields = keep
}

// operation returns op, shared when it is one of the two the API server
// writes.
func operation(op metav1.ManagedFieldsOperationType) metav1.ManagedFieldsOperationType {
	switch op {
	case metav1.ManagedFieldsOperationApply:
		return metav1.ManagedFieldsOperationApply
	case metav1.ManagedFieldsOperationUpdate:
		return metav1.ManagedFieldsOperationUpdate
	}
	return op
}

// readFields returns the part of a FieldsV1 set the operator reads:
// f:metadata.f:labels and f:spec.f:desired, with only their "f:" members
// (the readers skip ".", "k:" and "v:" members), or nil if that is empty
// or raw is not a JSON object.
func readFields(raw []byte) []byte {
	var set struct {
		Metadata struct {
			Labels json.RawMessage `json:"f:labels"`
		} `json:"f:metadata"`
		Spec struct {
			Desired json.RawMessage `json:"f:desired"`
		} `json:"f:spec"`
	}
	if json.Unmarshal(raw, &set) != nil {
		return nil
	}
	var labels, desired bytes.Buffer
	hasLabels := writeMembers(&labels, set.Metadata.Labels)
	hasDesired := writeMembers(&desired, set.Spec.Desired)
	if !hasLabels && !hasDesired {
		return nil
	}
	var out bytes.Buffer
	out.WriteByte('{')
	if hasLabels {
		out.WriteString(`"f:metadata":{"f:labels":`)
		out.Write(labels.Bytes())
		out.WriteByte('}')
	}
	if hasDesired {
		if hasLabels {
			out.WriteByte(',')
		}
		out.WriteString(`"f:spec":{"f:desired":`)
		out.Write(desired.Bytes())
		out.WriteByte('}')
	}
	out.WriteByte('}')
	return bytes.Clone(out.Bytes()) // the exact size: it stays in the cache
}

// writeMembers writes node with only its "f:" members, recursively, keys
// sorted, and reports whether it has any.
func writeMembers(w *bytes.Buffer, node json.RawMessage) bool {
	var m map[string]json.RawMessage
	if len(node) == 0 || json.Unmarshal(node, &m) != nil {
		return false
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		if strings.HasPrefix(k, "f:") {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return false
	}
	slices.Sort(keys)
	w.WriteByte('{')
	for i, k := range keys {
		if i > 0 {
			w.WriteByte(',')
		}
		name, _ := json.Marshal(k)
		w.Write(name)
		w.WriteByte(':')
		if !writeMembers(w, m[k]) {
			w.WriteString("{}")
		}
	}
	w.WriteByte('}')
	return true
}
