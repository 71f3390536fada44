package twin

import (
	"encoding/json"
	"math/rand/v2"
	"testing"
)

func TestMergePatch(t *testing.T) {
	tests := map[string]struct {
		doc, patch, want string
	}{
		// RFC 7386 appendix A (the cases whose target and patch are objects).
		"A.1 replace":          {`{"a":"b"}`, `{"a":"c"}`, `{"a":"c"}`},
		"A.2 add":              {`{"a":"b"}`, `{"b":"c"}`, `{"a":"b","b":"c"}`},
		"A.3 delete":           {`{"a":"b"}`, `{"a":null}`, `{}`},
		"A.4 delete one":       {`{"a":"b","b":"c"}`, `{"a":null}`, `{"b":"c"}`},
		"A.5 array to scalar":  {`{"a":["b"]}`, `{"a":"c"}`, `{"a":"c"}`},
		"A.6 scalar to array":  {`{"a":"c"}`, `{"a":["b"]}`, `{"a":["b"]}`},
		"A.7 nested":           {`{"a":{"b":"c"}}`, `{"a":{"b":"d","c":null}}`, `{"a":{"b":"d"}}`},
		"A.8 arrays replace":   {`{"a":[{"b":"c"}]}`, `{"a":[1]}`, `{"a":[1]}`},
		"A.13 null in target":  {`{"e":null}`, `{"a":1}`, `{"a":1,"e":null}`},
		"A.15 nulls in create": {`{}`, `{"a":{"bb":{"ccc":null}}}`, `{"a":{"bb":{}}}`},
		"RFC 7386 section 3": {
			`{"title":"Goodbye!","author":{"givenName":"John","familyName":"Doe"},"tags":["example","sample"],"content":"This will be unchanged"}`,
			`{"title":"Hello!","phoneNumber":"+01-123-456-7890","author":{"familyName":null},"tags":["example"]}`,
			`{"title":"Hello!","author":{"givenName":"John"},"tags":["example"],"content":"This will be unchanged","phoneNumber":"+01-123-456-7890"}`,
		},

		// Twin cases.
		"object replaces scalar":  {`{"a":5}`, `{"a":{"b":1,"c":null}}`, `{"a":{"b":1}}`},
		"scalar replaces object":  {`{"a":{"b":1}}`, `{"a":true}`, `{"a":true}`},
		"empty patch":             {`{"a":1}`, `{}`, `{"a":1}`},
		"empty object no-op":      {`{"a":{"b":1}}`, `{"a":{}}`, `{"a":{"b":1}}`},
		"empty object creates":    {`{}`, `{"a":{}}`, `{"a":{}}`},
		"delete missing":          {`{"a":1}`, `{"b":null,"c":{"d":null}}`, `{"a":1,"c":{}}`},
		"number literal replaces": {`{"n":1}`, `{"n":1.0}`, `{"n":1.0}`},
		"deep merge": {
			`{"config":{"telemetry":{"interval":30,"unit":"s"},"mode":"eco"},"fw":"1.0"}`,
			`{"config":{"telemetry":{"interval":60,"unit":null},"led":true},"fw":null}`,
			`{"config":{"telemetry":{"interval":60},"mode":"eco","led":true}}`,
		},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			doc, patch := mustDecode(t, tt.doc), mustDecode(t, tt.patch)
			got := MergePatch(doc, patch)
			assertJSON(t, got, tt.want)
			assertJSON(t, doc, tt.doc)
			assertJSON(t, patch, tt.patch)
		})
	}
}

func TestMergePatchNil(t *testing.T) {
	got := MergePatch(nil, nil)
	if got == nil || len(got) != 0 {
		t.Errorf("MergePatch(nil, nil) = %#v, want empty Doc", got)
	}
	assertJSON(t, MergePatch(nil, Doc{"a": Doc{"b": nil, "c": "d"}}), `{"a":{"c":"d"}}`)
	assertJSON(t, MergePatch(Doc{"a": "b"}, nil), `{"a":"b"}`)
}

