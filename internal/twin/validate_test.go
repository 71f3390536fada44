package twin

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"testing"
)

// nested returns a root whose member k1 holds an object, whose member k2
// holds an object, and so on down to an object at level depth holding
// "leaf": true. It returns also the path of the deepest object below
// prefix.
func nested(prefix string, depth int) (Doc, string) {
	root := Doc{}
	cur, path := root, prefix
	for i := 1; i <= depth; i++ {
		next := Doc{}
		key := "k" + strconv.Itoa(i)
		cur[key] = next
		cur, path = next, path+"."+key
	}
	cur["leaf"] = true
	return root, path
}

// sized returns a document of n keys "a0", "a1"... holding strings, whose
// Size is exactly size (n*2 <= size <= n*(2+4096), n < 10).
func sized(n, size int) Doc {
	d := Doc{}
	rest := size - 2*n
	for i := range n {
		l := rest / (n - i)
		d["a"+strconv.Itoa(i)] = strings.Repeat("x", l)
		rest -= l
	}
	return d
}

func TestValidateDocument(t *testing.T) {
	depth10, _ := nested("spec.desired", 10)
	depth11, path11 := nested("spec.desired", 11)
	longKey := strings.Repeat("k", 1025)
	tests := map[string]struct {
		section Section
		path    string
		doc     Doc
		wantErr string
	}{
		"valid": {Desired, "spec.desired", Doc{
			"telemetry":   Doc{"interval": json.Number("30"), "enabled": true, "unit": "s", "ratio": json.Number("0.25")},
			"température": "é", "a-b_c:d/e": "ok", "empty": Doc{},
		}, ""},
		"nil doc":   {Desired, "spec.desired", nil, ""},
		"empty doc": {Tags, "spec.tags", Doc{}, ""},

		// Arrays.
		"array": {Desired, "spec.desired", Doc{"telemetry": Doc{"intervals": []any{json.Number("1")}}},
			"spec.desired.telemetry.intervals: arrays are not allowed in device twins"},
		"empty array": {Reported, "status.reported", Doc{"a": []any{}},
			"status.reported.a: arrays are not allowed in device twins"},
		"typed slice": {Tags, "spec.tags", Doc{"a": []string{"x"}},
			"spec.tags.a: arrays are not allowed in device twins"},
		"no prefix": {Desired, "", Doc{"telemetry": Doc{"intervals": []any{}}},
			"telemetry.intervals: arrays are not allowed in device twins"},
		"odd key in path": {Desired, "spec.desired", Doc{"a[0]": Doc{"x": []any{}}},
			`spec.desired["a[0]"].x: arrays are not allowed in device twins`},

		// Nulls.
		"null": {Desired, "spec.desired", Doc{"a": Doc{"b": nil}},
			"spec.desired.a.b: null is only allowed in a patch, where it deletes the key"},

		// Keys.
		"empty key": {Desired, "spec.desired", Doc{"": "x"}, "spec.desired: keys must not be empty"},
		"dot":       {Desired, "spec.desired", Doc{"a.b": "x"}, `spec.desired: key "a.b" must not contain '.'`},
		"dollar":    {Desired, "spec.desired", Doc{"a$b": "x"}, `spec.desired: key "a$b" must not contain '$'`},
		"$version":  {Desired, "spec.desired", Doc{"$version": json.Number("3")}, `spec.desired: key "$version" must not contain '$'`},
		"space":     {Tags, "spec.tags", Doc{"a b": "x"}, `spec.tags: key "a b" must not contain ' '`},
		"tab":       {Tags, "spec.tags", Doc{"a\tb": "x"}, `spec.tags: key "a\tb" must not contain control character U+0009`},
		"NUL":       {Tags, "spec.tags", Doc{"a\x00": "x"}, `spec.tags: key "a\x00" must not contain control character U+0000`},
		"DEL":       {Tags, "spec.tags", Doc{"a\x7f": "x"}, `spec.tags: key "a\x7f" must not contain control character U+007F`},
		"C1":        {Tags, "spec.tags", Doc{"a\u0085": "x"}, `spec.tags: key "a\u0085" must not contain control character U+0085`},
		"bad UTF-8": {Tags, "spec.tags", Doc{"a\xff": "x"}, `spec.tags: key "a\xff" is not valid UTF-8`},
		"nested key": {Desired, "spec.desired", Doc{"outer": Doc{"bad.key": json.Number("1")}},
			`spec.desired.outer: key "bad.key" must not contain '.'`},
		"first character reported": {Desired, "spec.desired", Doc{"a b.c": "x"}, `spec.desired: key "a b.c" must not contain ' '`},
		"key 1024 bytes":           {Desired, "spec.desired", Doc{strings.Repeat("k", 1024): "x"}, ""},
		"key 1025 bytes": {Desired, "spec.desired", Doc{longKey: "x"},
			`spec.desired: key "` + strings.Repeat("k", 40) + `"... is 1025 bytes, more than the 1024 allowed`},
		"key 1024 bytes multibyte": {Desired, "spec.desired", Doc{strings.Repeat("é", 512): "x"}, ""},
		"key 1026 bytes multibyte": {Desired, "spec.desired", Doc{strings.Repeat("é", 513): "x"},
			`spec.desired: key "` + strings.Repeat("é", 20) + `"... is 1026 bytes, more than the 1024 allowed`},

		// Depth.
		"depth 10": {Desired, "spec.desired", depth10, ""},
		"depth 11": {Desired, "spec.desired", depth11, path11 + ": nesting deeper than 10 levels"},

		// Strings.
		"string 4096 bytes": {Reported, "status.reported", Doc{"s": strings.Repeat("x", 4096)}, ""},
		"string 4097 bytes": {Reported, "status.reported", Doc{"s": strings.Repeat("x", 4097)},
			"status.reported.s: string is 4097 bytes, more than the 4096 allowed"},
		"string 4096 bytes multibyte": {Reported, "status.reported", Doc{"s": strings.Repeat("é", 2048)}, ""},
		"string 4097 bytes multibyte": {Reported, "status.reported", Doc{"s": strings.Repeat("é", 2048) + "x"},
			"status.reported.s: string is 4097 bytes, more than the 4096 allowed"},

		// Numbers.
		"2^52":                 {Desired, "spec.desired", Doc{"n": json.Number("4503599627370496")}, ""},
		"-2^52":                {Desired, "spec.desired", Doc{"n": json.Number("-4503599627370496")}, ""},
		"2^52+1":               {Desired, "spec.desired", Doc{"n": json.Number("4503599627370497")}, "spec.desired.n: integer out of range ±2^52"},
		"-(2^52+1)":            {Desired, "spec.desired", Doc{"n": json.Number("-4503599627370497")}, "spec.desired.n: integer out of range ±2^52"},
		"20 digits":            {Desired, "spec.desired", Doc{"n": json.Number("12345678901234567890")}, "spec.desired.n: integer out of range ±2^52"},
		"2^52 as float":        {Desired, "spec.desired", Doc{"n": json.Number("4503599627370496.0")}, ""},
		"2^52+1 as float":      {Desired, "spec.desired", Doc{"n": json.Number("4503599627370497.0")}, "spec.desired.n: integer out of range ±2^52"},
		"2^52+1 exponent":      {Desired, "spec.desired", Doc{"n": json.Number("4.503599627370497e15")}, "spec.desired.n: integer out of range ±2^52"},
		"1e16":                 {Desired, "spec.desired", Doc{"n": json.Number("1e16")}, "spec.desired.n: integer out of range ±2^52"},
		"1e400":                {Desired, "spec.desired", Doc{"n": json.Number("-1e400")}, "spec.desired.n: integer out of range ±2^52"},
		"fraction":             {Desired, "spec.desired", Doc{"n": json.Number("1.5"), "m": json.Number("-0.1"), "e": json.Number("2.5E-3")}, ""},
		"tiny":                 {Desired, "spec.desired", Doc{"n": json.Number("1e-400")}, ""},
		"float64 2^52":         {Desired, "spec.desired", Doc{"n": float64(MaxInt)}, ""},
		"float64 2^52+1":       {Desired, "spec.desired", Doc{"n": float64(MaxInt + 1)}, "spec.desired.n: integer out of range ±2^52"},
		"float64 non-integral": {Desired, "spec.desired", Doc{"n": 1.5}, ""},
		"int64 2^52+1":         {Desired, "spec.desired", Doc{"n": int64(MaxInt + 1)}, "spec.desired.n: integer out of range ±2^52"},
		"int -2^52":            {Desired, "spec.desired", Doc{"n": -MaxInt}, ""},
		"uint64 max":           {Desired, "spec.desired", Doc{"n": uint64(math.MaxUint64)}, "spec.desired.n: integer out of range ±2^52"},
		"NaN":                  {Desired, "spec.desired", Doc{"n": math.NaN()}, "spec.desired.n: numbers must be finite"},
		"invalid json.Number":  {Desired, "spec.desired", Doc{"n": json.Number("0x10")}, `spec.desired.n: invalid number "0x10"`},

		"unsupported": {Desired, "spec.desired", Doc{"a": struct{}{}}, "spec.desired.a: unsupported value of type struct {}"},

		// Size.
		"desired 32768":  {Desired, "spec.desired", sized(8, 32768), ""},
		"desired 32769":  {Desired, "spec.desired", sized(9, 32769), "spec.desired: desired is 32769 bytes, more than the 32768 allowed"},
		"reported 32768": {Reported, "status.reported", sized(8, 32768), ""},
		"reported 32769": {Reported, "status.reported", sized(9, 32769),
			"status.reported: reported is 32769 bytes, more than the 32768 allowed"},
		"tags 8192": {Tags, "spec.tags", sized(2, 8192), ""},
		"tags 8193": {Tags, "spec.tags", sized(3, 8193), "spec.tags: tags is 8193 bytes, more than the 8192 allowed"},

		// The first violation in key order is reported.
		"sorted order": {Desired, "spec.desired", Doc{"b": []any{}, "a": Doc{"z": nil, "y": strings.Repeat("x", 4097)}},
			"spec.desired.a.y: string is 4097 bytes, more than the 4096 allowed"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			err := ValidateDocument(tt.section, tt.path, tt.doc)
			assertErr(t, err, tt.wantErr)
			if err != nil {
				var e *Error
				if !errors.As(err, &e) {
					t.Fatalf("error %T is not an *Error", err)
				}
				if got := e.Path + ": " + e.Rule; tt.path != "" && got != tt.wantErr {
					t.Errorf("Path+Rule = %q", got)
				}
			}
		})
	}
}

