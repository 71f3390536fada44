package twin

import (
	"encoding/json"
	"math"
	"math/rand/v2"
	"reflect"
	"testing"
)

func TestDecode(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    Doc // compared with reflect.DeepEqual, so types matter
		wantErr string
	}{
		"object": {
			in:   `{"a":1,"b":{"c":"d"},"e":true,"f":null}`,
			want: Doc{"a": json.Number("1"), "b": Doc{"c": "d"}, "e": true, "f": nil},
		},
		"integers stay exact": {
			in:   `{"big":9007199254740993,"frac":1.50,"exp":1E3}`,
			want: Doc{"big": json.Number("9007199254740993"), "frac": json.Number("1.50"), "exp": json.Number("1E3")},
		},
		"nested arrays are kept for the validators": {
			in:   `{"t":{"intervals":[1,"x",{"y":null}]}}`,
			want: Doc{"t": Doc{"intervals": []any{json.Number("1"), "x", Doc{"y": nil}}}},
		},
		"surrounding whitespace": {in: " \n\t{} \n", want: Doc{}},
		"empty object":           {in: `{}`, want: Doc{}},
		"array":                  {in: `[1,2]`, wantErr: "twin document must be a JSON object, got an array"},
		"string":                 {in: `"x"`, wantErr: "twin document must be a JSON object, got a string"},
		"number":                 {in: `12`, wantErr: "twin document must be a JSON object, got a number"},
		"boolean":                {in: `false`, wantErr: "twin document must be a JSON object, got a boolean"},
		"null":                   {in: `null`, wantErr: "twin document must be a JSON object, got null"},
		"empty input":            {in: ``, wantErr: "invalid JSON: empty input, want a JSON object"},
		"blank input":            {in: "  \n", wantErr: "invalid JSON: empty input, want a JSON object"},
		"truncated":              {in: `{"a":`, wantErr: "invalid JSON: unexpected EOF"},
		"malformed":              {in: `{a:1}`, wantErr: "invalid JSON: invalid character 'a' looking for beginning of object key string"},
		"second object":          {in: `{} {}`, wantErr: "invalid JSON: unexpected data after the top-level object"},
		"trailing garbage":       {in: `{"a":1}x`, wantErr: "invalid JSON: unexpected data after the top-level object"},
		"trailing bracket":       {in: `{"a":1}}`, wantErr: "invalid JSON: unexpected data after the top-level object"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := Decode([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("Decode(%q) error = %v, want %q", tt.in, err, tt.wantErr)
				}
				if got != nil {
					t.Errorf("Decode(%q) = %v with an error, want nil", tt.in, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("Decode(%q): %v", tt.in, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Decode(%q) = %#v, want %#v", tt.in, got, tt.want)
			}
		})
	}
}

func TestDecodeRaw(t *testing.T) {
	tests := map[string]struct {
		in      []byte
		want    string
		wantErr string
	}{
		"nil":          {in: nil, want: `{}`},
		"empty":        {in: []byte{}, want: `{}`},
		"blank":        {in: []byte(" \n"), want: `{}`},
		"null":         {in: []byte("null"), want: `{}`},
		"spaced null":  {in: []byte(" null\n"), want: `{}`},
		"object":       {in: []byte(`{"a":{"b":1}}`), want: `{"a":{"b":1}}`},
		"array":        {in: []byte(`[]`), wantErr: "twin document must be a JSON object, got an array"},
		"partial null": {in: []byte(`nul`), wantErr: "invalid JSON: unexpected EOF"},
		"trailing":     {in: []byte(`null {}`), wantErr: "invalid JSON: unexpected data after the top-level object"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := DecodeRaw(tt.in)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("DecodeRaw(%q) = %v, want error %q", tt.in, got, tt.wantErr)
				}
				if err.Error() != tt.wantErr {
					t.Errorf("DecodeRaw(%q) error = %q, want %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("DecodeRaw(%q): %v", tt.in, err)
			}
			if got == nil {
				t.Fatalf("DecodeRaw(%q) = nil Doc, want non-nil", tt.in)
			}
			assertJSON(t, got, tt.want)
		})
	}
}

type customString string

