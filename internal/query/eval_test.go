package query

import (
	"fmt"
	"slices"
	"testing"
)

// TestExamples runs every example query of testdata/examples.json on its
// fleet.
func TestExamples(t *testing.T) {
	twins := docs(fleet...)
	for _, ex := range examples {
		t.Run(ex.Name, func(t *testing.T) {
			res := run(t, ex.Query, twins)
			if ex.DeviceIDs != nil {
				if res.ItemType != ItemTypeTwin {
					t.Errorf("ItemType = %q, want %q", res.ItemType, ItemTypeTwin)
				}
				if got := ids(res.Items); !slices.Equal(got, ex.DeviceIDs) {
					t.Errorf("got %v, want %v", got, ex.DeviceIDs)
				}
				return
			}
			if res.ItemType != ItemTypeRaw {
				t.Errorf("ItemType = %q, want %q", res.ItemType, ItemTypeRaw)
			}
			if got, want := encodeItems(res.Items), canonJSON(t, string(ex.Rows)); got != want {
				t.Errorf("got  %s\nwant %s", got, want)
			}
		})
	}
}

// TestScenario follows the getting-started scenario (README.md, make demo):
// the plant query finds myDeviceId before and after it reports cellular,
// the cellular query only after.
func TestScenario(t *testing.T) {
	const (
		byPlant    = "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'"
		byCellular = byPlant + " AND properties.reported.connectivity.type = 'cellular'"
	)
	before := device{id: "myDeviceId", tags: `{"location":{"region":"US","plant":"Redmond43"}}`}
	after := before
	after.reported = `{"connectivity":{"type":"cellular"}}`
	after.state = "Connected"

	for _, step := range []struct {
		dev      device
		q        string
		expected []string
	}{
		{before, byPlant, []string{"myDeviceId"}},
		{before, byCellular, []string{}},
		{after, byPlant, []string{"myDeviceId"}},
		{after, byCellular, []string{"myDeviceId"}},
	} {
		if got := ids(run(t, step.q, docs(step.dev)).Items); !slices.Equal(got, step.expected) {
			t.Errorf("%s (reported %q): got %v, want %v", step.q, step.dev.reported, got, step.expected)
		}
	}
}

