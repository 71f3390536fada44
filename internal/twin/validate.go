package twin

import (
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"strconv"
	"unicode"
	"unicode/utf8"
)

// Rules that [ValidateDocument] and [ValidatePatch] report verbatim.
const (
	ruleArray    = "arrays are not allowed in device twins"
	ruleNull     = "null is only allowed in a patch, where it deletes the key"
	ruleDepth    = "nesting deeper than 10 levels"
	ruleEmptyKey = "keys must not be empty"
)

// ValidateDocument checks a whole section against the twin rules; path is
// the section's path for error messages (e.g. "spec.desired"). It returns
// nil or an [*Error] for the first violation, visiting keys in sorted order:
//
//   - no arrays anywhere: "arrays are not allowed in device twins";
//   - no null values (they only mean something in a patch);
//   - keys non-empty, at most MaxKeyLength bytes, valid UTF-8, without '.',
//     '$', ' ' or control characters; the error is reported at the object
//     holding the key and names the key and the character, e.g.
//     `key "a.b" must not contain '.'`;
//   - at most MaxDepth levels of objects below the root: "nesting deeper
//     than 10 levels", at the path of the first object too deep;
//   - strings at most MaxStringLength bytes;
//   - integers (literals without fraction or exponent, and numbers with an
//     integral value) within ±MaxInt: "integer out of range ±2^52";
//   - [Size] at most s.MaxSize(), reported at path, e.g.
//     "desired is 32769 bytes, more than the 32768 allowed";
//   - [StoredSize] at most s.MaxStoredSize() for desired and reported,
//     reported at path, e.g. "desired takes 262145 bytes as stored with its
//     $metadata, more than the 262144 allowed".
func ValidateDocument(s Section, path string, doc Doc) error {
	v := validator{}
	if err := v.check(path, doc); err != nil {
		return err
	}
	return CheckSize(s, path, doc)
}

// ValidatePatch checks a merge patch for section s with the rules of
// [ValidateDocument], except that null values are allowed (they delete a
// key), members whose key starts with '$' are refused as read-only
// ("$version is read-only") and the size is not checked: check it on the
// merged document with [ValidateDocument] or [CheckSize]. The section is not
// used today; it is there so that section-specific rules can be added.
func ValidatePatch(s Section, path string, patch Doc) error {
	_ = s
	v := validator{patch: true}
	return v.check(path, patch)
}

// CheckSize returns an [*Error] at path when [Size] of doc is more than
// s.MaxSize(), e.g. "tags is 8193 bytes, more than the 8192 allowed", or
// when [StoredSize] is more than s.MaxStoredSize() (desired and reported),
// e.g. "reported takes 270000 bytes as stored with its $metadata, more than
// the 262144 allowed".
func CheckSize(s Section, path string, doc Doc) error {
	if n, limit := Size(doc), s.MaxSize(); n > limit {
		return &Error{Path: path, Rule: fmt.Sprintf("%s is %d bytes, more than the %d allowed", s, n, limit)}
	}
	if limit := s.MaxStoredSize(); limit > 0 {
		if n := StoredSize(s, doc); n > limit {
			return &Error{Path: path, Rule: fmt.Sprintf("%s takes %d bytes as stored with its $metadata, more than the %d allowed", s, n, limit)}
		}
	}
	return nil
}

// Size is the size of a document as the twin limits count it: the sum over
// all members, recursively, of the key's length in bytes plus the value's
// length, where a string counts its length in bytes, a number 8, a boolean
// 4, null 0 and an object the size of its members. (An array, which no valid
// document holds, counts the sum of its elements' value lengths.)
func Size(doc Doc) int {
	n := 0
	for k, v := range doc {
		n += len(k) + valueSize(v)
	}
	return n
}

func valueSize(v any) int {
	switch x := v.(type) {
	case nil:
		return 0
	case string:
		return len(x)
	case bool:
		return 4
	case map[string]any:
		return Size(x)
	case []any:
		n := 0
		for _, e := range x {
			n += valueSize(e)
		}
		return n
	}
	if isNumber(v) {
		return 8
	}
	return len(Encode(Doc{"": v})) - len(`{"":}`)
}

// validator walks a document or patch.
type validator struct {
	patch bool // nulls allowed, $-keys read-only
}