func TestFromAny(t *testing.T) {
	s := "pointed"
	var nilPtr *string
	tests := map[string]struct {
		in      any
		want    string
		wantErr string
	}{
		"json.Unmarshal output": {
			in:   map[string]any{"f": 1.5, "i": float64(3), "big": 1e21, "tiny": 1e-7, "m": map[string]any{"s": "x", "b": true, "z": nil}},
			want: `{"big":1e+21,"f":1.5,"i":3,"m":{"b":true,"s":"x","z":null},"tiny":1e-7}`,
		},
		"unstructured output": {
			in:   map[string]interface{}{"n": int64(5), "u": uint8(2), "i": 7, "f32": float32(0.1)},
			want: `{"f32":0.1,"i":7,"n":5,"u":2}`,
		},
		"json.Number kept":    {in: Doc{"n": json.Number("1.50")}, want: `{"n":1.50}`},
		"typed maps":          {in: map[string]string{"k": "v"}, want: `{"k":"v"}`},
		"nested typed values": {in: Doc{"m": map[string]int{"a": 1}, "c": customString("x"), "p": &s, "np": nilPtr}, want: `{"c":"x","m":{"a":1},"np":null,"p":"pointed"}`},
		"arrays are kept":     {in: Doc{"a": []any{1.0, "x"}, "s": []string{"y"}}, want: `{"a":[1,"x"],"s":["y"]}`},
		"nil map":             {in: map[string]any(nil), want: `{}`},
		"NaN":                 {in: Doc{"m": Doc{"x": math.NaN()}}, wantErr: "m.x: NaN is not a valid JSON number"},
		"infinity in array":   {in: Doc{"a": []any{1.0, math.Inf(-1)}}, wantErr: "a[1]: -Inf is not a valid JSON number"},
		"bad json.Number":     {in: Doc{"n": json.Number("12abc")}, wantErr: "n: 12abc is not a valid JSON number"},
		"channel":             {in: Doc{"c": make(chan int)}, wantErr: "c: unsupported value of type chan int"},
		"struct":              {in: Doc{"odd key": struct{}{}}, wantErr: `["odd key"]: unsupported value of type struct {}`},
		"nil":                 {in: nil, wantErr: "twin document must be a JSON object, got null"},
		"array":               {in: []any{"a"}, wantErr: "twin document must be a JSON object, got an array"},
		"typed slice":         {in: []string{"a"}, wantErr: "twin document must be a JSON object, got an array"},
		"string":              {in: "x", wantErr: "twin document must be a JSON object, got a string"},
		"number":              {in: 1.5, wantErr: "twin document must be a JSON object, got a number"},
		"int-keyed map":       {in: map[int]any{1: "x"}, wantErr: "twin document must be a JSON object, got a value of type map[int]interface {}"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := FromAny(tt.in)
			if tt.wantErr != "" {
				assertErr(t, err, tt.wantErr)
				return
			}
			if err != nil {
				t.Fatalf("FromAny: %v", err)
			}
			assertJSON(t, got, tt.want)
			assertDocForm(t, "", got)
		})
	}
}

// assertDocForm fails if v holds a value outside Doc form.
func assertDocForm(t *testing.T, path string, v any) {
	t.Helper()
	switch x := v.(type) {
	case nil, string, bool, json.Number:
	case map[string]any:
		if x == nil {
			t.Errorf("%s: nil map", path)
		}
		for k, e := range x {
			assertDocForm(t, path+"."+k, e)
		}
	case []any:
		for _, e := range x {
			assertDocForm(t, path+"[]", e)
		}
	default:
		t.Errorf("%s: %T is not Doc form", path, v)
	}
}

func TestFromAnySharesNothing(t *testing.T) {
	in := map[string]any{"m": map[string]any{"x": "1"}, "a": []any{"y"}}
	got, err := FromAny(in)
	if err != nil {
		t.Fatal(err)
	}
	in["m"].(map[string]any)["x"] = "changed"
	in["a"].([]any)[0] = "changed"
	assertJSON(t, got, `{"a":["y"],"m":{"x":"1"}}`)
}

