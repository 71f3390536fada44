package twinscan

import (
	"reflect"
	"testing"

	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/internal/twinscan/twinscantest"
)

var rowQueries = []string{
	"SELECT deviceId, tags, properties FROM devices",
	"SELECT tags.a AS x, properties.desired.x AS y, tags.nothing AS z FROM devices",
	"SELECT properties.reported.$metadata, properties.desired.$version AS dv, capabilities.iotEdge, capabilities, configurations FROM devices",
	"SELECT tags.a.b, tags.s, tags.key, tags.q, properties.desired.[[é]], properties.desired.arr, properties.desired.arr.x FROM devices",
	"SELECT status, etag, version, lastActivityTime, connectionState, connectionStateUpdatedTime, statusUpdateTime FROM devices",
	"SELECT cloudToDeviceMessageCount, authenticationType, properties.reported.t.v AS v, properties.reported.nothing.here FROM devices",
	"SELECT properties.desired, properties.reported FROM devices WHERE tags.d = 0",
	"SELECT tags.location.plant AS plant, deviceId AS [[ünïcode \"name\"]] FROM devices",
	"SELECT tags.a, tags.b, tags.c, tags.d, properties.desired.a AS da, properties.desired.b AS db, properties.reported.$version FROM devices",
}

// TestRowsAsRun: the row Rows writes for each twin decodes to the row
// query.Run gives over the twin's whole document, for every projection of
// paths among the examples and the queries above, over the examples'
// fleet, twins with odd sections, configurations, and a twin whose
// section is malformed (its row is made from the decoded document).
func TestRowsAsRun(t *testing.T) {
	twins, f := exampleTwins(t)
	twins = append(twins, oddTwins()...)
	cfg := twinscantest.Fleet(3)
	cfg[0].Labels = map[string]string{"configurations.kubetwin.io/rollout-a": "targeted"}
	broken := cfg[1].DeepCopy()
	broken.Spec.Tags = rawJSON(`{"a": [1}`) // copied whole by AppendJSON: the document is malformed
	twins = append(twins, append(cfg, broken)...)
	checked := 0
	for _, text := range append(slicesConcat(rowQueries, f), extraQueries...) {
		q, err := query.Parse(text)
		if err != nil {
			t.Fatalf("%s: %v", text, err)
		}
		cols, ok := q.PathColumns()
		if !ok {
			continue
		}
		rows := NewRows(cols)
		var sc RowScratch
		for _, tw := range twins {
			res, _ := q.Run([]map[string]any{hubtwin.FromDeviceTwin(tw)})
			if len(res.Items) == 0 {
				continue
			}
			b := rows.Append([]byte("x"), &sc, tw)
			if b[0] != 'x' {
				t.Fatalf("%s on %s: Append did not append: %s", text, tw.Name, b)
			}
			got, err := twin.Decode(b[1:])
			if err != nil {
				t.Fatalf("%s on %s: the row is not a JSON object: %v\n%s", text, tw.Name, err, b[1:])
			}
			if want := res.Items[0]; !reflect.DeepEqual(got, want) {
				t.Errorf("%s on %s: Rows writes\n%s\nRun gives\n%s", text, tw.Name, b[1:], twin.Encode(want))
			}
			checked++
		}
	}
	if checked < 150 {
		t.Fatalf("only %d rows checked", checked)
	}
}

func TestPathColumns(t *testing.T) {
	for text, want := range map[string]bool{
		"SELECT deviceId, tags.a AS x FROM devices WHERE tags.b = 1": true,
		"SELECT * FROM devices":                              false,
		"SELECT COUNT() AS n FROM devices":                   false,
		"SELECT tags.a FROM devices GROUP BY tags.a":         false,
		"SELECT version + 1 AS v FROM devices":               false,
		"SELECT STARTSWITH(deviceId, 'a') AS s FROM devices": false,
	} {
		q, err := query.Parse(text)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := q.PathColumns(); ok != want {
			t.Errorf("%s: PathColumns ok = %v, want %v", text, ok, want)
		}
	}
}