// check checks the root object d at path. A valid document, the usual
// case, is seen through valid, which allocates nothing; object, which
// sorts keys and builds paths, runs only to name the first violation.
func (v validator) check(path string, d Doc) error {
	if v.valid(d, 0) {
		return nil
	}
	return v.object(path, d, 0)
}

// valid reports whether object finds nothing wrong with d: the same
// checks, in map order, without the paths of messages.
func (v validator) valid(d Doc, depth int) bool {
	for k, val := range d {
		if v.key("", k) != nil {
			return false
		}
		if m, ok := val.(map[string]any); ok {
			if depth+1 > MaxDepth || !v.valid(m, depth+1) {
				return false
			}
			continue
		}
		if v.value("", val, depth) != nil {
			return false
		}
	}
	return true
}

// object checks the members of d, an object at the given depth (the root
// is depth 0).
func (v validator) object(path string, d Doc, depth int) error {
	for _, k := range sortedKeys(d) {
		if err := v.key(path, k); err != nil {
			return err
		}
		if err := v.value(joinPath(path, k), d[k], depth); err != nil {
			return err
		}
	}
	return nil
}

// key checks one key of the object at path.
func (v validator) key(path, k string) error {
	fail := func(format string, args ...any) error {
		return &Error{Path: path, Rule: fmt.Sprintf(format, args...)}
	}
	switch {
	case k == "":
		return fail(ruleEmptyKey)
	case v.patch && hasDollarPrefix(k):
		name := k
		if !plainKey(k) || len(k) > 40 {
			name = quoteShort(k)
		}
		return fail("%s is read-only", name)
	case len(k) > MaxKeyLength:
		return fail("key %s is %d bytes, more than the %d allowed", quoteShort(k), len(k), MaxKeyLength)
	case !utf8.ValidString(k):
		return fail("key %s is not valid UTF-8", quoteShort(k))
	}
	for _, r := range k {
		switch {
		case r == '.', r == '$', r == ' ':
			return fail("key %s must not contain '%c'", quoteShort(k), r)
		case unicode.IsControl(r):
			return fail("key %s must not contain control character %U", quoteShort(k), r)
		}
	}
	return nil
}

// quoteShort quotes s for a message, cutting it after 40 bytes.
func quoteShort(s string) string {
	const max = 40
	if len(s) <= max {
		return strconv.Quote(s)
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return strconv.Quote(s[:cut]) + "..."
}

// value checks the value at path, held by an object at depth.
func (v validator) value(path string, val any, depth int) error {
	fail := func(rule string) error { return &Error{Path: path, Rule: rule} }
	switch x := val.(type) {
	case nil:
		if !v.patch {
			return fail(ruleNull)
		}
		return nil
	case string:
		if len(x) > MaxStringLength {
			return fail(fmt.Sprintf("string is %d bytes, more than the %d allowed", len(x), MaxStringLength))
		}
		return nil
	case bool:
		return nil
	case map[string]any:
		if depth+1 > MaxDepth {
			return fail(ruleDepth)
		}
		return v.object(path, x, depth+1)
	case []any:
		return fail(ruleArray)
	case json.Number:
		if rule := integerRule(string(x)); rule != "" {
			return fail(rule)
		}
		return nil
	case float64:
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return fail("numbers must be finite")
		}
	case float32:
		if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
			return fail("numbers must be finite")
		}
	}
	if isNumber(val) {
		lit, _ := numberLiteral(val)
		if rule := integerRule(lit); rule != "" {
			return fail(rule)
		}
		return nil
	}
	switch reflect.ValueOf(val).Kind() {
	case reflect.Slice, reflect.Array:
		return fail(ruleArray)
	}
	return fail(fmt.Sprintf("unsupported value of type %T", val))
}

// ParseSection decodes raw, the JSON of section s found at path (the bytes
// of an optional field such as spec.desired: nil, empty or null is an
// empty section), and checks it with [ValidateDocument]. Every error is an
// [*Error] at path or below it, so the admission webhook and the operator
// report the same path and rule, e.g. "spec.desired.telemetry.intervals:
// arrays are not allowed in device twins"; JSON that is not an object
// gives e.g. "spec.tags: twin document must be a JSON object, got an array".
func ParseSection(s Section, path string, raw []byte) (Doc, error) {
	d, err := DecodeRaw(raw)
	if err != nil {
		return nil, &Error{Path: path, Rule: err.Error()}
	}
	if err := ValidateDocument(s, path, d); err != nil {
		return nil, err
	}
	return d, nil
}
