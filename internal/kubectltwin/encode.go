package kubectltwin

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	goruntime "runtime"
	"slices"
	"strconv"
	"strings"
	"sync"

	"go.yaml.in/yaml/v3"

	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// Documents are written with their members in a fixed order, so a twin
// reads as IoT Hub's does (deviceId first, properties last, $metadata and
// $version at the end of each section) and a row has its columns in the
// order of the SELECT list. JSON and YAML use the same order.

// twinOrder is the order of a twin document's root members, as IoT Hub
// writes them; members not listed follow in name order.
var twinOrder = []string{
	"deviceId", "etag", "deviceEtag", "version", "status", "statusReason", "statusUpdateTime",
	"connectionState", "connectionStateUpdatedTime", "lastActivityTime", "cloudToDeviceMessageCount",
	"authenticationType", "x509Thumbprint", "modelId", "capabilities", "tags", "properties",
}

// orderFunc returns the order of the members of the object at path (the
// keys from the document root).
type orderFunc func(path []string, keys []string) []string

// twinDocOrder orders a twin document.
func twinDocOrder(path, keys []string) []string {
	switch {
	case len(path) == 0:
		return ordered(keys, twinOrder, nil)
	case len(path) == 1 && path[0] == "properties":
		return ordered(keys, []string{"desired", "reported"}, nil)
	case len(path) == 2 && path[0] == "properties":
		return ordered(keys, nil, []string{"$metadata", "$version"})
	}
	return ordered(keys, nil, nil)
}

// rowOrder orders a row of a projection by the query's columns.
func rowOrder(columns []string) orderFunc {
	return func(path, keys []string) []string {
		if len(path) == 0 {
			return ordered(keys, columns, nil)
		}
		return ordered(keys, nil, nil)
	}
}

// ordered returns keys with first (those present) first, last (those
// present) last, and the others in between in byte order.
func ordered(keys, first, last []string) []string {
	out := make([]string, 0, len(keys))
	for _, k := range first {
		if slices.Contains(keys, k) {
			out = append(out, k)
		}
	}
	var mid []string
	for _, k := range keys {
		if !slices.Contains(first, k) && !slices.Contains(last, k) {
			mid = append(mid, k)
		}
	}
	slices.Sort(mid)
	out = append(out, mid...)
	for _, k := range last {
		if slices.Contains(keys, k) && !slices.Contains(first, k) {
			out = append(out, k)
		}
	}
	return out
}

// encodeJSON writes v (a twin.Doc value, or a slice of documents) as
// indented JSON, objects ordered by order.
func encodeJSON(v any, order orderFunc) []byte {
	var b bytes.Buffer
	writeJSON(&b, v, order, nil, "")
	b.WriteByte('\n')
	return b.Bytes()
}

// printJSON writes v to w as encodeJSON encodes it. A list of documents
// is written by a listWriter.
func printJSON(w io.Writer, v any, order orderFunc) error {
	items, ok := v.([]map[string]any)
	if !ok || len(items) == 0 {
		var b bytes.Buffer
		writeJSON(&b, v, order, nil, "")
		b.WriteByte('\n')
		_, err := w.Write(b.Bytes())
		return err
	}
	l := newListWriter(w)
	if err := l.write(len(items), func(_ int, b *bytes.Buffer, i int) { writeJSON(b, items[i], order, nil, jsonIndent) }); err != nil {
		return err
	}
	return l.close()
}

// printRawJSON writes items, valid JSON values, to w as printJSON writes
// them decoded (see rawList).
func printRawJSON(w io.Writer, items []json.RawMessage, order orderFunc, sorted func(path []string) bool) error {
	l := newRawList(w, order, sorted)
	if err := l.add(items); err != nil {
		return err
	}
	return l.close()
}

// rawList writes a JSON list of valid JSON values, added as they come,
// as printJSON writes them decoded, with order; sorted says where order
// sorts by name (see rawWriter).
type rawList struct {
	l   *listWriter
	rws []*rawWriter // one per buffer of l
}

