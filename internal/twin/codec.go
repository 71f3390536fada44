package twin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"unicode/utf8"
)

// Decode parses data as a JSON object. Numbers become json.Number, so
// integers stay exact; nested objects are Docs; nested arrays are kept as
// []any for [ValidateDocument] or [ValidatePatch] to refuse with their path.
// Anything but one JSON object (an array, a string, a number, a boolean,
// null, malformed JSON, or more data after the object) is an error that says
// what it got. Decode checks no twin rule: validate what it returns.
func Decode(data []byte) (Doc, error) {
	// Valid objects, the usual case, skip the Decoder's buffers; anything
	// else goes through it for its error.
	if t := bytes.TrimLeft(data, " \t\r\n"); len(t) > 0 && t[0] == '{' && json.Valid(t) {
		return parseObject(t), nil
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("invalid JSON: empty input, want a JSON object")
		}
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("invalid JSON: unexpected data after the top-level object")
	}
	d, ok := v.(map[string]any)
	if !ok {
		return nil, notObject(v)
	}
	return d, nil
}

// DecodeRaw is [Decode] for the raw bytes of an optional field such as an
// apiextensions JSON value: nil or empty bytes, or the literal null, give an
// empty Doc and no error.
func DecodeRaw(raw []byte) (Doc, error) {
	if t := bytes.TrimSpace(raw); len(t) == 0 || string(t) == "null" {
		return Doc{}, nil
	}
	return Decode(raw)
}

// notObject is the error for a document that is not a JSON object.
func notObject(v any) error {
	what := fmt.Sprintf("a value of type %T", v)
	switch x := v.(type) {
	case nil:
		what = "null"
	case []any:
		what = "an array"
	case string:
		what = "a string"
	case bool:
		what = "a boolean"
	default:
		if isNumber(x) {
			what = "a number"
		} else if k := reflect.ValueOf(v).Kind(); k == reflect.Slice || k == reflect.Array {
			what = "an array"
		}
	}
	return errors.New("twin document must be a JSON object, got " + what)
}

// FromAny converts a JSON-like value decoded elsewhere, such as the result of
// json.Unmarshal into an any (float64 numbers) or an unstructured Kubernetes
// object (int64 and float64 numbers), into Doc form: every number becomes a
// json.Number, every map with string keys a Doc and every slice an []any
// (arrays are kept, like [Decode] keeps them, for the validators to refuse
// with their full path). v itself must be a map with string keys. The result
// shares nothing with v. A value with no JSON form (NaN, a channel, a
// struct...) is an [*Error] whose path is relative to v.
func FromAny(v any) (Doc, error) {
	if v == nil {
		return nil, notObject(nil)
	}
	if rv := reflect.ValueOf(v); rv.Kind() != reflect.Map || rv.Type().Key().Kind() != reflect.String {
		return nil, notObject(v)
	}
	out, err := normalise("", v)
	if err != nil {
		return nil, err
	}
	d := out.(Doc)
	if d == nil {
		d = Doc{}
	}
	return d, nil
}