// TestSemantics is the table of the undefined and type rules (docs/queries.md,
// Semantics): each
// condition is evaluated on one twin, and so is its negation.
func TestSemantics(t *testing.T) {
	doc := map[string]any{
		"deviceId": "d",
		"tags": map[string]any{
			"s": "a", "n": num("3"), "f": num("2.5"), "b": true, "no": false, "z": nil,
			"str3": "3", "o": map[string]any{"k": "v"}, "arr": []any{"a"},
			"big": num("4503599627370496"), "neg": num("-0"), "bad": num("x"), "i": 3,
		},
	}
	tests := []struct {
		cond    string
		holds   bool
		negated bool // whether NOT (cond) holds
	}{
		// Strings, numbers, booleans and null compare within their type.
		{"tags.s = 'a'", true, false},
		{"tags.s != 'a'", false, true},
		{"tags.s != 'b'", true, false},
		{"tags.s <> 'b'", true, false},
		{"tags.s < 'b'", true, false},
		{"tags.s >= 'a'", true, false},
		{"'a' = tags.s", true, false},
		{"tags.n = 3", true, false},
		{"tags.n = 3.0", true, false},
		{"tags.n = 3e0", true, false},
		{"tags.n = 0x3", true, false},
		{"tags.i = 3", true, false},
		{"tags.n < 10", true, false},
		{"tags.f > 2 AND tags.f < 3", true, false},
		{"tags.neg = 0", true, false},
		{"tags.big = 4503599627370496", true, false},
		{"tags.b = true", true, false},
		{"tags.b > tags.no", true, false},
		{"tags.z = null", true, false},
		{"tags.z != null", false, true},
		// A missing path is undefined: nothing about it holds, not even its
		// negation.
		{"tags.missing = 'a'", false, false},
		{"tags.missing != 'a'", false, false},
		{"tags.missing = tags.missing", false, false},
		{"tags.missing = null", false, false},
		{"tags.s.deeper = 'a'", false, false},
		// Comparisons across types are undefined, never false.
		{"tags.n = '3'", false, false},
		{"tags.n != '3'", false, false},
		{"tags.str3 = 3", false, false},
		{"tags.str3 != 3", false, false},
		{"tags.s = null", false, false},
		{"tags.s != null", false, false},
		{"tags.b = 'true'", false, false},
		{"tags.b != 1", false, false},
		{"tags.bad = tags.bad", false, false},
		// Only primitives compare.
		{"tags.o = tags.o", false, false},
		{"tags.o != 'x'", false, false},
		{"tags.arr = tags.arr", false, false},
		// null equals null but has no order.
		{"tags.z <= null", false, false},
		// IN is an OR of =, NIN is NOT IN.
		{"tags.s IN ['a', 'b']", true, false},
		{"tags.s IN ['b']", false, true},
		{"tags.n IN ['x', 3]", true, false},
		{"tags.s NIN ['b']", true, false},
		{"tags.s NIN ['a']", false, true},
		{"tags.missing NIN ['a']", false, false},
		{"tags.n NIN ['a']", false, false},
		{"tags.s NIN ['b', 3]", false, false},
		{"tags.missing IN ['a', null]", false, false},
		// Three-valued logic.
		{"tags.missing = 'a' OR true", true, false},
		{"tags.missing = 'a' OR false", false, false},
		{"tags.missing = 'a' AND false", false, true},
		{"tags.missing = 'a' AND true", false, false},
		{"NOT NOT (tags.s = 'a')", true, false},
		// A condition holds only when it is boolean true.
		{"tags.b", true, false},
		{"tags.no", false, true},
		{"tags.s", false, false},
		{"tags.n", false, false},
		{"tags.missing", false, false},
		{"null", false, false},
		// Functions.
		{"IS_DEFINED(tags.s)", true, false},
		{"IS_DEFINED(tags.z)", true, false},
		{"IS_DEFINED(tags.missing)", false, true},
		{"is_defined(tags.o)", true, false},
		{"STARTSWITH(tags.s, 'a')", true, false},
		{"STARTS_WITH(tags.s, 'b')", false, true},
		{"startsWith(tags.s, '')", true, false},
		{"STARTSWITH(tags.str3, 3)", false, false},
		{"STARTSWITH(tags.n, '3')", false, false},
		{"ENDSWITH('abc', 'bc')", true, false},
		{"ENDSWITH(tags.missing, 'bc')", false, false},
		// Arithmetic on numbers only; no result is undefined.
		{"tags.n + 1 = 4", true, false},
		{"tags.n - 5 = -2", true, false},
		{"tags.n * tags.f = 7.5", true, false},
		{"tags.n / 2 = 1.5", true, false},
		{"tags.n % 2 = 1", true, false},
		{"-tags.n = -3", true, false},
		{"+tags.n = 3", true, false},
		{"1 + 2 * 3 = 7", true, false},
		{"(1 + 2) * 3 = 9", true, false},
		{"10 - 4 - 3 = 3", true, false},
		{"tags.n / 0 = 1", false, false},
		{"tags.n % 0 = 1", false, false},
		{"tags.s + 1 = 4", false, false},
		{"-tags.s = 1", false, false},
		{"+tags.s = 'a'", false, false},
		{"tags.missing + 1 = 1", false, false},
	}
	for _, tc := range tests {
		t.Run(tc.cond, func(t *testing.T) {
			q := mustParse(t, "SELECT * FROM devices WHERE "+tc.cond)
			if got := q.Match(doc); got != tc.holds {
				t.Errorf("WHERE %s = %v, want %v", tc.cond, got, tc.holds)
			}
			nq := mustParse(t, "SELECT * FROM devices WHERE NOT ("+tc.cond+")")
			if got := nq.Match(doc); got != tc.negated {
				t.Errorf("WHERE NOT (%s) = %v, want %v", tc.cond, got, tc.negated)
			}
		})
	}
}