func newRawList(w io.Writer, order orderFunc, sorted func(path []string) bool) *rawList {
	r := &rawList{l: newListWriter(w)}
	for i := range r.l.bufs {
		r.rws = append(r.rws, &rawWriter{b: &r.l.bufs[i], order: order, sorted: sorted})
	}
	return r
}

// add writes items after those added before.
func (r *rawList) add(items []json.RawMessage) error {
	return r.l.write(len(items), func(k int, _ *bytes.Buffer, i int) { r.rws[k].value(items[i], nil, jsonIndent) })
}

// close ends the list.
func (r *rawList) close() error { return r.l.close() }

// listWriter writes a JSON list of documents a batch at a time (a whole
// fleet is not held twice), the documents of a batch written on every
// core, a buffer per core. With yaml, it writes a YAML list: each
// document writes its own "- " and indentation.
type listWriter struct {
	w    io.Writer
	n    int // documents written
	bufs []bytes.Buffer
	yaml bool
}

func newListWriter(w io.Writer) *listWriter {
	return &listWriter{w: w, bufs: make([]bytes.Buffer, max(1, goruntime.GOMAXPROCS(0)))}
}

// write writes n more documents: write(k, b, i) writes the i-th of them
// into b, the k-th buffer (one goroutine at a time per buffer).
func (l *listWriter) write(n int, write func(k int, b *bytes.Buffer, i int)) error {
	// chunk documents per buffer, a buffer per core in a batch.
	const chunk = 64
	for at := 0; at < n; {
		used := 0
		var wg sync.WaitGroup
		for ; used < len(l.bufs) && at < n; used++ {
			k, b, from, to := used, &l.bufs[used], at, min(at+chunk, n)
			at = to
			b.Reset()
			first := l.n == 0 && from == 0
			wg.Go(func() {
				for i := from; i < to; i++ {
					switch {
					case l.yaml:
					case i > from || !first:
						b.WriteString(",\n" + jsonIndent)
					default:
						b.WriteString("[\n" + jsonIndent)
					}
					write(k, b, i)
				}
			})
		}
		wg.Wait()
		for i := range l.bufs[:used] {
			if _, err := l.w.Write(l.bufs[i].Bytes()); err != nil {
				return err
			}
		}
	}
	l.n += n
	return nil
}

// close ends the list.
func (l *listWriter) close() error {
	end := "\n]\n"
	switch {
	case l.n == 0:
		end = "[]\n"
	case l.yaml:
		return nil
	}
	_, err := io.WriteString(l.w, end)
	return err
}

const jsonIndent = "    " // as kubectl -o json

func writeJSON(b *bytes.Buffer, v any, order orderFunc, path []string, indent string) {
	switch x := v.(type) {
	case map[string]any:
		if len(x) == 0 {
			b.WriteString("{}")
			return
		}
		b.WriteString("{\n")
		inner := indent + jsonIndent
		for i, k := range order(path, keysOf(x)) {
			if i > 0 {
				b.WriteString(",\n")
			}
			b.WriteString(inner)
			writeString(b, k)
			b.WriteString(": ")
			writeJSON(b, x[k], order, append(path, k), inner)
		}
		b.WriteByte('\n')
		b.WriteString(indent)
		b.WriteByte('}')
	case []map[string]any:
		items := make([]any, len(x))
		for i := range x {
			items[i] = x[i]
		}
		writeJSON(b, items, order, path, indent)
	case []any:
		if len(x) == 0 {
			b.WriteString("[]")
			return
		}
		b.WriteString("[\n")
		for i, it := range x {
			if i > 0 {
				b.WriteString(",\n")
			}
			b.WriteString(indent + jsonIndent)
			// Array items are documents of their own: their paths restart.
			writeJSON(b, it, order, path[:0:0], indent+jsonIndent)
		}
		b.WriteString("\n" + indent + "]")
	case string:
		writeString(b, x)
	case bool:
		b.WriteString(strconv.FormatBool(x))
	case nil:
		b.WriteString("null")
	case json.Number:
		switch {
		case x == "":
			b.WriteString("0") // as json.Marshal
		case query.ValidNumber(string(x)):
			b.WriteString(string(x))
		default:
			b.WriteString("null") // as json.Marshal's error below
		}
	default:
		data, err := json.Marshal(x)
		if err != nil {
			data = []byte("null")
		}
		b.Write(data)
	}
}

