package operator

import (
	"bytes"
	"encoding/json"
	"strings"
	"unique"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
)

// LastAppliedAnnotation is kubectl's client-side apply record: a copy of
// the whole manifest that nothing in the operator reads.
const LastAppliedAnnotation = "kubectl.kubernetes.io/last-applied-configuration"

// CacheTransform is the operator's cache transform
// (cache.Options.DefaultTransform). DeviceTwins are trimmed by TrimTwin,
// key Secrets by TrimSecret; other objects lose their status managedFields entries
// (DropStatusManagedFields), since the service API reads the times of a
// TwinConfiguration's entries.
//
// A cached twin is no longer what the API server stores, so nothing may
// Update a DeviceTwin from a cached copy (an Update that carries
// managedFields replaces the stored ones); the operator writes twins with
// merge patches between two cached copies and with server-side apply,
// which never send managedFields or the annotation.
func CacheTransform(obj any) (any, error) {
	switch o := obj.(type) {
	case *v1alpha1.DeviceTwin:
		TrimTwin(o)
		return o, nil
	case *corev1.Secret:
		TrimSecret(o)
		return o, nil
	}
	return DropStatusManagedFields(obj)
}

// TrimSecret drops from a cached key Secret (the cache holds only those,
// one per twin) its managedFields (every field of the write that created
// it), which the operator never reads. The operator updates a key Secret
// from a cached copy when its keys or connection string change; an Update
// without managedFields leaves the stored ones as they are. Annotations
// stay: an Update without one would delete it (kubectl's last-applied
// record on a Secret a user applied, for one; the operator's own key
// Secrets have none).
//
// Strings every key Secret repeats (its namespace, label and data keys,
// its owner's kind and API version, its type) are shared, as a twin's are.
func TrimSecret(s *corev1.Secret) {
	s.ManagedFields = nil
	s.Namespace = share(s.Namespace)
	s.Type = corev1.SecretType(share(string(s.Type)))
	// Assigning to a key already there stores the shared key in its
	// place: no new map.
	for k, v := range s.Labels {
		s.Labels[share(k)] = sharedLabelValue(v)
	}
	for k, v := range s.Data {
		s.Data[share(k)] = v
	}
	for i := range s.OwnerReferences {
		o := &s.OwnerReferences[i]
		o.APIVersion, o.Kind = share(o.APIVersion), share(o.Kind)
	}
}

// sharedLabelValue shares the values of the labels the operator puts on
// key Secrets; others may be unique to one Secret.
func sharedLabelValue(v string) string {
	switch v {
	case "true", "kubetwin":
		return share(v)
	}
	return v
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
			if raw := readFields(e.FieldsV1.GetRawBytes()); raw != nil {
				fields = &metav1.FieldsV1{}
				fields.SetRawBytes(raw)
			} else if configuration {
				fields = metav1.NewFieldsV1("{}")
			}
		}
		if fields == nil && !configuration {
			continue
		}
		keep = append(keep, metav1.ManagedFieldsEntry{
			// Every twin has the same few managers: share their names.
			Manager:     share(e.Manager),
			Operation:   operation(e.Operation),
			Subresource: e.Subresource,
			FieldsV1:    fields,
		})
	}
	t.ManagedFields = keep
	shareStrings(t)
}

// shareStrings makes t use one copy, shared by every twin, of the strings
// that come from a small set: the decoder allocates them again for each
// twin. Names and values that may be unique to a twin are left alone (a
// shared copy would cost more than it saves).
func shareStrings(t *v1alpha1.DeviceTwin) {
	t.Namespace = share(t.Namespace)
	for i, f := range t.Finalizers {
		t.Finalizers[i] = share(f)
	}
	if len(t.Labels) > 0 {
		labels := make(map[string]string, len(t.Labels))
		for k, v := range t.Labels {
			labels[share(k)] = v
		}
		t.Labels = labels
	}
	t.Spec.Status = v1alpha1.DeviceStatus(share(string(t.Spec.Status)))
	t.Status.ConnectionState = share(t.Status.ConnectionState)
	for i := range t.Status.Conditions {
		c := &t.Status.Conditions[i]
		c.Type, c.Reason = share(c.Type), share(c.Reason)
		c.Status = metav1.ConditionStatus(share(string(c.Status)))
	}
}