func TestProjections(t *testing.T) {
	twins := docs(fleet...)
	tests := map[string]struct {
		query, rows string
		columns     []string
	}{
		"last key names the column; undefined is left out": {
			query:   "SELECT deviceId, tags.location.plant FROM devices",
			columns: []string{"deviceId", "plant"},
			rows: `[{"deviceId":"device-eu2","plant":"Paris2"},{"deviceId":"device-new"},
				{"deviceId":"device-wifi","plant":"Dublin7"},{"deviceId":"device-wired","plant":"Seattle01"},
				{"deviceId":"myDeviceId","plant":"Redmond43"}]`,
		},
		"aliases, escaped alias, objects and unnamed expressions": {
			query:   "SELECT devices.deviceId AS id, tags.location AS [[from]], tags.floor + 1, 'x' FROM devices WHERE tags.location.region = 'EU'",
			columns: []string{"id", "from", "$1", "$2"},
			rows: `[{"id":"device-eu2","from":{"region":"EU","plant":"Paris2"},"$2":"x"},
				{"id":"device-wifi","from":{"region":"EU","plant":"Dublin7"},"$2":"x"}]`,
		},
		"root names in any case, keys as written": {
			query:   "SELECT DEVICEID, Tags.location.region, PROPERTIES.Reported.connectivity.type, capabilities.IOTEDGE FROM devices WHERE deviceid = 'myDeviceId'",
			columns: []string{"deviceId", "region", "type", "iotEdge"},
			rows:    `[{"deviceId":"myDeviceId","region":"US","type":"cellular","iotEdge":false}]`,
		},
		"TOP cuts rows": {
			query:   "SELECT TOP 2 deviceId FROM devices WHERE connectionState = 'Connected' OR tags.location.region = 'US'",
			columns: []string{"deviceId"},
			rows:    `[{"deviceId":"device-eu2"},{"deviceId":"device-new"}]`,
		},
		"TOP 0": {
			query:   "SELECT TOP 0 deviceId FROM devices",
			columns: []string{"deviceId"},
			rows:    `[]`,
		},
		"aggregates without GROUP BY give one row": {
			query:   "SELECT COUNT() AS n, SUM(properties.reported.telemetryConfig.sendFrequencyInSecs) AS total, AVG(properties.reported.telemetryConfig.sendFrequencyInSecs) AS avg, MIN(tags.floor) AS lo, MAX(tags.floor) AS hi, MAX(deviceId) FROM devices",
			columns: []string{"n", "total", "avg", "lo", "hi", "$1"},
			rows:    `[{"n":5,"total":510,"avg":127.5,"lo":3,"hi":"3","$1":"myDeviceId"}]`,
		},
		"aggregates over no twins": {
			query:   "SELECT COUNT() AS n, SUM(tags.floor) AS s, AVG(tags.floor) AS a, MIN(tags.floor) AS lo FROM devices WHERE deviceId = 'none'",
			columns: []string{"n", "s", "a", "lo"},
			rows:    `[{"n":0,"s":0}]`,
		},
		"GROUP BY without aggregates lists distinct values": {
			query:   "SELECT tags.location.region FROM devices GROUP BY tags.location.region",
			columns: []string{"region"},
			rows:    `[{"region":"EU"},{"region":"US"}]`,
		},
		"GROUP BY with several aggregates and TOP": {
			query:   "SELECT TOP 1 tags.location.region AS r, COUNT() AS n, MAX(properties.reported.telemetryConfig.sendFrequencyInSecs) AS m FROM devices WHERE tags.location.region = 'US' GROUP BY tags.location.region",
			columns: []string{"r", "n", "m"},
			rows:    `[{"r":"US","n":3,"m":300}]`,
		},
		"GROUP BY an object": {
			query:   "SELECT COUNT() AS n FROM devices GROUP BY properties.reported.connectivity",
			columns: []string{"n"},
			rows:    `[{"n":2},{"n":1},{"n":1},{"n":1}]`,
		},
		"GROUP BY over no twins gives no rows": {
			query:   "SELECT COUNT() AS n FROM devices WHERE false GROUP BY tags.x",
			columns: []string{"n"},
			rows:    `[]`,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			q := mustParse(t, tc.query)
			if got := q.Columns(); !slices.Equal(got, tc.columns) {
				t.Errorf("Columns() = %q, want %q", got, tc.columns)
			}
			res, err := q.Run(twins)
			if err != nil {
				t.Fatal(err)
			}
			if res.ItemType != ItemTypeRaw {
				t.Errorf("ItemType = %q", res.ItemType)
			}
			if got, want := encodeItems(res.Items), canonJSON(t, tc.rows); got != want {
				t.Errorf("got  %s\nwant %s", got, want)
			}
		})
	}
}

// TestGroupByNumbers checks that equal numbers group together whatever
// their spelling, and that twins lacking the path form one group.
func TestGroupByNumbers(t *testing.T) {
	twins := docs(
		device{id: "a", tags: `{"v":1}`},
		device{id: "b", tags: `{"v":1.0}`},
		device{id: "c", tags: `{"v":"1"}`},
		device{id: "d", tags: `{}`},
		device{id: "e", tags: `{"v":{"x":1}}`},
		device{id: "f", tags: `{"v":{"x":1.0}}`},
		device{id: "g"},
	)
	res := run(t, "SELECT tags.v AS v, COUNT() AS n FROM devices GROUP BY tags.v", twins)
	want := `[{"v":1,"n":2},{"v":"1","n":1},{"n":2},{"v":{"x":1},"n":2}]`
	if got := encodeItems(res.Items); got != canonJSON(t, want) {
		t.Errorf("got  %s\nwant %s", got, canonJSON(t, want))
	}
}

