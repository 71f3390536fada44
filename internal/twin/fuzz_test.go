package twin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strconv"
	"testing"
	"time"
)

// FuzzMergeDiff decodes two arbitrary inputs and checks that nothing panics
// and, when both are objects, that MergePatch(from, Diff(from, to)) equals
// to (for a to without nulls, which no merge patch can create), that Encode
// and Decode round-trip, and that the metadata mirrors the document.
func FuzzMergeDiff(f *testing.F) {
	seeds := [][2]string{
		{`{"a":"b"}`, `{"a":"c"}`},
		{`{"a":{"b":"c"}}`, `{"a":{"b":"d","c":null}}`},
		{`{"a":["b"]}`, `{"a":"c"}`},
		{`{"title":"Goodbye!","author":{"givenName":"John","familyName":"Doe"}}`, `{"title":"Hello!","author":{}}`},
		{`{"n":1,"m":0.5}`, `{"n":1.0,"m":5e-1}`},
		{`{"n":9007199254740993}`, `{"n":9007199254740992}`},
		{`{"x":1e400}`, `{"x":1e-400}`},
		{`{"location":{"region":"US","plant":"Redmond43"}}`, `{"location":{"plant":"Redmond44"}}`},
		{`{"a.b":1,"$version":2," ":3}`, `{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":{"k":{}}}}}}}}}}}}`},
		{`{}`, `[]`},
		{`null`, `{"a":"\u2028\ud800x"}`},
		{`{"a":1} {}`, `{"a":`},
	}
	for _, s := range seeds {
		f.Add([]byte(s[0]), []byte(s[1]))
	}
	now := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, a, b []byte) {
		from, errA := Decode(a)
		to, errB := Decode(b)
		_, _ = DecodeRaw(a)
		for _, d := range []Doc{from, to} {
			if d == nil {
				continue
			}
			for _, s := range []Section{Tags, Desired, Reported} {
				_ = ValidateDocument(s, "spec", d)
				_ = ValidatePatch(s, "spec", d)
			}
			_ = Size(d)
			_ = MirrorLabels(d)
			enc := Encode(d)
			back, err := Decode(enc)
			if err != nil {
				t.Fatalf("Decode(Encode(d)) failed: %v on %s", err, enc)
			}
			if !Equal(back, d) {
				t.Fatalf("Encode/Decode round trip changed %s", enc)
			}
		}
		if errA != nil || errB != nil {
			return
		}
		patch := Diff(from, to)
		got := MergePatch(from, patch)
		if !hasNullMember(to) && !Equal(got, to) {
			t.Fatalf("from %s to %s: diff %s merges to %s", Encode(from), Encode(to), Encode(patch), Encode(got))
		}
		_ = ValidatePatch(Desired, "", patch)
		merged := MergePatch(from, to) // to as a device's patch
		_, _ = Delta(to, from)
		md := UpdateMetadata(nil, from, from, now, 1)
		md = UpdateMetadata(md, merged, to, now.Add(time.Second), 2)
		if !metaMatches(md, merged) {
			t.Fatalf("metadata %s does not mirror %s", Encode(md), Encode(merged))
		}
	})
}

// FuzzParseObject checks that Decode returns what encoding/json's Decoder
// with UseNumber returns, error text included.
func FuzzParseObject(f *testing.F) {
	for _, s := range []string{
		`{"a":"b"}`, ` {"a":{"b":[1,-2.5e+3,true,false,null,{}]}} `, `{"a":"\u00e9\ud83d\ude00\ud800\udc00x\ud800\\u0041"}`,
		`{"a":"\uDC00\uD800\u0000\"\\\/\b\f\n\r\t"}`, "{\"\xff\xfe\":\"\xed\xa0\x80é\"}", `{"a":1,"a":{"b":2}}`,
		`{"a":1} {}`, `{"a":`, `[]`, `null`, ``, `{"a":01}`, "{\"a\":\"\u2028\"}", `{"a":"\ud800\ud800"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		got, gotErr := Decode(data)
		want, wantErr := decodeWithDecoder(data)
		if fmt.Sprint(gotErr) != fmt.Sprint(wantErr) {
			t.Fatalf("Decode(%q) error %v, encoding/json %v", data, gotErr, wantErr)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("Decode(%q) = %#v, encoding/json %#v", data, got, want)
		}
		if json.Valid(data) {
			// DecodeValid skips the syntax check only.
			v, vErr := DecodeValid(data)
			if fmt.Sprint(vErr) != fmt.Sprint(gotErr) || !reflect.DeepEqual(v, got) {
				t.Fatalf("DecodeValid(%q) = %#v, %v; Decode %#v, %v", data, v, vErr, got, gotErr)
			}
		}
	})
}

// decodeWithDecoder is Decode through encoding/json's Decoder only.
func decodeWithDecoder(data []byte) (Doc, error) {
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

// FuzzValidFastPath checks that the allocation-free check a valid document
// takes agrees with the full one, for documents and patches, and that
// StoredSize counts numbers as json.Marshal writes them.
func FuzzValidFastPath(f *testing.F) {
	for _, s := range []string{
		`{"a":"b","c":{"d":1.5e300,"e":null}}`, `{"a":[1]}`, `{"$v":1}`, `{"a.b":1}`, `{"":1}`, `{"n":9007199254740993}`,
		`{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":{"k":{}}}}}}}}}}}}`, `{"x":1e-7,"y":1e21,"z":-0.0000001}`, "{\"a\\u0001\":1}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := Decode(data)
		if err != nil {
			return
		}
		for _, v := range []validator{{}, {patch: true}} {
			if fast, full := v.valid(d, 0), v.object("p", d, 0); fast != (full == nil) {
				t.Fatalf("%+v on %s: valid %v, object %v", v, data, fast, full)
			}
		}
		walkNumbers(d, func(n json.Number) {
			f, err := strconv.ParseFloat(string(n), 64)
			if err != nil {
				return
			}
			b, err := json.Marshal(f)
			if err != nil {
				return
			}
			if got := storedNumber(n); got != max(len(n), len(b)) {
				t.Fatalf("storedNumber(%s) = %d, want %d", n, got, max(len(n), len(b)))
			}
		})
	})
}

func walkNumbers(v any, f func(json.Number)) {
	switch x := v.(type) {
	case map[string]any:
		for _, e := range x {
			walkNumbers(e, f)
		}
	case []any:
		for _, e := range x {
			walkNumbers(e, f)
		}
	case json.Number:
		f(x)
	}
}
