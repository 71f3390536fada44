package twin

import (
	"math"
	"strconv"
	"unicode/utf8"
)

// Widest $metadata stamps, so that [StoredSize] does not depend on the
// clock or on how far a twin's desired $version has grown.
const (
	// storedTimeLen is a quoted $lastUpdated: TimeFormat in UTC.
	storedTimeLen = len(`"2006-01-02T15:04:05.000000000Z"`)
	// storedVersionLen is the widest $lastUpdatedVersion (an int64).
	storedVersionLen = len("9223372036854775807")
)

// StoredSize is how many bytes a document of section s takes in a
// DeviceTwin as the API server stores it: its JSON, escaped as encoding/json
// escapes (HTML characters included), plus for desired and reported the JSON
// of its $metadata with the widest stamps. [Size], the section limit IoT Hub
// defines, charges a key and its value only, so an empty object or string
// costs its key's length; but every member, empty or not, gets a $metadata
// node of some 50 bytes (90 for desired), and a key is stored twice. The
// document as stored is therefore bounded by [Section.MaxStoredSize] too.
func StoredSize(s Section, doc Doc) int {
	n := storedObject(doc)
	switch s {
	case Desired:
		n += metaObject(doc, true)
	case Reported:
		n += metaObject(doc, false)
	}
	return n
}

// storedObject is the JSON length of an object.
func storedObject(d Doc) int {
	n := 2 // {}
	if len(d) > 1 {
		n += len(d) - 1 // commas
	}
	for k, v := range d {
		n += storedString(k) + 1 + storedValue(v)
	}
	return n
}

func storedValue(v any) int {
	switch x := v.(type) {
	case nil:
		return len("null")
	case string:
		return storedString(x)
	case bool:
		if x {
			return len("true")
		}
		return len("false")
	case map[string]any:
		return storedObject(x)
	case []any:
		n := 2
		if len(x) > 1 {
			n += len(x) - 1
		}
		for _, e := range x {
			n += storedValue(e)
		}
		return n
	}
	if isNumber(v) {
		return storedNumber(v)
	}
	return len(Encode(Doc{"": v})) - len(`{"":}`)
}

// storedNumber is the longer of the literal and what encoding/json writes
// for the value as a float64 (the API server may re-encode non-integers).
func storedNumber(v any) int {
	lit, ok := numberLiteral(v)
	if !ok {
		return len("null")
	}
	n := len(lit)
	if f, err := strconv.ParseFloat(lit, 64); err == nil && !math.IsNaN(f) && !math.IsInf(f, 0) {
		var buf [32]byte // json.Marshal(f) without its allocations
		n = max(n, len(appendFloat(buf[:0], f, 64)))
	}
	return n
}

// storedString is the length of s as a JSON string escaped as
// encoding/json.Marshal escapes it.
func storedString(s string) int {
	n := 2
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t':
				n += 2
			case c < 0x20 || c == '<' || c == '>' || c == '&':
				n += 6 // \u00XX
			default:
				n++
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			n += 6 // \ufffd
		case r == '\u2028' || r == '\u2029':
			n += 6
		default:
			n += size
		}
		i += size
	}
	return n
}

// metaObject is the JSON length of the $metadata node of an object: its
// stamp, then a node for every member not starting with '$' (see
// [UpdateMetadata]).
func metaObject(d Doc, versioned bool) int {
	n := metaStamp(versioned)
	for k, v := range d {
		if hasDollarPrefix(k) {
			continue
		}
		n += 1 + storedString(k) + 1 // ,"key":
		if obj, ok := v.(map[string]any); ok {
			n += metaObject(obj, versioned)
		} else {
			n += metaStamp(versioned)
		}
	}
	return n
}

// metaStamp is the JSON length of a node without members:
// {"$lastUpdated":"..."} or {"$lastUpdated":"...","$lastUpdatedVersion":n}.
func metaStamp(versioned bool) int {
	n := len(`{"` + LastUpdatedKey + `":}`)
	n += storedTimeLen
	if versioned {
		n += len(`,"` + LastUpdatedVersionKey + `":`)
		n += storedVersionLen
	}
	return n
}