// TestRunOrder checks deviceId order (stable for equal ids), that SELECT *
// returns the given documents, and that Run leaves its input alone.
func TestRunOrder(t *testing.T) {
	twins := []map[string]any{
		{"deviceId": "b", "n": 1},
		{"deviceId": "a"},
		{"deviceId": "b", "n": 2},
		{"deviceId": "B"},
		{}, // no deviceId sorts first
	}
	input := slices.Clone(twins)
	res := run(t, "SELECT * FROM devices", twins)
	want := []map[string]any{twins[4], twins[3], twins[1], twins[0], twins[2]}
	if len(res.Items) != len(want) {
		t.Fatalf("got %d items", len(res.Items))
	}
	for i := range want {
		// Same map, not a copy.
		if !sameMap(res.Items[i], want[i]) {
			t.Errorf("item %d = %v, want %v", i, res.Items[i], want[i])
		}
	}
	for i := range twins {
		if !sameMap(twins[i], input[i]) {
			t.Errorf("Run reordered its input")
		}
	}
	if res := run(t, "SELECT * FROM devices", nil); res.Items == nil || len(res.Items) != 0 {
		t.Errorf("no twins: got %#v, want an empty list", res.Items)
	}
}

// sameMap reports whether a and b are the same map.
func sameMap(a, b map[string]any) bool {
	a["\x00probe"] = true
	_, ok := b["\x00probe"]
	delete(a, "\x00probe")
	return ok
}

// BenchmarkRun measures a selective tag query and a residual-only query
// over 10,000 twins.
func BenchmarkRun(b *testing.B) {
	var devices []device
	for i := range 10000 {
		devices = append(devices, device{
			id:       fmt.Sprintf("dev-%05d", i),
			tags:     fmt.Sprintf(`{"location":{"region":"%s","plant":"P%d"}}`, []string{"US", "EU"}[i%2], i%100),
			reported: fmt.Sprintf(`{"connectivity":{"type":"%s"},"telemetryConfig":{"sendFrequencyInSecs":%d}}`, []string{"wifi", "wired", "cellular"}[i%3], i%600),
			state:    []string{"Connected", "Disconnected"}[i%2],
		})
	}
	twins := docs(devices...)
	for name, q := range map[string]string{
		"selective tag":  "SELECT * FROM devices WHERE tags.location.plant = 'P42'",
		"residual only":  "SELECT * FROM devices WHERE properties.reported.telemetryConfig.sendFrequencyInSecs >= 300 AND properties.reported.connectivity.type IN ['wifi', 'wired']",
		"group by count": "SELECT properties.reported.connectivity.type AS type, COUNT() AS n FROM devices GROUP BY properties.reported.connectivity.type",
	} {
		query := mustParse(b, q)
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				if _, err := query.Run(twins); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestMatching: every example query, run over the documents that its
// Matching query selects, answers as over the whole fleet (what the
// plugin relies on to merge shards' matches); Matching is SELECT * with
// the same condition.
func TestMatching(t *testing.T) {
	twins := docs(fleet...)
	for _, ex := range examples {
		t.Run(ex.Name, func(t *testing.T) {
			q, err := Parse(ex.Query)
			if err != nil {
				t.Fatal(err)
			}
			m := q.Matching()
			if m.ItemType() != ItemTypeTwin || !m.PerTwin() {
				t.Fatalf("Matching of %q is %q: want SELECT *", ex.Query, m)
			}
			if _, top := m.Top(); top {
				t.Fatalf("Matching of %q is %q: want no TOP", ex.Query, m)
			}
			matched, err := m.Run(twins)
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range twins {
				if q.Match(d) != slices.ContainsFunc(matched.Items, func(o map[string]any) bool { return o["deviceId"] == d["deviceId"] }) {
					t.Fatalf("%q: Matching (%q) and Match disagree on %v", ex.Query, m, d["deviceId"])
				}
			}
			whole, err := q.Run(twins)
			if err != nil {
				t.Fatal(err)
			}
			got, err := q.Run(matched.Items)
			if err != nil {
				t.Fatal(err)
			}
			if encodeItems(got.Items) != encodeItems(whole.Items) {
				t.Errorf("%q over its matches:\n%s\nover the fleet:\n%s", ex.Query, encodeItems(got.Items), encodeItems(whole.Items))
			}
		})
	}
}
