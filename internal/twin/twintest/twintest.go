// Package twintest holds twin content that breaks exactly one rule, with
// the message the validators of package twin give for it. Tests of the
// admission webhook (content under spec.desired and spec.tags) and of the
// MQTT bridge (the same content as a reported patch) share it, so both
// front ends are held to the same wording. It is for tests only.
package twintest

import (
	"strconv"
	"strings"
)

// Bad is content that breaks one rule.
type Bad struct {
	// Name describes the case.
	Name string
	// JSON is a section (or patch) as a JSON object. It holds no null and
	// no key starting with '$', so it is refused the same way as a whole
	// section and as a patch.
	JSON string
	// At is the path of the violation relative to the section, to be
	// appended to the section's path: "" for the section itself,
	// ".telemetry.intervals", or `["a b"].c` for a key that needs quoting.
	At string
	// Rule is the broken rule, as the validators word it.
	Rule string
}

// Message is the validators' message for b in the section at path, e.g.
// Message("spec.desired") = "spec.desired.telemetry.intervals: arrays are
// not allowed in device twins".
func (b Bad) Message(path string) string { return path + b.At + ": " + b.Rule }

// Nested returns the JSON of depth objects nested below the root along
// keys k1, k2, ..., the deepest holding "leaf": leaf (a JSON value), and
// the path of the deepest object relative to the root (".k1.k2...").
func Nested(depth int, leaf string) (string, string) {
	var open, path strings.Builder
	for i := 1; i <= depth; i++ {
		k := "k" + strconv.Itoa(i)
		open.WriteString(`{"` + k + `":`)
		path.WriteString("." + k)
	}
	return open.String() + `{"leaf":` + leaf + `}` + strings.Repeat("}", depth), path.String()
}

// Sized returns a JSON object of n string members "a0", "a1"... whose twin
// size (keys plus values, in bytes) is exactly size; it needs
// 2n <= size <= n*(2+4096) and n <= 10 so that no string is too long.
func Sized(n, size int) string {
	var b strings.Builder
	b.WriteByte('{')
	rest := size - 2*n
	for i := range n {
		l := rest / (n - i)
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(`"a` + strconv.Itoa(i) + `":"` + strings.Repeat("x", l) + `"`)
		rest -= l
	}
	b.WriteByte('}')
	return b.String()
}

const ruleArray = "arrays are not allowed in device twins"

// BadContent returns the shared cases: arrays at several depths, every
// forbidden key character, an empty and an over-long key, nesting one level
// too deep, an over-long string and integers out of range. Size limits,
// nulls and '$'-prefixed keys differ between sections and patches and are
// not here.
func BadContent() []Bad {
	deep11, path11 := Nested(11, "true")
	deep10, path10 := Nested(10, "[1]")
	longKey := strings.Repeat("k", 1025)
	return []Bad{
		{"array at the root", `{"intervals":[1,2]}`, ".intervals", ruleArray},
		{"array at depth 2", `{"telemetry":{"intervals":[10,20]}}`, ".telemetry.intervals", ruleArray},
		{"array at depth 5", `{"a":{"b":{"c":{"d":{"e":["x"]}}}}}`, ".a.b.c.d.e", ruleArray},
		{"array in the deepest object", deep10, path10 + ".leaf", ruleArray},
		{"empty array", `{"list":[]}`, ".list", ruleArray},
		{"array of objects", `{"ports":[{"n":1}]}`, ".ports", ruleArray},
		{"key with '.'", `{"a.b":1}`, "", `key "a.b" must not contain '.'`},
		{"key with '$'", `{"price$":1}`, "", `key "price$" must not contain '$'`},
		{"key with ' '", `{"a b":1}`, "", `key "a b" must not contain ' '`},
		{"key with a control character", `{"a\u0001b":1}`, "", `key "a\x01b" must not contain control character U+0001`},
		{"key with a tab", `{"a\tb":1}`, "", `key "a\tb" must not contain control character U+0009`},
		{"key with DEL", `{"a\u007fb":1}`, "", `key "a\x7fb" must not contain control character U+007F`},
		{"nested key with '.'", `{"site":{"room.1":"x"}}`, ".site", `key "room.1" must not contain '.'`},
		{"empty key", `{"":1}`, "", "keys must not be empty"},
		{"key of 1025 bytes", `{"` + longKey + `":1}`, "", `key "` + longKey[:40] + `"... is 1025 bytes, more than the 1024 allowed`},
		{"11 levels of nesting", deep11, path11, "nesting deeper than 10 levels"},
		{"string of 4097 bytes", `{"s":"` + strings.Repeat("x", 4097) + `"}`, ".s", "string is 4097 bytes, more than the 4096 allowed"},
		{"2^52+1", `{"n":4503599627370497}`, ".n", "integer out of range ±2^52"},
		{"-(2^52+1)", `{"n":-4503599627370497}`, ".n", "integer out of range ±2^52"},
		{"1e16", `{"n":1e16}`, ".n", "integer out of range ±2^52"},
	}
}
