package query

import (
	"cmp"
	"reflect"
	"slices"
	"testing"
)

// TestAggregationInBatches: groups and aggregates added a few twins at a
// time answer as Run does over all of them at once (and Run's answers
// are the examples' and the evaluator tests'), and Size grows with the
// groups and their values.
func TestAggregationInBatches(t *testing.T) {
	all := docs(fleet...)
	slices.SortStableFunc(all, func(a, b map[string]any) int { return cmp.Compare(deviceID(a), deviceID(b)) })
	texts := []string{
		"SELECT COUNT() AS n FROM devices WHERE tags.nothing = 1",
		"SELECT tags.location.region AS r, COUNT() AS n, SUM(properties.reported.telemetryConfig.sendFrequencyInSecs) AS s FROM devices GROUP BY tags.location.region",
		"SELECT TOP 2 properties.reported.connectivity.type AS t, MIN(deviceId) AS lo, MAX(deviceId) AS hi, AVG(version) AS v FROM devices GROUP BY properties.reported.connectivity.type",
		"SELECT properties AS p, COUNT() AS n FROM devices GROUP BY properties",
		"SELECT MIN(tags) AS m, MAX(lastActivityTime) AS last, COUNT() AS n FROM devices WHERE connectionState = 'Connected'",
	}
	for _, e := range examples {
		texts = append(texts, e.Query)
	}
	checked := 0
	for _, text := range texts {
		q := mustParse(t, text)
		a := q.Aggregate()
		if a == nil {
			continue
		}
		want := run(t, text, all)
		for _, batch := range []int{1, 2, 3, len(all)} {
			a := q.Aggregate()
			sizes := []int{a.Size()}
			for at := 0; at < len(all); at += batch {
				a.Add(all[at:min(at+batch, len(all))])
				sizes = append(sizes, a.Size())
			}
			if got := a.Result(); !reflect.DeepEqual(got, want) {
				t.Errorf("%s in batches of %d:\n%s\nRun gives\n%s", text, batch, encodeItems(got.Items), encodeItems(want.Items))
			}
			if !slices.IsSorted(sizes) || len(want.Items) > 1 && sizes[len(sizes)-1] <= sizes[0] {
				t.Errorf("%s in batches of %d: sizes %v", text, batch, sizes)
			}
		}
		checked++
	}
	if checked < 5 {
		t.Fatalf("only %d queries of groups or aggregates checked", checked)
	}
	if q := mustParse(t, "SELECT deviceId FROM devices"); q.Aggregate() != nil {
		t.Error("a projection of one row per twin has an Aggregation")
	}
}
