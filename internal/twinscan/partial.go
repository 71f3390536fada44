package twinscan

import (
	"bytes"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// Partial renders the part of a twin's IoT Hub document (hubtwin.FromDeviceTwin)
// that a set of paths reads, straight from the raw JSON of spec.tags,
// spec.desired and status.reported: it scans those bytes for the keys
// on each path and decodes only the values found. Rendering whole
// documents decodes every section and its $metadata, which is most of the
// time a residual query spends over a large fleet.
//
// The query's evaluator looks values up by path and nothing else, so a
// document holding the values at the query's paths (and deviceId, which
// orders results) answers it as the whole document does. Paths partial
// cannot render cheaply (a whole section, or $metadata) make it render
// the whole document.
type Partial struct {
	paths [][]string // no path is a prefix of another
	full  bool
}

// NewPartial prepares the rendering of paths.
func NewPartial(paths [][]string) *Partial {
	p := &Partial{}
	ps := slices.Clone(paths)
	ps = append(ps, []string{"deviceId"})
	slices.SortFunc(ps, slices.Compare)
	for _, s := range ps {
		if n := len(p.paths); n > 0 && hasPrefix(s, p.paths[n-1]) {
			continue // the shorter path's value holds this one
		}
		p.paths = append(p.paths, s)
		switch {
		case s[0] == "properties" && len(s) < 3,
			s[0] == "properties" && (s[1] == "desired" || s[1] == "reported") && s[2] == "$metadata":
			p.full = true
		}
	}
	return p
}

func hasPrefix(s, prefix []string) bool {
	return len(s) >= len(prefix) && slices.Equal(s[:len(prefix)], prefix)
}

// Doc renders t's document restricted to the paths.
func (p *Partial) Doc(t *v1alpha1.DeviceTwin) map[string]any {
	if p.full {
		return hubtwin.FromDeviceTwin(t)
	}
	d := map[string]any{}
	for _, s := range p.paths {
		v, ok, err := p.value(t, s)
		if err != nil {
			// Not expected (the API server stores valid JSON objects): let
			// the renderer decide what the document is.
			return hubtwin.FromDeviceTwin(t)
		}
		if ok {
			set(d, s, v)
		}
	}
	return d
}

// scratch is a partial document reused from twin to twin: the objects on
// the way to each path are made once, and each twin only sets or deletes
// the values at the paths. Evaluating a condition over 100,000 twins
// would otherwise allocate some 400,000 small maps.
//
// A query reads no object on the way (a path that is a prefix of another
// is the only one kept), so they may outlive the twin that needed them.
type scratch struct {
	doc   map[string]any
	slots []slot // one per path
}

type slot struct {
	parent map[string]any
	key    string
}

func (p *Partial) newScratch() *scratch {
	sc := &scratch{doc: map[string]any{}}
	for _, s := range p.paths {
		parent := sc.doc
		for _, k := range s[:len(s)-1] {
			next, ok := parent[k].(map[string]any)
			if !ok {
				next = map[string]any{}
				parent[k] = next
			}
			parent = next
		}
		sc.slots = append(sc.slots, slot{parent: parent, key: s[len(s)-1]})
	}
	return sc
}

// fill makes sc the partial document of t and returns it; it is valid
// until the next fill. (When the paths need the whole document, or t's
// JSON is malformed, it returns a new whole document instead.)
func (p *Partial) fill(sc *scratch, t *v1alpha1.DeviceTwin) map[string]any {
	if p.full {
		return hubtwin.FromDeviceTwin(t)
	}
	for i, s := range p.paths {
		v, ok, err := p.value(t, s)
		if err != nil {
			return hubtwin.FromDeviceTwin(t)
		}
		sl := sc.slots[i]
		if ok {
			sl.parent[sl.key] = v
		} else {
			delete(sl.parent, sl.key)
		}
	}
	return sc.doc
}

// value returns the value at path s of t's document.
func (p *Partial) value(t *v1alpha1.DeviceTwin, s []string) (any, bool, error) {
	switch s[0] {
	case "tags":
		return sectionValue(t.Spec.Tags, s[1:])
	case "properties":
		var raw *apiextensionsv1.JSON
		var version int64
		switch s[1] {
		case "desired":
			raw, version = t.Spec.Desired, t.Status.DesiredVersion
		case "reported":
			raw, version = t.Status.Reported, t.Status.ReportedVersion
		default:
			return nil, false, nil
		}
		if s[2] == "$version" {
			if len(s) > 3 {
				return nil, false, nil
			}
			return json.Number(strconv.FormatInt(version, 10)), true, nil
		}
		return sectionValue(raw, s[2:])
	case "configurations":
		// From the twin's labels, as hubtwin renders it.
		var v any = hubtwin.Configurations(t.Labels)
		for _, k := range s[1:] {
			m, ok := v.(map[string]any)
			if !ok || m[k] == nil {
				return nil, false, nil
			}
			v = m[k]
		}
		if m, ok := v.(map[string]any); ok && m == nil {
			return nil, false, nil
		}
		return v, true, nil
	}
	if len(s) > 1 {
		if s[0] == "capabilities" && s[1] == "iotEdge" && len(s) == 2 {
			return false, true, nil
		}
		return nil, false, nil // the other root members are not objects
	}
	switch s[0] {
	case "deviceId":
		return hubtwin.DeviceID(t), true, nil
	case "etag":
		return hubtwin.ETag(t.ResourceVersion), true, nil
	case "version":
		return json.Number(strconv.FormatInt(hubtwin.Version(t), 10)), true, nil
	case "status":
		if t.Spec.Status == "" {
			return hubtwin.StatusEnabled, true, nil
		}
		return string(t.Spec.Status), true, nil
	case "statusUpdateTime":
		return hubtwin.ZeroTime, true, nil
	case "connectionState":
		if t.Status.ConnectionState == "" {
			return v1alpha1.ConnectionStateDisconnected, true, nil
		}
		return t.Status.ConnectionState, true, nil
	case "connectionStateUpdatedTime":
		return timeOrZero(t.Status.ConnectionStateUpdatedTime), true, nil
	case "lastActivityTime":
		return timeOrZero(t.Status.LastActivityTime), true, nil
	case "cloudToDeviceMessageCount":
		return json.Number("0"), true, nil
	case "authenticationType":
		return hubtwin.AuthenticationTypeSAS, true, nil
	case "capabilities":
		return map[string]any{"iotEdge": false}, true, nil
	}
	return nil, false, nil
}

func timeOrZero(t *metav1.Time) string {
	if t == nil || t.IsZero() {
		return hubtwin.ZeroTime
	}
	return t.UTC().Format(time.RFC3339)
}

// set stores v at path s of d, making the objects on the way.
func set(d map[string]any, s []string, v any) {
	for _, k := range s[:len(s)-1] {
		next, ok := d[k].(map[string]any)
		if !ok {
			next = map[string]any{}
			d[k] = next
		}
		d = next
	}
	d[s[len(s)-1]] = v
}

// sectionValue returns the value at keys in an optional JSON section. As
// hubtwin renders it, a section that is absent, null or not an object is
// empty. A section holding malformed JSON is an error.
func sectionValue(raw *apiextensionsv1.JSON, keys []string) (any, bool, error) {
	if raw == nil {
		return nil, false, nil
	}
	b := bytes.TrimSpace(raw.Raw)
	if len(b) == 0 || string(b) == "null" {
		return nil, false, nil
	}
	if len(keys) == 0 {
		d, err := twin.DecodeRaw(b)
		return d, err == nil, err
	}
	if b[0] != '{' {
		// Not an object: rendered as an empty one, if it is valid JSON.
		if !json.Valid(b) {
			return nil, false, errMalformed
		}
		return nil, false, nil
	}
	v, end, err := lookupRaw(b, 0, keys)
	if err != nil {
		return nil, false, err
	}
	if skipSpace(b, end) != len(b) {
		return nil, false, errMalformed // data after the object
	}
	if v == nil {
		return nil, false, nil
	}
	val, err := decodeValue(v)
	return val, err == nil, err
}

var errMalformed = errors.New("malformed JSON")

// lookupRaw scans the object starting at b[i] for the member keys[0] and
// returns the raw value at keys within it (nil when absent or when a value
// on the way is not an object), and where the object ends. When a key
// appears twice the last one counts, as encoding/json decides. The whole
// object is checked, so malformed JSON is an error wherever it is.
func lookupRaw(b []byte, i int, keys []string) (found []byte, end int, err error) {
	i = skipSpace(b, i)
	if i >= len(b) || b[i] != '{' {
		return nil, 0, errMalformed
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return nil, i + 1, nil
	}
	for {
		if i >= len(b) || b[i] != '"' {
			return nil, 0, errMalformed
		}
		kEnd, plain, err := scanString(b, i)
		if err != nil {
			return nil, 0, err
		}
		var match bool
		if plain {
			match = string(b[i+1:kEnd-1]) == keys[0]
		} else {
			k, ok := unquote(b[i:kEnd])
			if !ok {
				return nil, 0, errMalformed
			}
			match = k == keys[0]
		}
		i = skipSpace(b, kEnd)
		if i >= len(b) || b[i] != ':' {
			return nil, 0, errMalformed
		}
		vStart := skipSpace(b, i+1)
		vEnd, err := skipValue(b, vStart)
		if err != nil {
			return nil, 0, err
		}
		if match {
			found = b[vStart:vEnd]
		}
		i = skipSpace(b, vEnd)
		if i >= len(b) {
			return nil, 0, errMalformed
		}
		if b[i] == '}' {
			end = i + 1
			break
		}
		if b[i] != ',' {
			return nil, 0, errMalformed
		}
		i = skipSpace(b, i+1)
	}
	if found == nil || len(keys) == 1 {
		return found, end, nil
	}
	if found[0] != '{' {
		return nil, end, nil // lookup through a non-object is undefined
	}
	inner, _, err := lookupRaw(found, 0, keys[1:])
	return inner, end, err
}

// unquote decodes raw, a JSON string.
func unquote(raw []byte) (string, bool) {
	var s string
	err := json.Unmarshal(raw, &s)
	return s, err == nil
}

// decodeValue decodes one raw JSON value as twin documents hold it
// (numbers as json.Number, objects as map[string]any), with fast paths
// for the plain scalars residual conditions mostly compare.
func decodeValue(v []byte) (any, error) {
	switch v[0] {
	case '"':
		if end, plain, err := scanString(v, 0); err == nil && plain && end == len(v) {
			return string(v[1 : len(v)-1]), nil
		}
	case 't':
		return true, nil // skipValue checked the literal
	case 'f':
		return false, nil
	case 'n':
		return nil, nil
	case '{', '[':
	default:
		return json.Number(v), nil // skipValue checked the number
	}
	dec := json.NewDecoder(bytes.NewReader(v))
	dec.UseNumber()
	var out any
	if err := dec.Decode(&out); err != nil {
		return nil, errMalformed
	}
	return out, nil
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// scanString returns the end of the JSON string starting at b[i] (just
// past its closing quote) and whether it is plain: printable ASCII without
// escapes, so that its bytes are its value as encoding/json decodes it.
func scanString(b []byte, i int) (end int, plain bool, err error) {
	plain = true
	for i++; i < len(b); i++ {
		c := b[i]
		switch {
		case c == '"':
			return i + 1, plain, nil
		case c == '\\':
			plain = false
			i++ // the escaped byte; encoding/json checks the escape if it matters
			if i >= len(b) {
				return 0, false, errMalformed
			}
		case c < 0x20:
			return 0, false, errMalformed
		case c >= 0x80:
			plain = false
		}
	}
	return 0, false, errMalformed
}

// skipValue returns the end of the JSON value starting at b[i].
func skipValue(b []byte, i int) (int, error) {
	if i >= len(b) {
		return 0, errMalformed
	}
	switch c := b[i]; {
	case c == '"':
		end, _, err := scanString(b, i)
		return end, err
	case c == '{' || c == '[':
		closing := byte('}')
		if c == '[' {
			closing = ']'
		}
		i = skipSpace(b, i+1)
		if i < len(b) && b[i] == closing {
			return i + 1, nil
		}
		for {
			if c == '{' {
				if i >= len(b) || b[i] != '"' {
					return 0, errMalformed
				}
				end, _, err := scanString(b, i)
				if err != nil {
					return 0, err
				}
				i = skipSpace(b, end)
				if i >= len(b) || b[i] != ':' {
					return 0, errMalformed
				}
				i = skipSpace(b, i+1)
			}
			end, err := skipValue(b, i)
			if err != nil {
				return 0, err
			}
			i = skipSpace(b, end)
			if i >= len(b) {
				return 0, errMalformed
			}
			if b[i] == closing {
				return i + 1, nil
			}
			if b[i] != ',' {
				return 0, errMalformed
			}
			i = skipSpace(b, i+1)
		}
	case c == 't':
		return literalEnd(b, i, "true")
	case c == 'f':
		return literalEnd(b, i, "false")
	case c == 'n':
		return literalEnd(b, i, "null")
	default:
		return numberEnd(b, i)
	}
}

func literalEnd(b []byte, i int, lit string) (int, error) {
	if !bytes.HasPrefix(b[i:], []byte(lit)) {
		return 0, errMalformed
	}
	return i + len(lit), nil
}

// numberEnd returns the end of the JSON number at b[i].
func numberEnd(b []byte, i int) (int, error) {
	digits := func() int {
		n := 0
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
			n++
		}
		return n
	}
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case digits() == 0:
		return 0, errMalformed
	}
	if i < len(b) && b[i] == '.' {
		i++
		if digits() == 0 {
			return 0, errMalformed
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if digits() == 0 {
			return 0, errMalformed
		}
	}
	return i, nil
}