func TestSizedHelper(t *testing.T) {
	for _, c := range []struct{ n, size int }{{8, 32768}, {9, 32769}, {2, 8192}, {3, 8193}} {
		if got := Size(sized(c.n, c.size)); got != c.size {
			t.Errorf("Size(sized(%d, %d)) = %d", c.n, c.size, got)
		}
	}
}

func TestValidateDocumentErrorFields(t *testing.T) {
	err := ValidateDocument(Desired, "spec.desired", Doc{"telemetry": Doc{"intervals": []any{}}})
	var e *Error
	if !errors.As(fmt.Errorf("invalid desired: %w", err), &e) {
		t.Fatalf("not an *Error: %v", err)
	}
	if e.Path != "spec.desired.telemetry.intervals" || e.Rule != "arrays are not allowed in device twins" {
		t.Errorf("Error = %+v", *e)
	}
	err = ValidateDocument(Tags, "spec.tags", sized(3, 8193))
	if !errors.As(err, &e) || e.Path != "spec.tags" || e.Rule != "tags is 8193 bytes, more than the 8192 allowed" {
		t.Errorf("size error = %#v", err)
	}
}

func TestValidatePatch(t *testing.T) {
	depth10, _ := nested("properties.desired", 10)
	depth11, path11 := nested("properties.desired", 11)
	tests := map[string]struct {
		section Section
		patch   Doc
		wantErr string
	}{
		"nulls delete":  {Reported, Doc{"a": nil, "b": Doc{"c": nil, "d": json.Number("1")}}, ""},
		"nil patch":     {Reported, nil, ""},
		"$version":      {Reported, Doc{"$version": json.Number("4")}, "properties.desired: $version is read-only"},
		"$metadata":     {Desired, Doc{"a": Doc{"$metadata": Doc{}}}, "properties.desired.a: $metadata is read-only"},
		"odd $ key":     {Desired, Doc{"$a b": "x"}, `properties.desired: "$a b" is read-only`},
		"$ inside":      {Desired, Doc{"a$": "x"}, `properties.desired: key "a$" must not contain '$'`},
		"dot":           {Desired, Doc{"a.b": nil}, `properties.desired: key "a.b" must not contain '.'`},
		"array":         {Desired, Doc{"a": Doc{"b": []any{nil}}}, "properties.desired.a.b: arrays are not allowed in device twins"},
		"string 4097":   {Desired, Doc{"s": strings.Repeat("x", 4097)}, "properties.desired.s: string is 4097 bytes, more than the 4096 allowed"},
		"integer":       {Desired, Doc{"n": json.Number("4503599627370497")}, "properties.desired.n: integer out of range ±2^52"},
		"depth 10":      {Desired, depth10, ""},
		"depth 11":      {Desired, depth11, path11 + ": nesting deeper than 10 levels"},
		"size not here": {Tags, sized(9, 36000), ""},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			assertErr(t, ValidatePatch(tt.section, "properties.desired", tt.patch), tt.wantErr)
		})
	}
}

