package kubectltwin

import (
	"bytes"
	"encoding/json"
	"slices"
	"strings"

	"github.com/kubetwin/kubetwin/internal/twin"
)

// The query API's items are JSON already: for -o json they are written
// from their bytes as writeJSON writes them decoded (the same order,
// indentation and escaping), without a map per object. A whole fleet's
// answer is a hundred megabytes or more.

// twinSorted says where twinDocOrder puts the members of an object in
// name order, and of every object below it down to the next array: all
// but the root, properties and its sections.
func twinSorted(path []string) bool {
	return len(path) > 0 && (path[0] != "properties" || len(path) > 2)
}

// rowSorted says where rowOrder puts the members of an object in name
// order: all but the row's.
func rowSorted(path []string) bool { return len(path) > 0 }

// rawWriter writes valid JSON values (as a JSON decoder has checked them)
// as writeJSON writes the values they decode to, with order. sorted(path)
// must say where order sorts by name from path down (twinSorted for
// twinDocOrder): there, members already in name order are written as
// they come, without a string per name.
type rawWriter struct {
	b      *bytes.Buffer
	order  orderFunc
	sorted func(path []string) bool
	// The members (names with their quotes, values) of the objects being
	// written, the innermost last; the elements of the arrays likewise.
	keys, vals, elems [][]byte
}

// value writes raw, the value at path.
func (w *rawWriter) value(raw []byte, path []string, indent string) {
	raw = bytes.TrimSpace(raw)
	switch raw[0] {
	case '{':
		if w.sorted(path) {
			w.sortedObject(raw, indent)
			return
		}
		base := w.members(raw)
		n := len(w.keys) - base
		if n == 0 {
			w.b.WriteString("{}")
			return
		}
		names := make([]string, n)
		for i := range names {
			names[i] = rawString(w.keys[base+i])
		}
		w.b.WriteString("{\n")
		inner := indent + jsonIndent
		for i, k := range w.order(path, names) {
			if i > 0 {
				w.b.WriteString(",\n")
			}
			w.b.WriteString(inner)
			writeString(w.b, k)
			w.b.WriteString(": ")
			w.value(w.vals[base+slices.Index(names, k)], append(path, k), inner)
		}
		w.closeObject(base, indent)
	case '[':
		w.array(raw, indent)
	default:
		w.scalar(raw)
	}
}

// sortedObject writes raw, an object whose members are written in name
// order, as are those of the objects in it.
func (w *rawWriter) sortedObject(raw []byte, indent string) {
	base := w.members(raw)
	keys := w.keys[base:]
	if len(keys) == 0 {
		w.b.WriteString("{}")
		return
	}
	// at[i] is the member written i-th: nil when they come in name order
	// with names that need no escaping, the usual case.
	var at []int
	var names []string
	for i, k := range keys {
		// Plain names compare as their bytes between the quotes (with
		// the quotes, "0 " would come before "0").
		if !plainRawString(k) || i > 0 && bytes.Compare(keys[i-1][1:len(keys[i-1])-1], k[1:len(k)-1]) >= 0 {
			names = make([]string, len(keys))
			at = make([]int, len(keys))
			for j := range keys {
				names[j], at[j] = rawString(keys[j]), j
			}
			slices.SortStableFunc(at, func(a, b int) int { return strings.Compare(names[a], names[b]) })
			break
		}
	}
	w.b.WriteString("{\n")
	inner := indent + jsonIndent
	for i := range keys {
		j := i
		if at != nil {
			j = at[i]
		}
		if i > 0 {
			w.b.WriteString(",\n")
		}
		w.b.WriteString(inner)
		if names == nil {
			w.b.Write(w.keys[base+j])
		} else {
			writeString(w.b, names[j])
		}
		w.b.WriteString(": ")
		switch v := w.vals[base+j]; v[0] {
		case '{':
			w.sortedObject(v, inner)
		case '[':
			w.array(v, inner)
		default:
			w.scalar(v)
		}
	}
	w.closeObject(base, indent)
}

func (w *rawWriter) closeObject(base int, indent string) {
	w.keys, w.vals = w.keys[:base], w.vals[:base]
	w.b.WriteByte('\n')
	w.b.WriteString(indent)
	w.b.WriteByte('}')
}

// array writes raw, an array. Its items are documents of their own, as
// writeJSON takes them: their paths restart.
func (w *rawWriter) array(raw []byte, indent string) {
	base := len(w.elems)
	i := skipSpace(raw, 1)
	for raw[i] != ']' {
		end := skipValue(raw, i)
		w.elems = append(w.elems, raw[i:end])
		i = skipSpace(raw, end)
		if raw[i] == ',' {
			i = skipSpace(raw, i+1)
		}
	}
	if len(w.elems) == base {
		w.b.WriteString("[]")
		return
	}
	w.b.WriteString("[\n")
	inner := indent + jsonIndent
	for i := base; i < len(w.elems); i++ {
		if i > base {
			w.b.WriteString(",\n")
		}
		w.b.WriteString(inner)
		w.value(w.elems[i], nil, inner)
	}
	w.elems = w.elems[:base]
	w.b.WriteString("\n" + indent + "]")
}

// scalar writes a string, a number (valid: writeJSON writes its literal),
// true, false or null.
func (w *rawWriter) scalar(raw []byte) {
	if raw[0] == '"' && !plainRawString(raw) {
		writeString(w.b, rawString(raw))
		return
	}
	w.b.Write(raw)
}

// members appends the names and values of raw, a JSON object, to w.keys
// and w.vals, and returns where they start.
func (w *rawWriter) members(raw []byte) int {
	base := len(w.keys)
	eachMember(raw, func(key, val []byte) {
		w.keys = append(w.keys, key)
		w.vals = append(w.vals, val)
	})
	return base
}

