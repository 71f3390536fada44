package twin

import (
	"encoding/json"
	"maps"
	"strings"
	"testing"
)

func TestMirrorLabels(t *testing.T) {
	tests := map[string]struct {
		tags Doc
		want map[string]string
	}{
		"nil": {nil, map[string]string{}},
		"spec example": {
			mustDecode(t, `{"location":{"region":"US","plant":"Redmond43"}}`),
			map[string]string{"location.region": "US", "location.plant": "Redmond43"},
		},
		"scalars": {
			mustDecode(t, `{"floor":3,"ratio":0.25,"fixed":1.50,"active":true,"off":false,"empty":"","site":"b-7_x.y"}`),
			map[string]string{"floor": "3", "ratio": "0.25", "fixed": "1.50", "active": "true", "off": "false", "empty": "", "site": "b-7_x.y"},
		},
		"deep path": {
			mustDecode(t, `{"a":{"b":{"c":{"d_e":"v"}}}}`),
			map[string]string{"a.b.c.d_e": "v"},
		},
		"Go numbers": {
			Doc{"f": 2.5, "i": int64(42), "e": 1e21},
			map[string]string{"f": "2.5", "i": "42"}, // 1e+21 has a '+'
		},
		"invalid values skipped": {
			Doc{
				"neg":    json.Number("-1"),               // starts with '-'
				"exp":    json.Number("1e+5"),             // '+'
				"space":  "two words",                     // space
				"utf":    "é",                             // not ASCII
				"dash":   "x-",                            // ends with '-'
				"long":   strings.Repeat("v", 64),         // 64 characters
				"ok63":   strings.Repeat("v", 63),         // 63 is fine
				"slash":  "a/b",                           // '/'
				"colon":  "a:b",                           // ':'
				"under":  "_x",                            // starts with '_'
				"null":   nil,                             // not a scalar
				"array":  []any{"a"},                      // not a scalar
				"object": Doc{},                           // nothing inside
				"number": json.Number("4503599627370496"), // fine
			},
			map[string]string{"ok63": strings.Repeat("v", 63), "number": "4503599627370496"},
		},
		"invalid keys skipped": {
			Doc{
				"_lead":                       "v",
				"trail-":                      "v",
				"a b":                         "v",
				"é":                           "v",
				"team/x":                      "v", // would be a prefixed label
				"kubernetes":                  Doc{"io/name": "v"},
				"k" + strings.Repeat("x", 62): "v",                               // 63 characters: fine
				"k" + strings.Repeat("x", 63): "v",                               // 64 characters
				"long":                        Doc{strings.Repeat("y", 59): "v"}, // 64 with the path
				"ok":                          Doc{strings.Repeat("y", 60): "v"}, // 63 with the path
				"x":                           Doc{"-y": "v"},                    // "x.-y" is fine inside
				"y":                           Doc{"": "v"},                      // "y." ends with '.'
			},
			map[string]string{
				"k" + strings.Repeat("x", 62):   "v",
				"ok." + strings.Repeat("y", 60): "v",
				"x.-y":                          "v",
			},
		},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			got := MirrorLabels(tt.tags)
			if got == nil {
				t.Fatal("MirrorLabels returned nil")
			}
			if !maps.Equal(got, tt.want) {
				t.Errorf("MirrorLabels = %v\nwant %v", got, tt.want)
			}
		})
	}
}

func TestIsLabelName(t *testing.T) {
	tests := map[string]bool{
		"a":                     true,
		"location.plant":        true,
		"A-b_c.9":               true,
		strings.Repeat("a", 63): true,
		strings.Repeat("a", 64): false,
		"":                      false,
		"-a":                    false,
		"a.":                    false,
		"a_":                    false,
		"a b":                   false,
		"example.com/name":      false,
		"é":                     false,
		"a\x00":                 false,
		"9":                     true,
		"a..b":                  true,
	}
	for s, want := range tests {
		if got := IsLabelName(s); got != want {
			t.Errorf("IsLabelName(%q) = %v, want %v", s, got, want)
		}
	}
}

func TestIsLabelValue(t *testing.T) {
	tests := map[string]bool{
		"":                      true,
		"US":                    true,
		"Redmond43":             true,
		"1.50":                  true,
		"a-b_c.d":               true,
		strings.Repeat("v", 63): true,
		strings.Repeat("v", 64): false,
		"-1":                    false,
		"1e+20":                 false,
		"a/b":                   false,
		"x.":                    false,
		" x":                    false,
		"ü":                     false,
	}
	for s, want := range tests {
		if got := IsLabelValue(s); got != want {
			t.Errorf("IsLabelValue(%q) = %v, want %v", s, got, want)
		}
	}
}