// writeString writes s as encoding/json does without HTML escaping: as it
// is between quotes when it holds only printable ASCII other than the
// quote and the backslash (most keys and values), else through the
// encoder.
func writeString(b *bytes.Buffer, s string) {
	plain := true
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' {
			plain = false
			break
		}
	}
	if plain {
		b.WriteByte('"')
		b.WriteString(s)
		b.WriteByte('"')
		return
	}
	enc := json.NewEncoder(b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s)
	b.Truncate(b.Len() - 1) // the encoder's newline
}

func keysOf(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	return keys
}

// yamlList writes a YAML list of documents, added as they come, as
// encodeYAML writes the whole list: each document is encoded on its own,
// on every core, and indented into the list ("- " before its first line).
// A whole fleet as one YAML tree took a minute and gigabytes.
type yamlList struct {
	l     *listWriter
	order orderFunc
	mu    sync.Mutex
	err   error // the first
}

func newYAMLList(w io.Writer, order orderFunc) *yamlList {
	l := newListWriter(w)
	l.yaml = true
	return &yamlList{l: l, order: order}
}

// add writes items (valid JSON objects, as the query API sends them)
// after those added before.
func (y *yamlList) add(items []json.RawMessage) error {
	return y.write(len(items), func(i int) (map[string]any, error) { return twin.DecodeValid(items[i]) })
}

// addDocs writes docs after those added before.
func (y *yamlList) addDocs(docs []map[string]any) error {
	return y.write(len(docs), func(i int) (map[string]any, error) { return docs[i], nil })
}

func (y *yamlList) write(n int, doc func(i int) (map[string]any, error)) error {
	err := y.l.write(n, func(_ int, b *bytes.Buffer, i int) {
		d, err := doc(i)
		if err == nil {
			err = writeYAMLItem(b, d, y.order)
		}
		if err != nil {
			y.mu.Lock()
			y.err = cmp.Or(y.err, err)
			y.mu.Unlock()
		}
	})
	return cmp.Or(y.err, err)
}

// close ends the list.
func (y *yamlList) close() error { return y.l.close() }

// writeYAMLItem writes doc as an item of a YAML list: a list of one item,
// which yaml writes as it writes that item in a longer list (the item's
// indentation inside a quoted string's line breaks, a key's or a value's,
// is yaml's own).
func writeYAMLItem(b *bytes.Buffer, doc map[string]any, order orderFunc) error {
	enc := yaml.NewEncoder(b)
	enc.SetIndent(2)
	if err := enc.Encode(&yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", Content: []*yaml.Node{yamlNode(doc, order, nil)}}); err != nil {
		return err
	}
	return enc.Close()
}

// encodeYAML writes v as YAML, objects ordered by order.
func encodeYAML(v any, order orderFunc) ([]byte, error) {
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(yamlNode(v, order, nil)); err != nil {
		return nil, err
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

func yamlNode(v any, order orderFunc, path []string) *yaml.Node {
	switch x := v.(type) {
	case map[string]any:
		n := &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
		for _, k := range order(path, keysOf(x)) {
			n.Content = append(n.Content, scalar("!!str", k), yamlNode(x[k], order, append(path, k)))
		}
		return n
	case []map[string]any:
		n := &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq"}
		for _, it := range x {
			n.Content = append(n.Content, yamlNode(it, order, nil))
		}
		return n
	case []any:
		n := &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq"}
		for _, it := range x {
			n.Content = append(n.Content, yamlNode(it, order, nil))
		}
		return n
	case string:
		return scalar("!!str", x)
	case bool:
		return scalar("!!bool", fmt.Sprint(x))
	case nil:
		return scalar("!!null", "null")
	case json.Number:
		if strings.ContainsAny(string(x), ".eE") {
			return scalar("!!float", string(x))
		}
		return scalar("!!int", string(x))
	default:
		data, _ := json.Marshal(x)
		return scalar("!!float", string(data))
	}
}

func scalar(tag, value string) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: tag, Value: value}
}