// normalise returns v in Doc form; path is v's path for errors.
func normalise(path string, v any) (any, error) {
	switch x := v.(type) {
	case nil, string, bool:
		return x, nil
	case map[string]any:
		d := make(Doc, len(x))
		for k, e := range x {
			n, err := normalise(joinPath(path, k), e)
			if err != nil {
				return nil, err
			}
			d[k] = n
		}
		return d, nil
	case []any:
		a := make([]any, len(x))
		for i, e := range x {
			n, err := normalise(fmt.Sprintf("%s[%d]", path, i), e)
			if err != nil {
				return nil, err
			}
			a[i] = n
		}
		return a, nil
	}
	if isNumber(v) {
		lit, ok := numberLiteral(v)
		if !ok {
			return nil, &Error{Path: path, Rule: fmt.Sprintf("%v is not a valid JSON number", v)}
		}
		return json.Number(lit), nil
	}
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.String:
		return rv.String(), nil
	case reflect.Bool:
		return rv.Bool(), nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return normalise(path, rv.Int())
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return normalise(path, rv.Uint())
	case reflect.Float32, reflect.Float64:
		return normalise(path, rv.Float())
	case reflect.Pointer, reflect.Interface:
		if rv.IsNil() {
			return nil, nil
		}
		return normalise(path, rv.Elem().Interface())
	case reflect.Map:
		if rv.Type().Key().Kind() == reflect.String {
			d := make(Doc, rv.Len())
			for it := rv.MapRange(); it.Next(); {
				k := it.Key().String()
				n, err := normalise(joinPath(path, k), it.Value().Interface())
				if err != nil {
					return nil, err
				}
				d[k] = n
			}
			return d, nil
		}
	case reflect.Slice, reflect.Array:
		if rv.Kind() == reflect.Slice && rv.IsNil() {
			return []any{}, nil
		}
		a := make([]any, rv.Len())
		for i := range a {
			n, err := normalise(fmt.Sprintf("%s[%d]", path, i), rv.Index(i).Interface())
			if err != nil {
				return nil, err
			}
			a[i] = n
		}
		return a, nil
	}
	return nil, &Error{Path: path, Rule: fmt.Sprintf("unsupported value of type %T", v)}
}

// Encode returns d as compact JSON with keys in sorted order, so equal
// documents encode to equal bytes. A nil or empty Doc encodes as {}, as does
// a nil nested Doc. HTML characters are not escaped. Values are expected in
// Doc form; other numeric types are written as numbers, a json.Number that
// is not a valid literal is written as a string, and any other value is
// written as encoding/json writes it, or as null if it cannot be.
func Encode(d Doc) []byte {
	return appendValue(make([]byte, 0, 64), d)
}

func appendValue(b []byte, v any) []byte {
	switch x := v.(type) {
	case nil:
		return append(b, "null"...)
	case string:
		return AppendString(b, x)
	case bool:
		if x {
			return append(b, "true"...)
		}
		return append(b, "false"...)
	case map[string]any:
		b = append(b, '{')
		for i, k := range sortedKeys(x) {
			if i > 0 {
				b = append(b, ',')
			}
			b = AppendString(b, k)
			b = append(b, ':')
			b = appendValue(b, x[k])
		}
		return append(b, '}')
	case []any:
		b = append(b, '[')
		for i, e := range x {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendValue(b, e)
		}
		return append(b, ']')
	case json.Number:
		if lit, ok := numberLiteral(x); ok {
			return append(b, lit...)
		}
		return AppendString(b, string(x))
	}
	if isNumber(v) {
		if lit, ok := numberLiteral(v); ok {
			return append(b, lit...)
		}
		return append(b, "null"...)
	}
	if n, err := normalise("", v); err == nil {
		return appendValue(b, n)
	}
	if out, err := json.Marshal(v); err == nil {
		return append(b, out...)
	}
	return append(b, "null"...)
}

const hex = "0123456789abcdef"

// AppendString appends s as a JSON string, escaping as encoding/json does
// except for HTML characters. Invalid UTF-8 becomes U+FFFD.
func AppendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// DeepCopy returns a copy of d that shares no object or array with it.
// DeepCopy(nil) is nil; a nil Doc nested inside d becomes an empty Doc.
func DeepCopy(d Doc) Doc {
	if d == nil {
		return nil
	}
	return copyObject(d)
}

func copyObject(d Doc) Doc {
	out := make(Doc, len(d))
	for k, v := range d {
		out[k] = copyValue(v)
	}
	return out
}

func copyValue(v any) any {
	switch x := v.(type) {
	case map[string]any:
		return copyObject(x)
	case []any:
		a := make([]any, len(x))
		for i, e := range x {
			a[i] = copyValue(e)
		}
		return a
	}
	return v
}

// DecodeValid is [Decode] for data already known to be valid JSON, such
// as a json.RawMessage a JSON decoder has filled: it does not check the
// syntax again. Data that is not a JSON object goes through Decode, for
// its error.
func DecodeValid(data []byte) (Doc, error) {
	if t := bytes.TrimLeft(data, " \t\r\n"); len(t) > 0 && t[0] == '{' {
		return parseObject(t), nil
	}
	return Decode(data)
}