func skipSpace(raw []byte, i int) int {
	for i < len(raw) && (raw[i] == ' ' || raw[i] == '\t' || raw[i] == '\n' || raw[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the end of the string that starts at raw[i].
func skipString(raw []byte, i int) int {
	for i++; i < len(raw); i++ {
		switch raw[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return i
}

// skipValue returns the end of the value that starts at raw[i].
func skipValue(raw []byte, i int) int {
	switch raw[i] {
	case '"':
		return skipString(raw, i)
	case '{', '[':
		depth := 0
		for ; i < len(raw); i++ {
			switch raw[i] {
			case '"':
				i = skipString(raw, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
		}
		return i
	}
	for ; i < len(raw); i++ {
		switch raw[i] {
		case ',', '}', ']', ' ', '\t', '\r', '\n':
			return i
		}
	}
	return i
}

// appendCell appends the table cell of raw, a valid JSON value, to b: as
// cell writes it decoded. An object is written compact with its members
// in name order, as twin.Encode writes it, without decoding it.
func appendCell(b, raw []byte) []byte {
	switch raw[0] {
	case '"':
		if plainRawString(raw) {
			return append(b, raw[1:len(raw)-1]...)
		}
		return append(b, rawString(raw)...)
	case '{':
		return appendCompact(b, raw)
	case '[':
		return append(b, cell(rawValue(raw))...) // encoding/json's escaping
	}
	return append(b, raw...) // a number's literal, true, false, null
}

// appendCompact appends raw, a valid JSON value, as twin.Encode writes it
// decoded: compact, members in name order.
func appendCompact(b, raw []byte) []byte {
	switch raw[0] {
	case '{':
		var keys, vals [][]byte
		eachMember(raw, func(key, val []byte) {
			keys = append(keys, key)
			vals = append(vals, val)
		})
		at := make([]int, len(keys))
		names := make([]string, len(keys))
		for i, k := range keys {
			at[i], names[i] = i, rawString(k)
		}
		slices.SortFunc(at, func(x, y int) int { return strings.Compare(names[x], names[y]) })
		b = append(b, '{')
		for i, j := range at {
			if i > 0 {
				b = append(b, ',')
			}
			b = twin.AppendString(b, names[j])
			b = appendCompact(append(b, ':'), vals[j])
		}
		return append(b, '}')
	case '[':
		b = append(b, '[')
		i := skipSpace(raw, 1)
		for n := 0; raw[i] != ']'; n++ {
			end := skipValue(raw, i)
			if n > 0 {
				b = append(b, ',')
			}
			b = appendCompact(b, raw[i:end])
			if i = skipSpace(raw, end); raw[i] == ',' {
				i = skipSpace(raw, i+1)
			}
		}
		return append(b, ']')
	case '"':
		if plainRawString(raw) {
			return append(b, raw...)
		}
		return twin.AppendString(b, rawString(raw))
	}
	return append(b, raw...)
}

// plainRawString: raw, a JSON string, holds only printable ASCII and no
// escape, so it is written as it is (as writeString writes it decoded).
func plainRawString(raw []byte) bool {
	for _, c := range raw[1 : len(raw)-1] {
		if c < 0x20 || c >= 0x7f || c == '\\' {
			return false
		}
	}
	return true
}

// rawString decodes raw, a valid JSON string.
func rawString(raw []byte) string {
	if plainRawString(raw) {
		return string(raw[1 : len(raw)-1])
	}
	var s string
	_ = json.Unmarshal(raw, &s)
	return s
}

// eachMember calls fn with the name (with its quotes) and the value of
// each member of raw, a JSON object.
func eachMember(raw []byte, fn func(key, val []byte)) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '{' {
		return
	}
	i := skipSpace(raw, 1)
	for raw[i] != '}' {
		end := skipString(raw, i)
		key := raw[i:end]
		i = skipSpace(raw, end)
		i = skipSpace(raw, i+1) // :
		end = skipValue(raw, i)
		fn(key, raw[i:end])
		i = skipSpace(raw, end)
		if raw[i] == ',' {
			i = skipSpace(raw, i+1)
		}
	}
}

// tableDoc returns the members of raw, a twin document, that a table of
// twins shows (printTwinTable; wide: also version, status and tags), as
// the document decoded has them.
func tableDoc(raw []byte, wide bool) map[string]any {
	d := map[string]any{}
	eachMember(raw, func(key, val []byte) {
		switch k := rawString(key); k {
		case "deviceId", "connectionState", "lastActivityTime":
			d[k] = rawValue(val)
		case "version", "status", "tags":
			if wide {
				d[k] = rawValue(val)
			}
		case "properties":
			props := map[string]any{}
			eachMember(val, func(key, val []byte) {
				if s := rawString(key); s == "desired" || s == "reported" {
					sec := map[string]any{}
					eachMember(val, func(key, val []byte) {
						if rawString(key) == "$version" {
							sec["$version"] = rawValue(val)
						}
					})
					props[s] = sec
				}
			})
			d[k] = props
		}
	})
	return d
}

// rawValue decodes raw, a valid JSON value, as twin.Decode decodes it.
func rawValue(raw []byte) any {
	switch raw[0] {
	case '"':
		return rawString(raw)
	case 't':
		return true
	case 'f':
		return false
	case 'n':
		return nil
	case '{', '[':
		d, err := twin.DecodeValid([]byte(`{"v":` + string(raw) + `}`))
		if err != nil {
			return nil
		}
		return d["v"]
	}
	return json.Number(raw)
}
