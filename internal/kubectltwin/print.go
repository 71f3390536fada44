package kubectltwin

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	goruntime "runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/util/duration"
	"k8s.io/cli-runtime/pkg/printers"

	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// Output formats (-o).
const (
	outputJSON  = "json"
	outputYAML  = "yaml"
	outputTable = "table"
	outputWide  = "wide"
)

var outputFormats = []string{outputJSON, outputTable, outputWide, outputYAML}

// checkOutput refuses an unknown -o value as kubectl does.
func checkOutput(format string, allowed []string) error {
	for _, f := range allowed {
		if f == format {
			return nil
		}
	}
	return fmt.Errorf("unable to match a printer suitable for the output format %q, allowed formats are: %s",
		format, strings.Join(allowed, ","))
}

// tableOptions say how to print a table.
type tableOptions struct {
	wide          bool
	noHeaders     bool
	withNamespace bool      // a NAMESPACE column first (-A)
	now           time.Time // for LAST ACTIVITY ages
}

// printTwinTable prints twins as a table: one row a device.
//
//	DEVICE  CONNECTION  LAST ACTIVITY  DESIRED  REPORTED
//
// where DESIRED and REPORTED are the $version of each section, and wide
// adds INSYNC (the InSync condition), VERSION, STATUS, the object's NAME
// and the TAGS.
func printTwinTable(w io.Writer, twins []*Twin, o tableOptions) error {
	tw := printers.GetNewTabWriter(w)
	var header []string
	if o.withNamespace {
		header = append(header, "NAMESPACE")
	}
	header = append(header, "DEVICE", "CONNECTION", "LAST ACTIVITY", "DESIRED", "REPORTED")
	if o.wide {
		header = append(header, "INSYNC", "VERSION", "STATUS", "NAME", "TAGS")
	}
	if !o.noHeaders {
		writeRow(tw, header)
	}
	for _, t := range twins {
		d := t.Doc
		var row []string
		if o.withNamespace {
			row = append(row, t.Namespace)
		}
		row = append(row,
			cell(d["deviceId"]),
			cell(d["connectionState"]),
			age(d["lastActivityTime"], o.now),
			cell(sectionVersion(d, "desired")),
			cell(sectionVersion(d, "reported")),
		)
		if o.wide {
			row = append(row, orNone(t.InSync), cell(d["version"]), cell(d["status"]), t.Name, cell(d["tags"]))
		}
		writeRow(tw, row)
	}
	return tw.Flush()
}

// printRowTable prints the rows of a projection or aggregate with the
// query's columns as headers. A value the row lacks (undefined) is <none>.
func printRowTable(w io.Writer, columns []string, rows []map[string]any, o tableOptions) error {
	return writeRowTable(w, columns, len(rows), o, func(i int) []string {
		cells := make([]string, len(columns))
		for j, c := range columns {
			cells[j] = "<none>"
			if v, ok := rows[i][c]; ok {
				cells[j] = cell(v)
			}
		}
		return cells
	})
}

// rowCells are the cells of rows as they came from the query API (valid
// JSON objects), made as printRowTable makes them decoded, part by part:
// add is a QueryAPI.Sink, which works while the next part is asked for.
type rowCells struct {
	columns []string
	rows    [][]string
}

// add makes the cells of rows, on every core.
func (c *rowCells) add(rows []json.RawMessage) error {
	base := len(c.rows)
	c.rows = slices.Grow(c.rows, len(rows))[:base+len(rows)]
	workers := max(1, min(goruntime.GOMAXPROCS(0), len(rows)/256))
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			var b []byte
			for i := w; i < len(rows); i += workers {
				cells := make([]string, len(c.columns))
				for j := range cells {
					cells[j] = "<none>"
				}
				eachMember(rows[i], func(key, val []byte) {
					if j := slices.Index(c.columns, rawString(key)); j >= 0 {
						b = appendCell(b[:0], val)
						cells[j] = string(b)
					}
				})
				c.rows[base+i] = cells
			}
		})
	}
	wg.Wait()
	return nil
}

