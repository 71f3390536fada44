// Package querytest reads internal/query/testdata/examples.json: the fleet
// and the query examples docs/queries.md shows, with their answers. The
// query engine's tests and the kubectl plugin's tests both check them.
package querytest

import (
	"encoding/json"
	"fmt"
	"os"
)

// Device is one twin of the example fleet.
type Device struct {
	DeviceID         string          `json:"deviceId"`
	Tags             json.RawMessage `json:"tags"`
	Reported         json.RawMessage `json:"reported"`
	ConnectionState  string          `json:"connectionState"`
	LastActivityTime string          `json:"lastActivityTime"`
}

// Example is a query and its answer over the fleet: the device ids it
// selects, or the rows it returns.
type Example struct {
	Name      string          `json:"name"`
	Query     string          `json:"query"`
	DeviceIDs []string        `json:"deviceIds"`
	Rows      json.RawMessage `json:"rows"`
}

// File is the content of examples.json.
type File struct {
	Fleet    []Device  `json:"fleet"`
	Examples []Example `json:"examples"`
}

// Load reads the examples file at path; a file without a fleet or without
// examples is an error, so a test cannot pass by checking nothing.
func Load(path string) (*File, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var f File
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(f.Fleet) == 0 || len(f.Examples) == 0 {
		return nil, fmt.Errorf("%s: want a fleet and examples", path)
	}
	return &f, nil
}