func TestMergePatchSharesNothing(t *testing.T) {
	doc := mustDecode(t, `{"kept":{"x":1},"merged":{"y":2}}`)
	patch := mustDecode(t, `{"merged":{"z":3},"new":{"w":4},"arr":[{"v":5}]}`)
	got := MergePatch(doc, patch)
	got["kept"].(Doc)["x"] = "changed"
	got["merged"].(Doc)["y"] = "changed"
	got["merged"].(Doc)["z"] = "changed"
	got["new"].(Doc)["w"] = "changed"
	got["arr"].([]any)[0].(Doc)["v"] = "changed"
	assertJSON(t, doc, `{"kept":{"x":1},"merged":{"y":2}}`)
	assertJSON(t, patch, `{"merged":{"z":3},"new":{"w":4},"arr":[{"v":5}]}`)
}

func TestDiff(t *testing.T) {
	tests := map[string]struct {
		from, to, want string
	}{
		"equal":                  {`{"a":1,"b":{"c":"d"}}`, `{"b":{"c":"d"},"a":1}`, `{}`},
		"both empty":             {`{}`, `{}`, `{}`},
		"changed leaf":           {`{"a":1,"b":2}`, `{"a":1,"b":3}`, `{"b":3}`},
		"added":                  {`{"a":1}`, `{"a":1,"b":{"c":true}}`, `{"b":{"c":true}}`},
		"removed":                {`{"a":1,"b":{"c":true}}`, `{"a":1}`, `{"b":null}`},
		"nested change":          {`{"a":{"x":1,"y":2}}`, `{"a":{"x":1,"y":3}}`, `{"a":{"y":3}}`},
		"nested remove":          {`{"a":{"x":1,"y":2}}`, `{"a":{"x":1}}`, `{"a":{"y":null}}`},
		"object to scalar":       {`{"a":{"x":1}}`, `{"a":5}`, `{"a":5}`},
		"scalar to object":       {`{"a":5}`, `{"a":{"x":1}}`, `{"a":{"x":1}}`},
		"object to empty object": {`{"a":{"x":1,"y":{"z":2}}}`, `{"a":{}}`, `{"a":{"x":null,"y":null}}`},
		"scalar to empty object": {`{"a":"s"}`, `{"a":{}}`, `{"a":{}}`},
		"equal numbers":          {`{"a":1,"b":0.5,"c":100}`, `{"a":1.0,"b":5e-1,"c":1E2}`, `{}`},
		"string vs number":       {`{"a":"1"}`, `{"a":1}`, `{"a":1}`},
		"bool vs string":         {`{"a":true}`, `{"a":"true"}`, `{"a":"true"}`},
		"arrays":                 {`{"a":[1,2],"b":[1]}`, `{"a":[1,3],"b":[1.0]}`, `{"a":[1,3]}`},
		"from empty":             {`{}`, `{"a":{"b":{"c":1}}}`, `{"a":{"b":{"c":1}}}`},
		"to empty":               {`{"a":{"b":1},"c":2}`, `{}`, `{"a":null,"c":null}`},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			from, to := mustDecode(t, tt.from), mustDecode(t, tt.to)
			got := Diff(from, to)
			if got == nil {
				t.Fatal("Diff returned nil")
			}
			assertJSON(t, got, tt.want)
			if merged := MergePatch(from, got); !Equal(merged, to) {
				t.Errorf("MergePatch(from, Diff) = %s, want %s", Encode(merged), Encode(to))
			}
			assertJSON(t, from, tt.from)
			assertJSON(t, to, tt.to)
		})
	}
}

func TestDiffNil(t *testing.T) {
	if got := Diff(nil, nil); got == nil || len(got) != 0 {
		t.Errorf("Diff(nil, nil) = %#v, want empty Doc", got)
	}
	assertJSON(t, Diff(nil, Doc{"a": "b"}), `{"a":"b"}`)
	assertJSON(t, Diff(Doc{"a": "b"}, nil), `{"a":null}`)
}

func TestDiffSharesNothing(t *testing.T) {
	to := mustDecode(t, `{"a":{"b":1},"c":[{"d":2}]}`)
	got := Diff(Doc{}, to)
	got["a"].(Doc)["b"] = "changed"
	got["c"].([]any)[0].(Doc)["d"] = "changed"
	assertJSON(t, to, `{"a":{"b":1},"c":[{"d":2}]}`)
}