// print prints the rows added as printRowTable does.
func (c *rowCells) print(w io.Writer, o tableOptions) error {
	return writeRowTable(w, c.columns, len(c.rows), o, func(i int) []string { return c.rows[i] })
}

// writeRowTable writes the header (unless o.noHeaders) and n rows, the
// cells of the i-th given by row.
func writeRowTable(w io.Writer, columns []string, n int, o tableOptions, row func(i int) []string) error {
	tw := printers.GetNewTabWriter(w)
	if !o.noHeaders {
		writeRow(tw, slices.Clone(columns))
	}
	for i := range n {
		writeRow(tw, row(i))
	}
	return tw.Flush()
}

// cellSpaces: a tab or newline inside a value would break the columns.
var cellSpaces = strings.NewReplacer("\t", " ", "\n", " ", "\r", " ")

func writeRow(w io.Writer, cells []string) {
	n := len(cells)
	for _, c := range cells {
		n += len(c)
	}
	line := make([]byte, 0, n)
	for i, c := range cells {
		if i > 0 {
			line = append(line, '\t')
		}
		line = append(line, cellSpaces.Replace(c)...)
	}
	_, _ = w.Write(append(line, '\n'))
}

// cell renders a value for a table: strings as they are, numbers as
// written in JSON, null as null, objects as compact JSON.
func cell(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case string:
		return x
	case json.Number:
		return string(x)
	case bool:
		return fmt.Sprint(x)
	case map[string]any:
		return string(twin.Encode(x))
	default:
		data, err := json.Marshal(x)
		if err != nil {
			return fmt.Sprint(x)
		}
		return string(data)
	}
}

func orNone(s string) string {
	if s == "" {
		return "<none>"
	}
	return s
}

// sectionVersion returns properties.<section>.$version of a twin document.
func sectionVersion(d map[string]any, section string) any {
	props, _ := d["properties"].(map[string]any)
	s, _ := props[section].(map[string]any)
	if v, ok := s["$version"]; ok {
		return v
	}
	return "<none>"
}

// age renders a time of the twin document as kubectl renders ages ("5m"),
// <never> for IoT Hub's zero time.
func age(v any, now time.Time) string {
	s, _ := v.(string)
	if s == "" || s == hubtwin.ZeroTime {
		return "<never>"
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return s
	}
	return duration.HumanDuration(now.Sub(t))
}

// printResult prints a query's answer in format.
func printResult(w io.Writer, ans *Answer, columns []string, format string, o tableOptions) error {
	switch format {
	case outputJSON:
		if ans.Raw != nil { // QueryAPI.KeepRaw
			return printRawJSON(w, ans.Raw, itemOrder(ans.ItemType, columns), itemSorted(ans.ItemType))
		}
		return printJSON(w, ans.Items, itemOrder(ans.ItemType, columns))
	case outputYAML:
		l := newYAMLList(w, itemOrder(ans.ItemType, columns))
		err := l.addDocs(ans.Items)
		if ans.Raw != nil { // QueryAPI.KeepRaw
			err = l.add(ans.Raw)
		}
		return cmp.Or(err, l.close())
	default:
		o.wide = format == outputWide
		if ans.ItemType == query.ItemTypeTwin {
			if ans.Raw != nil {
				// Only what the table shows is decoded (QueryAPI.KeepRaw).
				for i, t := range ans.Twins {
					t.Doc = tableDoc(ans.Raw[i], o.wide)
				}
			}
			return printTwinTable(w, ans.Twins, o)
		}
		if ans.Raw != nil {
			c := &rowCells{columns: columns}
			_ = c.add(ans.Raw)
			return c.print(w, o)
		}
		return printRowTable(w, columns, ans.Items, o)
	}
}

func itemOrder(itemType string, columns []string) orderFunc {
	if itemType == query.ItemTypeTwin {
		return twinDocOrder
	}
	return rowOrder(columns)
}

// itemSorted says where itemOrder sorts by name (see rawWriter).
func itemSorted(itemType string) func(path []string) bool {
	if itemType == query.ItemTypeTwin {
		return twinSorted
	}
	return rowSorted
}