func share(s string) string {
	if s == "" {
		return s
	}
	return unique.Make(s).Value()
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
// or raw is not valid JSON. It scans the bytes rather than decoding them
// into maps: every twin of the fleet goes through it at each start.
func readFields(raw []byte) []byte {
	if !json.Valid(raw) {
		return nil
	}
	s := fieldsScanner{b: raw}
	var buf bytes.Buffer
	labels, desired := [2]int{}, [2]int{}
	s.object(func(key []byte) {
		switch {
		case keyIs(key, "f:metadata"):
			s.object(func(key []byte) {
				if keyIs(key, "f:labels") {
					labels = s.members(&buf)
				} else {
					s.skip()
				}
			})
		case keyIs(key, "f:spec"):
			s.object(func(key []byte) {
				if keyIs(key, "f:desired") {
					desired = s.members(&buf)
				} else {
					s.skip()
				}
			})
		default:
			s.skip()
		}
	})
	b := buf.Bytes()
	hasLabels, hasDesired := labels[1] > labels[0], desired[1] > desired[0]
	if !hasLabels && !hasDesired {
		return nil
	}
	const l, d = `{"f:metadata":{"f:labels":`, `"f:spec":{"f:desired":`
	size := 2 + labels[1] - labels[0] + desired[1] - desired[0]
	if hasLabels {
		size += len(l) + 1
	}
	if hasDesired {
		size += len(d) + 2 // with the comma
	}
	out := make([]byte, 0, size)
	if hasLabels {
		out = append(append(append(out, l...), b[labels[0]:labels[1]]...), '}')
	} else {
		out = append(out, '{')
	}
	if hasDesired {
		if hasLabels {
			out = append(out, ',')
		}
		out = append(append(append(out, d...), b[desired[0]:desired[1]]...), '}')
	}
	return append(out, '}')
}

// fieldsScanner reads valid JSON (a FieldsV1 set) at b[i:].
type fieldsScanner struct {
	b []byte
	i int
}

func (s *fieldsScanner) space() {
	for s.i < len(s.b) && (s.b[s.i] == ' ' || s.b[s.i] == '\t' || s.b[s.i] == '\n' || s.b[s.i] == '\r') {
		s.i++
	}
}

// object calls member for each member of the object at i, with the key as
// written (quotes included) and i at its value, which member must read;
// a value that is not an object is skipped.
func (s *fieldsScanner) object(member func(key []byte)) {
	s.space()
	if s.b[s.i] != '{' {
		s.skip()
		return
	}
	s.i++
	for {
		s.space()
		switch s.b[s.i] {
		case '}':
			s.i++
			return
		case ',':
			s.i++
			continue
		}
		start := s.i
		s.str()
		key := s.b[start:s.i]
		s.space()
		s.i++ // ':'
		s.space()
		member(key)
	}
}

// members writes the object at i to w with only its "f:" members,
// recursively (a member without any becomes {}; a value that is not an
// object is copied), and returns where it is in w: empty if it has none.
func (s *fieldsScanner) members(w *bytes.Buffer) [2]int {
	start, n := w.Len(), 0
	s.object(func(key []byte) {
		if !keyHasPrefix(key, "f:") {
			s.skip()
			return
		}
		if n == 0 {
			w.WriteByte('{')
		} else {
			w.WriteByte(',')
		}
		n++
		w.Write(key)
		w.WriteByte(':')
		if s.b[s.i] != '{' {
			from := s.i
			s.skip()
			w.Write(s.b[from:s.i])
		} else if sub := s.members(w); sub[1] == sub[0] {
			w.WriteString("{}")
		}
	})
	if n == 0 {
		return [2]int{start, start}
	}
	w.WriteByte('}')
	return [2]int{start, w.Len()}
}

// skip moves i past the value at i.
func (s *fieldsScanner) skip() {
	s.space()
	switch s.b[s.i] {
	case '"':
		s.str()
	case '{', '[':
		depth := 0
		for {
			switch s.b[s.i] {
			case '"':
				s.str()
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
			}
			s.i++
			if depth == 0 {
				return
			}
		}
	default:
		for s.i < len(s.b) && strings.IndexByte(",}] \t\r\n", s.b[s.i]) < 0 {
			s.i++
		}
	}
}

// str moves i past the string at i.
func (s *fieldsScanner) str() {
	for s.i++; s.b[s.i] != '"'; s.i++ {
		if s.b[s.i] == '\\' {
			s.i++
		}
	}
	s.i++
}

// keyHasPrefix and keyIs read a key as written; one with escapes is
// decoded first.
func keyHasPrefix(key []byte, prefix string) bool {
	if bytes.HasPrefix(key[1:], []byte(prefix)) {
		return true
	}
	k, ok := decodeKey(key)
	return ok && strings.HasPrefix(k, prefix)
}

func keyIs(key []byte, name string) bool {
	if len(key) == len(name)+2 && string(key[1:len(key)-1]) == name {
		return true
	}
	k, ok := decodeKey(key)
	return ok && k == name
}

func decodeKey(key []byte) (string, bool) {
	if bytes.IndexByte(key, '\\') < 0 {
		return "", false
	}
	var k string
	return k, json.Unmarshal(key, &k) == nil
}