// TestDiffRoundTrip is the property MergePatch(from, Diff(from, to)) == to
// on random documents, with the checks that go with it.
func TestDiffRoundTrip(t *testing.T) {
	g := gen{rand.New(rand.NewPCG(1, 2))}
	for i := range 5000 {
		from, to := g.doc(0), g.doc(0)
		if i%10 == 0 {
			// Similar documents give small, nested diffs.
			to = MergePatch(from, g.doc(0))
		}
		fromJSON, toJSON := string(Encode(from)), string(Encode(to))
		patch := Diff(from, to)
		got := MergePatch(from, patch)
		if !Equal(got, to) {
			t.Fatalf("case %d: from %s to %s: diff %s merges to %s", i, fromJSON, toJSON, Encode(patch), Encode(got))
		}
		if string(Encode(from)) != fromJSON || string(Encode(to)) != toJSON {
			t.Fatalf("case %d: Diff or MergePatch modified its arguments", i)
		}
		if d := Diff(to, got); len(d) != 0 {
			t.Fatalf("case %d: Diff of equal documents = %s", i, Encode(d))
		}
		if Equal(from, to) != (len(patch) == 0) {
			t.Fatalf("case %d: Equal = %v but diff %s", i, Equal(from, to), Encode(patch))
		}
		if _, n := Delta(to, to); n != 0 {
			t.Fatalf("case %d: Delta(to, to) counts %d", i, n)
		}
		if delta, n := Delta(to, nil); n != leaves(to) || leaves(delta) != n {
			t.Fatalf("case %d: Delta(to, nil) = %s, %d; want %d leaves", i, Encode(delta), n, leaves(to))
		}
	}
}

func TestEqual(t *testing.T) {
	tests := map[string]struct {
		a, b Doc
		want bool
	}{
		"nil and empty":          {nil, Doc{}, true},
		"same":                   {Doc{"a": "x", "b": Doc{"c": true}}, Doc{"b": Doc{"c": true}, "a": "x"}, true},
		"1 and 1.0":              {Doc{"n": json.Number("1")}, Doc{"n": json.Number("1.0")}, true},
		"1 and float64":          {Doc{"n": json.Number("1")}, Doc{"n": float64(1)}, true},
		"1e2 and int":            {Doc{"n": json.Number("1E2")}, Doc{"n": 100}, true},
		"0.1 and float64":        {Doc{"n": json.Number("0.10")}, Doc{"n": 0.1}, true},
		"-0 and 0":               {Doc{"n": json.Number("-0.0")}, Doc{"n": json.Number("0")}, true},
		"int64 and uint8":        {Doc{"n": int64(7)}, Doc{"n": uint8(7)}, true},
		"1e21 float and literal": {Doc{"n": 1e21}, Doc{"n": json.Number("1000000000000000000000")}, true},
		"huge exponents":         {Doc{"n": json.Number("1e99999999999999999999")}, Doc{"n": json.Number("10e99999999999999999998")}, true},
		"tiny exponents":         {Doc{"n": json.Number("1e-99999999999999999999")}, Doc{"n": json.Number("0.1e-99999999999999999998")}, true},
		"big integers exact":     {Doc{"n": json.Number("9007199254740993")}, Doc{"n": json.Number("9007199254740992")}, false},
		"different numbers":      {Doc{"n": json.Number("1")}, Doc{"n": json.Number("-1")}, false},
		"1 and 10":               {Doc{"n": json.Number("1")}, Doc{"n": json.Number("10")}, false},
		"number and string":      {Doc{"n": json.Number("1")}, Doc{"n": "1"}, false},
		"bool and string":        {Doc{"b": true}, Doc{"b": "true"}, false},
		"null and missing":       {Doc{"z": nil}, Doc{}, false},
		"null and null":          {Doc{"z": nil}, Doc{"z": nil}, true},
		"null and empty object":  {Doc{"z": nil}, Doc{"z": Doc{}}, false},
		"nil and empty nested":   {Doc{"z": Doc(nil)}, Doc{"z": Doc{}}, true},
		"other key":              {Doc{"a": "x"}, Doc{"b": "x"}, false},
		"extra key":              {Doc{"a": "x"}, Doc{"a": "x", "b": "y"}, false},
		"nested difference":      {Doc{"a": Doc{"b": json.Number("1")}}, Doc{"a": Doc{"b": json.Number("2")}}, false},
		"object and scalar":      {Doc{"a": Doc{}}, Doc{"a": "x"}, false},
		"arrays":                 {Doc{"a": []any{json.Number("1"), "x"}}, Doc{"a": []any{1.0, "x"}}, true},
		"arrays differ":          {Doc{"a": []any{"x"}}, Doc{"a": []any{"x", "y"}}, false},
		"invalid numbers":        {Doc{"n": json.Number("x")}, Doc{"n": json.Number("y")}, false},
		"NaN":                    {Doc{"n": json.Number("1")}, Doc{"n": json.Number("NaN")}, false},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			if got := Equal(tt.a, tt.b); got != tt.want {
				t.Errorf("Equal(%s, %s) = %v, want %v", Encode(tt.a), Encode(tt.b), got, tt.want)
			}
			if got := Equal(tt.b, tt.a); got != tt.want {
				t.Errorf("Equal(%s, %s) = %v, want %v (reversed)", Encode(tt.b), Encode(tt.a), got, tt.want)
			}
		})
	}
}