func TestCheckSize(t *testing.T) {
	tests := map[string]struct {
		section Section
		doc     Doc
		wantErr string
	}{
		"tags at limit":      {Tags, sized(2, 8192), ""},
		"tags over":          {Tags, sized(2, 8193), "spec.tags: tags is 8193 bytes, more than the 8192 allowed"},
		"desired at limit":   {Desired, sized(8, 32768), ""},
		"desired over":       {Desired, sized(8, 32769), "spec.tags: desired is 32769 bytes, more than the 32768 allowed"},
		"reported over":      {Reported, sized(9, 40000), "spec.tags: reported is 40000 bytes, more than the 32768 allowed"},
		"other rules ignore": {Tags, Doc{"a.b": []any{}}, ""},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			assertErr(t, CheckSize(tt.section, "spec.tags", tt.doc), tt.wantErr)
		})
	}
}

func TestSize(t *testing.T) {
	tests := map[string]struct {
		doc  Doc
		want int
	}{
		"nil":          {nil, 0},
		"string":       {Doc{"a": "xyz"}, 1 + 3},
		"multibyte":    {Doc{"é": "日本"}, 2 + 6},
		"empty string": {Doc{"ab": ""}, 2},
		"number":       {Doc{"n": json.Number("123456789012")}, 1 + 8},
		"float64":      {Doc{"n": 1.5}, 1 + 8},
		"bool":         {Doc{"b": true}, 1 + 4},
		"null":         {Doc{"z": nil}, 1},
		"object":       {Doc{"o": Doc{"k": "v", "m": Doc{"x": false}}}, 1 + (1 + 1) + (1 + (1 + 4))},
		"empty object": {Doc{"o": Doc{}}, 1},
		"array":        {Doc{"a": []any{"xy", json.Number("1")}}, 1 + 2 + 8},
		"spec example": {mustDecode(t, `{"location":{"region":"US","plant":"Redmond43"}}`), 8 + 6 + 2 + 5 + 9},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			if got := Size(tt.doc); got != tt.want {
				t.Errorf("Size = %d, want %d", got, tt.want)
			}
		})
	}
}
