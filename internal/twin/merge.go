package twin

import (
	"encoding/json"
	"reflect"
)

// MergePatch applies the JSON merge patch (RFC 7386) patch to doc and returns
// the result as a new Doc; neither argument is modified and the result shares
// nothing with them. A null member deletes the key; an object member merges
// recursively into the object at that key, replacing whatever non-object was
// there (a patch object applied where there was nothing creates it, without
// the null members inside); any other member replaces the value. Arrays are
// values: they replace, never merge. A nil doc is an empty one.
func MergePatch(doc, patch Doc) Doc {
	out := copyObject(doc)
	applyPatch(out, patch)
	return out
}

// applyPatch merges patch into target, which it owns.
func applyPatch(target, patch Doc) {
	for k, pv := range patch {
		switch p := pv.(type) {
		case nil:
			delete(target, k)
		case map[string]any:
			t, ok := target[k].(map[string]any)
			if !ok || t == nil {
				t = Doc{}
			}
			applyPatch(t, p)
			target[k] = t
		default:
			target[k] = copyValue(p)
		}
	}
}

// Diff returns the merge patch that turns from into to: each key added or
// changed in to with its new value, each key missing from to as nil, and
// objects in both compared member by member. Keys whose values are [Equal]
// are left out, so Diff of equal documents is an empty (non-nil) Doc.
// MergePatch(from, Diff(from, to)) is Equal to to whenever to holds no null
// (no valid document does: a merge patch cannot set a null). The result
// shares nothing with from or to.
func Diff(from, to Doc) Doc {
	patch := Doc{}
	for k := range from {
		if _, ok := to[k]; !ok {
			patch[k] = nil
		}
	}
	for k, tv := range to {
		fv, ok := from[k]
		if !ok {
			patch[k] = copyValue(tv)
			continue
		}
		fo, fObj := fv.(map[string]any)
		tm, tObj := tv.(map[string]any)
		switch {
		case fObj && tObj:
			if sub := Diff(fo, tm); len(sub) > 0 {
				patch[k] = sub
			}
		case !equalValue(fv, tv):
			patch[k] = copyValue(tv)
		}
	}
	return patch
}

// Equal reports whether a and b are the same document: the same keys with
// equal values, where numbers compare by value across json.Number, float
// and integer types (json.Number "1", "1.0", "1e0" and float64(1) are all
// equal), a nil Doc equals an empty one, and values of different JSON types
// are never equal.
func Equal(a, b Doc) bool {
	if len(a) != len(b) {
		return false
	}
	for k, av := range a {
		bv, ok := b[k]
		if !ok || !equalValue(av, bv) {
			return false
		}
	}
	return true
}

func equalValue(a, b any) bool {
	switch x := a.(type) {
	case nil:
		return b == nil
	case string:
		y, ok := b.(string)
		return ok && x == y
	case bool:
		y, ok := b.(bool)
		return ok && x == y
	case map[string]any:
		y, ok := b.(map[string]any)
		return ok && Equal(x, y)
	case []any:
		y, ok := b.([]any)
		if !ok || len(x) != len(y) {
			return false
		}
		for i := range x {
			if !equalValue(x[i], y[i]) {
				return false
			}
		}
		return true
	}
	if isNumber(a) {
		if !isNumber(b) {
			return false
		}
		if x, ok := a.(json.Number); ok {
			if y, ok := b.(json.Number); ok && x == y {
				return true
			}
		}
		la, oka := numberLiteral(a)
		lb, okb := numberLiteral(b)
		if !oka || !okb {
			return false
		}
		na, _ := parseNumber(la)
		nb, _ := parseNumber(lb)
		return na.canonical() == nb.canonical()
	}
	return reflect.DeepEqual(a, b)
}

// Delta returns the desired leaves that the device has not reported: every
// leaf of desired whose reported value at the same path is missing or not
// [Equal], with its desired value, nested as in desired; and how many there
// are. Objects compare member by member (an object in desired against a
// non-object in reported makes all its leaves part of the delta); an empty
// desired object holds no leaf and so counts as nothing; null desired values
// are ignored; keys only reported are ignored. The result is never nil and
// shares nothing with the arguments.
func Delta(desired, reported Doc) (Doc, int) {
	delta := Doc{}
	count := 0
	for k, dv := range desired {
		rv, reportedHas := reported[k]
		switch d := dv.(type) {
		case nil:
			continue
		case map[string]any:
			r, _ := rv.(map[string]any)
			if sub, n := Delta(d, r); n > 0 {
				delta[k] = sub
				count += n
			}
		default:
			if !reportedHas || !equalValue(dv, rv) {
				delta[k] = copyValue(dv)
				count++
			}
		}
	}
	return delta, count
}

// ValueAt returns the value at path in d (the keys from d down), and
// whether there is one: a missing key, or a value on the way that is not
// an object, has none.
func ValueAt(d Doc, path []string) (any, bool) {
	var v any = d
	for _, k := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return nil, false
		}
		if v, ok = m[k]; !ok {
			return nil, false
		}
	}
	return v, true
}