func TestDelta(t *testing.T) {
	tests := map[string]struct {
		desired, reported string
		want              string
		count             int
	}{
		"converged":             {`{"a":1,"b":{"c":"x"}}`, `{"b":{"c":"x"},"a":1}`, `{}`, 0},
		"nothing desired":       {`{}`, `{"a":1}`, `{}`, 0},
		"nothing reported":      {`{"a":1,"b":{"c":"x","d":true}}`, `{}`, `{"a":1,"b":{"c":"x","d":true}}`, 3},
		"missing leaf":          {`{"a":1,"b":2}`, `{"a":1}`, `{"b":2}`, 1},
		"different leaf":        {`{"a":1,"b":2}`, `{"a":1,"b":3}`, `{"b":2}`, 1},
		"numbers semantically":  {`{"a":1,"b":0.5}`, `{"a":1.0,"b":5e-1}`, `{}`, 0},
		"type differs":          {`{"a":1}`, `{"a":"1"}`, `{"a":1}`, 1},
		"nested partial":        {`{"t":{"interval":30,"unit":"s"}}`, `{"t":{"interval":60,"unit":"s"}}`, `{"t":{"interval":30}}`, 1},
		"object vs scalar":      {`{"a":{"b":1,"c":{"d":true}}}`, `{"a":"x"}`, `{"a":{"b":1,"c":{"d":true}}}`, 2},
		"scalar vs object":      {`{"a":1}`, `{"a":{"b":1}}`, `{"a":1}`, 1},
		"empty desired object":  {`{"a":{},"b":{"c":{}}}`, `{}`, `{}`, 0},
		"empty vs scalar":       {`{"a":{}}`, `{"a":5}`, `{}`, 0},
		"extra reported":        {`{"a":1}`, `{"a":1,"b":2,"c":{"d":3}}`, `{}`, 0},
		"deep":                  {`{"a":{"b":{"c":{"d":1,"e":2}}}}`, `{"a":{"b":{"c":{"d":1}}}}`, `{"a":{"b":{"c":{"e":2}}}}`, 1},
		"null desired ignored":  {`{"a":null,"b":1}`, `{}`, `{"b":1}`, 1},
		"arrays compare whole":  {`{"a":[1,2]}`, `{"a":[1,2.0]}`, `{}`, 0},
		"arrays differ":         {`{"a":[1,2]}`, `{"a":[1]}`, `{"a":[1,2]}`, 1},
		"null reported differs": {`{"a":1}`, `{"a":null}`, `{"a":1}`, 1},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			desired, reported := mustDecode(t, tt.desired), mustDecode(t, tt.reported)
			got, n := Delta(desired, reported)
			if got == nil {
				t.Fatal("Delta returned nil Doc")
			}
			assertJSON(t, got, tt.want)
			if n != tt.count {
				t.Errorf("count = %d, want %d", n, tt.count)
			}
			assertJSON(t, desired, tt.desired)
			assertJSON(t, reported, tt.reported)
		})
	}
}

func TestDeltaNil(t *testing.T) {
	got, n := Delta(nil, nil)
	if got == nil || len(got) != 0 || n != 0 {
		t.Errorf("Delta(nil, nil) = %#v, %d", got, n)
	}
	got, n = Delta(Doc{"a": "x"}, nil)
	assertJSON(t, got, `{"a":"x"}`)
	if n != 1 {
		t.Errorf("count = %d, want 1", n)
	}
}