func TestEncode(t *testing.T) {
	tests := map[string]struct {
		in   Doc
		want string
	}{
		"nil":                {nil, `{}`},
		"empty":              {Doc{}, `{}`},
		"sorted keys":        {Doc{"b": json.Number("1"), "a": Doc{"d": true, "c": nil}}, `{"a":{"c":null,"d":true},"b":1}`},
		"number literal":     {Doc{"n": json.Number("1.50"), "e": json.Number("1E3")}, `{"e":1E3,"n":1.50}`},
		"no HTML escaping":   {Doc{"h": "<a href='x'>&</a>"}, `{"h":"<a href='x'>&</a>"}`},
		"escapes":            {Doc{"s": "q\"b\\n\nr\rt\tb\bf\f\x01\x1f"}, `{"s":"q\"b\\n\nr\rt\tb\bf\f\u0001\u001f"}`},
		"line separators":    {Doc{"s": "a\u2028b\u2029c"}, `{"s":"a\u2028b\u2029c"}`},
		"invalid UTF-8":      {Doc{"s\xff": "a\xffb"}, `{"s\ufffd":"a\ufffdb"}`},
		"unicode":            {Doc{"é": "日本"}, `{"é":"日本"}`},
		"nil nested doc":     {Doc{"m": Doc(nil)}, `{"m":{}}`},
		"arrays":             {Doc{"a": []any{json.Number("1"), nil, Doc{"b": false}}}, `{"a":[1,null,{"b":false}]}`},
		"floats":             {Doc{"a": 1e21, "b": 1e-7, "c": 0.000001, "d": 3.0, "e": float32(0.1)}, `{"a":1e+21,"b":1e-7,"c":0.000001,"d":3,"e":0.1}`},
		"integers":           {Doc{"a": 5, "b": int64(-7), "c": uint64(math.MaxUint64)}, `{"a":5,"b":-7,"c":18446744073709551615}`},
		"bad json.Number":    {Doc{"n": json.Number("NaN")}, `{"n":"NaN"}`},
		"NaN":                {Doc{"n": math.NaN()}, `{"n":null}`},
		"typed map":          {Doc{"m": map[string]int{"b": 2, "a": 1}}, `{"m":{"a":1,"b":2}}`},
		"struct via json":    {Doc{"s": struct{ A int }{1}}, `{"s":{"A":1}}`},
		"unencodable as nil": {Doc{"c": make(chan int)}, `{"c":null}`},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			got := string(Encode(tt.in))
			if got != tt.want {
				t.Errorf("Encode = %s, want %s", got, tt.want)
			}
			if !json.Valid([]byte(got)) {
				t.Errorf("Encode = %s, not valid JSON", got)
			}
		})
	}
}

// TestEncodeMatchesEncodingJSON checks Encode against encoding/json (with
// HTML escaping off) and the Decode round trip on random documents.
func TestEncodeMatchesEncodingJSON(t *testing.T) {
	g := gen{rand.New(rand.NewPCG(3, 4))}
	for i := range 2000 {
		d := g.doc(0)
		got := string(Encode(d))
		if want := stdEncode(t, d); got != want {
			t.Fatalf("case %d: Encode = %s, encoding/json = %s", i, got, want)
		}
		back, err := Decode([]byte(got))
		if err != nil {
			t.Fatalf("case %d: Decode(Encode) = %v", i, err)
		}
		if !Equal(back, d) || string(Encode(back)) != got {
			t.Fatalf("case %d: round trip changed %s into %s", i, got, Encode(back))
		}
	}
}

func TestDeepCopy(t *testing.T) {
	if DeepCopy(nil) != nil {
		t.Errorf("DeepCopy(nil) != nil")
	}
	orig := Doc{"m": Doc{"x": "1", "n": Doc(nil)}, "a": []any{Doc{"y": "2"}}, "s": "v"}
	cp := DeepCopy(orig)
	assertJSON(t, cp, `{"a":[{"y":"2"}],"m":{"n":{},"x":"1"},"s":"v"}`)
	if cp["m"].(Doc)["n"].(Doc) == nil {
		t.Errorf("nested nil Doc was not made empty")
	}
	cp["m"].(Doc)["x"] = "changed"
	cp["a"].([]any)[0].(Doc)["y"] = "changed"
	cp["s"] = "changed"
	if orig["m"].(Doc)["x"] != "1" || orig["a"].([]any)[0].(Doc)["y"] != "2" || orig["s"] != "v" {
		t.Errorf("changing the copy changed the original: %s", Encode(orig))
	}
}
