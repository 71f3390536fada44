package kubectltwin

import (
	"encoding/json"
	"io"
	"testing"

	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/internal/twinscan/twinscantest"
)

// BenchmarkEncodeFleetJSON: -o json of SELECT * over 10,000 twins, as the
// plugin prints them (the documents decoded as the query API's answer is).
func BenchmarkEncodeFleetJSON(b *testing.B) {
	docs := fleetDocs(b)
	b.SetBytes(int64(len(encodeJSON(docs, twinDocOrder))))
	for b.Loop() {
		if err := printJSON(io.Discard, docs, twinDocOrder); err != nil {
			b.Fatal(err)
		}
	}
}

// fleetDocs: 10,000 twin documents as the plugin decodes them.
func fleetDocs(b *testing.B) []map[string]any {
	var docs []map[string]any
	for _, t := range twinscantest.Fleet(10000) {
		raw, err := json.Marshal(hubtwin.FromDeviceTwin(t))
		if err != nil {
			b.Fatal(err)
		}
		d, err := twin.Decode(raw)
		if err != nil {
			b.Fatal(err)
		}
		docs = append(docs, d)
	}
	return docs
}
