package twin

import (
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

var (
	t0 = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	// t1 is in another zone to show that metadata is written in UTC.
	t1 = time.Date(2024, 1, 2, 4, 4, 5, 6, time.FixedZone("CET", 3600))
)

const (
	ts0 = "2024-01-01T00:00:00.000000000Z"
	ts1 = "2024-01-02T03:04:05.000000006Z"
)

// meta expands T0 and T1 in a metadata tree written as JSON.
func meta(t *testing.T, s string) Doc {
	t.Helper()
	return mustDecode(t, strings.NewReplacer("T0", ts0, "T1", ts1).Replace(s))
}

func TestTimeFormat(t *testing.T) {
	if got := t1.UTC().Format(TimeFormat); got != ts1 {
		t.Errorf("Format = %q, want %q", got, ts1)
	}
	if got := t0.Format(TimeFormat); got != ts0 {
		t.Errorf("Format = %q, want %q", got, ts0)
	}
	if _, err := time.Parse(time.RFC3339Nano, ts1); err != nil {
		t.Errorf("not RFC 3339: %v", err)
	}
}

func TestUpdateMetadata(t *testing.T) {
	// Desired metadata after {"a":{"b":1},"c":"x"} was set at version 1.
	const v1 = `{"$lastUpdated":"T0","$lastUpdatedVersion":1,
		"a":{"$lastUpdated":"T0","$lastUpdatedVersion":1,"b":{"$lastUpdated":"T0","$lastUpdatedVersion":1}},
		"c":{"$lastUpdated":"T0","$lastUpdatedVersion":1}}`
	tests := map[string]struct {
		meta    string // "" for nil
		doc     string // after the change
		change  string
		version int64
		want    string
	}{
		"first metadata": {
			meta: "", doc: `{"a":{"b":1},"c":"x"}`, change: `{"a":{"b":1},"c":"x"}`, version: 1,
			want: strings.ReplaceAll(v1, "T0", "T1"),
		},
		"touched leaf and ancestors get the new time; untouched keep theirs": {
			meta: v1, doc: `{"a":{"b":2},"c":"x"}`, change: `{"a":{"b":2}}`, version: 2,
			want: `{"$lastUpdated":"T1","$lastUpdatedVersion":2,
				"a":{"$lastUpdated":"T1","$lastUpdatedVersion":2,"b":{"$lastUpdated":"T1","$lastUpdatedVersion":2}},
				"c":{"$lastUpdated":"T0","$lastUpdatedVersion":1}}`,
		},
		"untouched sibling inside a touched object": {
			meta: `{"$lastUpdated":"T0","a":{"$lastUpdated":"T0","x":{"$lastUpdated":"T0"},"y":{"$lastUpdated":"T0"}}}`,
			doc:  `{"a":{"x":1,"y":3}}`, change: `{"a":{"y":3}}`,
			want: `{"$lastUpdated":"T1","a":{"$lastUpdated":"T1","x":{"$lastUpdated":"T0"},"y":{"$lastUpdated":"T1"}}}`,
		},
		"deleted key loses its metadata": {
			meta: v1, doc: `{"a":{"b":1}}`, change: `{"c":null}`, version: 2,
			want: `{"$lastUpdated":"T1","$lastUpdatedVersion":2,
				"a":{"$lastUpdated":"T0","$lastUpdatedVersion":1,"b":{"$lastUpdated":"T0","$lastUpdatedVersion":1}}}`,
		},
		"nested deletion touches the parent": {
			meta: v1, doc: `{"a":{},"c":"x"}`, change: `{"a":{"b":null}}`, version: 2,
			want: `{"$lastUpdated":"T1","$lastUpdatedVersion":2,
				"a":{"$lastUpdated":"T1","$lastUpdatedVersion":2},
				"c":{"$lastUpdated":"T0","$lastUpdatedVersion":1}}`,
		},
		"deleting a missing key touches only the root": {
			meta: v1, doc: `{"a":{"b":1},"c":"x"}`, change: `{"zz":null}`, version: 2,
			want: `{"$lastUpdated":"T1","$lastUpdatedVersion":2,
				"a":{"$lastUpdated":"T0","$lastUpdatedVersion":1,"b":{"$lastUpdated":"T0","$lastUpdatedVersion":1}},
				"c":{"$lastUpdated":"T0","$lastUpdatedVersion":1}}`,
		},
		"object replacing a scalar gets fresh metadata throughout": {
			meta: v1, doc: `{"a":{"b":1},"c":{"x":{"y":true}}}`, change: `{"c":{"x":{"y":true}}}`, version: 2,
			want: `{"$lastUpdated":"T1","$lastUpdatedVersion":2,
				"a":{"$lastUpdated":"T0","$lastUpdatedVersion":1,"b":{"$lastUpdated":"T0","$lastUpdatedVersion":1}},
				"c":{"$lastUpdated":"T1","$lastUpdatedVersion":2,"x":{"$lastUpdated":"T1","$lastUpdatedVersion":2,
					"y":{"$lastUpdated":"T1","$lastUpdatedVersion":2}}}}`,
		},
		"scalar replacing an object drops the children": {
			meta: v1, doc: `{"a":7,"c":"x"}`, change: `{"a":7}`, version: 2,
			want: `{"$lastUpdated":"T1","$lastUpdatedVersion":2,
				"a":{"$lastUpdated":"T1","$lastUpdatedVersion":2},
				"c":{"$lastUpdated":"T0","$lastUpdatedVersion":1}}`,
		},
		"reported metadata has no version": {
			meta: `{"$lastUpdated":"T0","conn":{"$lastUpdated":"T0","type":{"$lastUpdated":"T0"}},"fw":{"$lastUpdated":"T0"}}`,
			doc:  `{"conn":{"type":"cellular","rssi":-70},"fw":"1.0"}`, change: `{"conn":{"type":"cellular","rssi":-70}}`,
			want: `{"$lastUpdated":"T1","conn":{"$lastUpdated":"T1","type":{"$lastUpdated":"T1"},"rssi":{"$lastUpdated":"T1"}},"fw":{"$lastUpdated":"T0"}}`,
		},
		"same value reported again still counts as touched": {
			meta: `{"$lastUpdated":"T0","fw":{"$lastUpdated":"T0"}}`, doc: `{"fw":"1.0"}`, change: `{"fw":"1.0"}`,
			want: `{"$lastUpdated":"T1","fw":{"$lastUpdated":"T1"}}`,
		},
		"empty change touches the root only": {
			meta: v1, doc: `{"a":{"b":1},"c":"x"}`, change: `{}`, version: 3,
			want: `{"$lastUpdated":"T1","$lastUpdatedVersion":3,
				"a":{"$lastUpdated":"T0","$lastUpdatedVersion":1,"b":{"$lastUpdated":"T0","$lastUpdatedVersion":1}},
				"c":{"$lastUpdated":"T0","$lastUpdatedVersion":1}}`,
		},
		"untouched keys missing from meta get fresh metadata; stale nodes go": {
			meta: `{"$lastUpdated":"T0","a":{"$lastUpdated":"T0","old":{"$lastUpdated":"T0"}},"gone":{"$lastUpdated":"T0"}}`,
			doc:  `{"a":{"b":1},"c":"x","d":{"e":true}}`, change: `{"c":"x"}`,
			want: `{"$lastUpdated":"T1","a":{"$lastUpdated":"T0","b":{"$lastUpdated":"T1"}},"c":{"$lastUpdated":"T1"},
				"d":{"$lastUpdated":"T1","e":{"$lastUpdated":"T1"}}}`,
		},
		"leaf metadata keeps no children": {
			meta: `{"$lastUpdated":"T0","a":{"$lastUpdated":"T0","stale":{"$lastUpdated":"T0"}}}`,
			doc:  `{"a":1,"b":2}`, change: `{"b":2}`,
			want: `{"$lastUpdated":"T1","a":{"$lastUpdated":"T0"},"b":{"$lastUpdated":"T1"}}`,
		},
		"a Diff as the change": {
			meta: `{"$lastUpdated":"T0","$lastUpdatedVersion":4,"a":{"$lastUpdated":"T0","$lastUpdatedVersion":4,
				"x":{"$lastUpdated":"T0","$lastUpdatedVersion":4},"y":{"$lastUpdated":"T0","$lastUpdatedVersion":3}},
				"b":{"$lastUpdated":"T0","$lastUpdatedVersion":2}}`,
			doc: `{"a":{"x":1},"b":1}`, change: `{"a":{"y":null}}`, version: 5,
			want: `{"$lastUpdated":"T1","$lastUpdatedVersion":5,"a":{"$lastUpdated":"T1","$lastUpdatedVersion":5,
				"x":{"$lastUpdated":"T0","$lastUpdatedVersion":4}},"b":{"$lastUpdated":"T0","$lastUpdatedVersion":2}}`,
		},
		"$ members of the document get no metadata": {
			doc: `{"$version":3,"a":1}`, change: `{"$version":3,"a":1}`,
			want: `{"$lastUpdated":"T1","a":{"$lastUpdated":"T1"}}`,
		},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			var old Doc
			if tt.meta != "" {
				old = meta(t, tt.meta)
			}
			before := string(Encode(old))
			doc, change := mustDecode(t, tt.doc), mustDecode(t, tt.change)
			got := UpdateMetadata(old, doc, change, t1, tt.version)
			assertJSON(t, got, strings.NewReplacer("T0", ts0, "T1", ts1).Replace(tt.want))
			if string(Encode(old)) != before {
				t.Errorf("UpdateMetadata modified meta")
			}
			if old != nil {
				// The result shares nothing with meta.
				for k, v := range got {
					if m, ok := v.(Doc); ok {
						m[LastUpdatedKey] = "changed"
						if string(Encode(old)) != before {
							t.Fatalf("result shares node %q with meta", k)
						}
					}
				}
			}
		})
	}
}

// TestUpdateMetadataShape checks on random changes that the metadata always
// has exactly the shape of the document.
func TestUpdateMetadataShape(t *testing.T) {
	g := gen{rand.New(rand.NewPCG(5, 6))}
	var doc, md Doc
	for i := range 2000 {
		change := Diff(doc, g.doc(0))
		if i%3 == 0 {
			change = g.doc(0) // a device patch: may repeat values or delete missing keys
			for k := range change {
				if i%2 == 0 {
					change[k] = nil
				}
				break
			}
		}
		doc = MergePatch(doc, change)
		md = UpdateMetadata(md, doc, change, t0.Add(time.Duration(i)), int64(i+1))
		if !metaMatches(md, doc) {
			t.Fatalf("step %d: metadata %s does not match %s", i, Encode(md), Encode(doc))
		}
	}
}
