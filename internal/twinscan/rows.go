package twinscan

import (
	"slices"
	"strings"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// Rows writes the rows of a projection of paths (query.PathColumns) as
// JSON, straight from each twin's rendered document (hubtwin.AppendJSON,
// only the members the columns' paths start with): the values are copied
// as the document holds them, and no document is decoded. A row holds what query.Run gives for the twin, with its
// members in name order, as encoding/json writes a map.
//
// A whole fleet's projection of most of every twin would otherwise decode
// every section and encode every row as maps, which is most of its time.
type Rows struct {
	cols []rowColumn // in name order
	// roots are the root members the paths start with.
	roots []string
}

// rowColumn is a column: its name, and its path (query.Parse refuses two
// columns of one name).
type rowColumn struct {
	name string
	key  []byte // the name as a JSON string, and a colon
	path []string
	root int // the index in Rows.roots of path[0]
}

// NewRows prepares the rows of cols.
func NewRows(cols []query.PathColumn) *Rows {
	r := &Rows{}
	for _, c := range cols {
		root := slices.Index(r.roots, c.Path[0])
		if root < 0 {
			root = len(r.roots)
			r.roots = append(r.roots, c.Path[0])
		}
		r.cols = append(r.cols, rowColumn{name: c.Name, key: append(twin.AppendString(nil, c.Name), ':'), path: c.Path, root: root})
	}
	slices.SortFunc(r.cols, func(a, b rowColumn) int { return strings.Compare(a.name, b.name) })
	return r
}

// isRoot reports whether the columns need the document's member name.
func (r *Rows) isRoot(name string) bool { return slices.Contains(r.roots, name) }

// RowScratch is what Rows.Append reuses from row to row; one per
// goroutine.
type RowScratch struct {
	doc  []byte
	vals [][]byte // the values of Rows.roots in doc
}

// Append appends the row of t to b.
func (r *Rows) Append(b []byte, sc *RowScratch, t *v1alpha1.DeviceTwin) []byte {
	sc.doc = hubtwin.AppendMembers(sc.doc[:0], t, r.isRoot)
	out, err := r.appendRaw(b, sc)
	if err != nil {
		// Not expected (the cache holds valid JSON): the row of the
		// document as hubtwin renders it whole.
		return r.appendDecoded(b, hubtwin.FromDeviceTwin(t))
	}
	return out
}

// appendRaw appends the row of sc.doc to b.
func (r *Rows) appendRaw(b []byte, sc *RowScratch) ([]byte, error) {
	if err := rootMembers(sc.doc, r.roots, &sc.vals); err != nil {
		return nil, err
	}
	b = append(b, '{')
	n := 0
	for _, c := range r.cols {
		v := sc.vals[c.root]
		if v != nil && len(c.path) > 1 {
			if v[0] != '{' {
				continue // a lookup through a non-object is undefined
			}
			var err error
			if v, _, err = lookupRaw(v, 0, c.path[1:]); err != nil {
				return nil, err
			}
		}
		if v == nil {
			continue
		}
		if n > 0 {
			b = append(b, ',')
		}
		b = append(append(b, c.key...), v...)
		n++
	}
	return append(b, '}'), nil
}

// appendDecoded appends the row of doc, a whole document, to b.
func (r *Rows) appendDecoded(b []byte, doc map[string]any) []byte {
	row := twin.Doc{}
	for _, c := range r.cols {
		if v, ok := twin.ValueAt(doc, c.path); ok {
			row[c.name] = v
		}
	}
	return append(b, twin.Encode(row)...)
}

// rootMembers sets (*vals)[i] to the raw value of the member keys[i] of
// the object doc (nil when absent; the last one when a key appears twice,
// as encoding/json decides). The whole object is checked.
func rootMembers(doc []byte, keys []string, vals *[][]byte) error {
	*vals = slices.Grow((*vals)[:0], len(keys))[:len(keys)]
	v := *vals
	clear(v)
	i := skipSpace(doc, 0)
	if i >= len(doc) || doc[i] != '{' {
		return errMalformed
	}
	i = skipSpace(doc, i+1)
	if i < len(doc) && doc[i] == '}' {
		return nil
	}
	for {
		if i >= len(doc) || doc[i] != '"' {
			return errMalformed
		}
		kEnd, plain, err := scanString(doc, i)
		if err != nil {
			return err
		}
		var k int
		if plain {
			k = slices.IndexFunc(keys, func(key string) bool { return key == string(doc[i+1:kEnd-1]) }) // no copy
		} else {
			key, ok := unquote(doc[i:kEnd])
			if !ok {
				return errMalformed
			}
			k = slices.Index(keys, key)
		}
		i = skipSpace(doc, kEnd)
		if i >= len(doc) || doc[i] != ':' {
			return errMalformed
		}
		vStart := skipSpace(doc, i+1)
		vEnd, err := skipValue(doc, vStart)
		if err != nil {
			return err
		}
		if k >= 0 {
			v[k] = doc[vStart:vEnd]
		}
		i = skipSpace(doc, vEnd)
		switch {
		case i >= len(doc):
			return errMalformed
		case doc[i] == '}':
			if skipSpace(doc, i+1) != len(doc) {
				return errMalformed
			}
			return nil
		case doc[i] != ',':
			return errMalformed
		}
		i = skipSpace(doc, i+1)
	}
}
