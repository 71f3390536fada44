// Package query implements the Azure IoT Hub query language over device
// twins: a lexer and parser, an evaluator over IoT Hub shaped twin
// documents (as internal/hubtwin renders them), and a planner that turns
// what it safely can into Kubernetes label and field selectors.
//
// # Language
//
//	SELECT [TOP n] <* | expression [AS alias], ...> FROM devices [WHERE condition] [GROUP BY path]
//
// Paths are deviceId, status, connectionState, lastActivityTime, version,
// etag (and the twin's other root members), tags.a.b, properties.desired.a.b,
// properties.reported.a.b and capabilities.iotEdge, optionally prefixed by
// devices. Root names, desired, reported and iotEdge match in any case;
// keys are case-sensitive. A key that is a reserved word (SELECT FROM WHERE
// GROUP BY ORDER TOP AS AND OR NOT IN NIN TRUE FALSE NULL, in any case), or
// is not a plain name (letters, digits, _ and $, not starting with a
// digit), is written [[key]]. Literals are strings in single or double quotes
// (escapes \' \" \\ \/ \b \f \n \r \t \uXXXX), numbers (decimal or 0x
// hexadecimal), true, false and null; arrays of literals appear only on the
// right of IN and NIN. Operators, weakest first: OR; AND; NOT; = != <> < <=
// > >= IN NIN; + -; * / %; unary - +. Functions: IS_DEFINED(x),
// STARTSWITH(s, prefix) (alias STARTS_WITH), ENDSWITH(s, suffix); aggregates
// COUNT(), AVG(x), SUM(x), MIN(x), MAX(x). Keywords and function names are
// case-insensitive.
//
// # Semantics
//
// A missing path is undefined. A comparison is defined only between two
// primitives (null, booleans, numbers, strings) of the same type; with
// undefined, across types or with an object it is undefined (IoT Hub
// says "false": undefined is the kind of false that NOT cannot turn true),
// and so is anything built on it: NOT undefined is undefined, false AND
// undefined is false, true OR undefined is true. A condition holds only when it is
// boolean true, so both tags.x = 'a' and tags.x != 'a' exclude twins without
// a string tags.x. x IN [a, b] means x = a OR x = b and x NIN [a, b] means
// NOT (x IN [a, b]). Numbers compare by value as IEEE doubles (1 = 1.0);
// strings compare by their bytes; false < true; null equals null but has no
// order. Arithmetic is defined on numbers only; a result that is not a
// finite number (division by zero) is undefined.
//
// Results are in deviceId order. A projection is named by its alias, else a
// path by its last key, else $1, $2... in order; undefined values are left
// out of the row. MIN and MAX order null < booleans < numbers < strings;
// SUM and AVG use numbers only (SUM of none is 0; AVG, MIN and MAX of none
// are undefined). With GROUP BY p each group is a row holding p's value
// (unless p is undefined for the group) and the aggregates; groups come in
// the order of their first twin. Without GROUP BY, aggregates give one row,
// even over no twins.
package query

import (
	"cmp"
	"slices"
	"strings"
)

// Item types of a result, as IoT Hub's x-ms-item-type header names them.
const (
	// ItemTypeTwin: the items are whole twin documents (SELECT *).
	ItemTypeTwin = "twin"
	// ItemTypeRaw: the items are projections or aggregates.
	ItemTypeRaw = "raw"
)

// Query is a parsed query. It is immutable and safe for concurrent use.
type Query struct {
	top        int // -1 without TOP
	star       bool
	proj       []projection
	aggregates bool // some projection is an aggregate
	where      expr // nil without WHERE
	groupBy    *path
}

// projection is one item of the SELECT list.
type projection struct {
	x     expr
	name  string // the column name: alias, last key, or $n
	alias bool   // name is an alias given with AS
	at    pos    // where the projection starts
}

// Result is the answer to a query.
type Result struct {
	// ItemType is ItemTypeTwin for SELECT * and ItemTypeRaw otherwise.
	ItemType string
	// Items are the twins (for SELECT *: the documents given to Run, not
	// copies) or rows of the result, in order.
	Items []map[string]any
	// GroupKeys holds, with GROUP BY, the key of each item's group: equal
	// for equal GROUP BY values, whether or not the row shows the value.
	GroupKeys []string
}

// String returns the query in a canonical form: keywords and functions in
// upper case, root names as the twin spells them, numbers as JSON writes
// them, strings in single quotes, and only the parentheses needed. Parsing
// it gives the same query.
func (q *Query) String() string {
	var b strings.Builder
	b.WriteString("SELECT ")
	if q.top >= 0 {
		b.WriteString("TOP ")
		b.WriteString(string(formatNumber(float64(q.top))))
		b.WriteByte(' ')
	}
	if q.star {
		b.WriteByte('*')
	}
	for i, pr := range q.proj {
		if i > 0 {
			b.WriteString(", ")
		}
		pr.x.write(&b)
		if pr.alias {
			b.WriteString(" AS ")
			b.WriteString(nameString(pr.name))
		}
	}
	b.WriteString(" FROM devices")
	if q.where != nil {
		b.WriteString(" WHERE ")
		q.where.write(&b)
	}
	if q.groupBy != nil {
		b.WriteString(" GROUP BY ")
		q.groupBy.write(&b)
	}
	return b.String()
}

// Matching returns SELECT * FROM devices with q's condition: the twins
// whose documents q's result is computed from. Running q over the
// documents of Matching's result (in any order) gives q's result.
func (q *Query) Matching() *Query {
	return &Query{top: -1, star: true, where: q.where}
}

// ItemType returns the type of the query's items: ItemTypeTwin for
// SELECT *, ItemTypeRaw for projections and aggregates.
func (q *Query) ItemType() string {
	if q.star {
		return ItemTypeTwin
	}
	return ItemTypeRaw
}

// PerTwin reports whether every item of the result comes from one twin,
// in deviceId order (SELECT * and projections), rather than from a group
// of twins (GROUP BY, aggregates).
func (q *Query) PerTwin() bool { return q.star || (q.groupBy == nil && !q.aggregates) }

// Top returns n of SELECT TOP n, and whether the query has a TOP.
func (q *Query) Top() (int, bool) { return q.top, q.top >= 0 }

// Columns returns the names of the projections in order, or nil for
// SELECT *.
func (q *Query) Columns() []string {
	if q.star {
		return nil
	}
	cols := make([]string, len(q.proj))
	for i, pr := range q.proj {
		cols[i] = pr.name
	}
	return cols
}

// PathColumn is a projection of the value at a path: a column of a row
// of a twin.
type PathColumn struct {
	// Name is the column's name: its alias, else the path's last key.
	Name string
	// Path is the path's keys, root names as the twin document spells
	// them (see [Query.Paths]).
	Path []string
}

// PathColumns returns q's projections when each is a path (a projection
// without GROUP BY, aggregates or other expressions), in the order of
// the SELECT list; ok is false otherwise, and for SELECT *. The row of a
// matching twin is then the values at the paths, each named by its
// column (names are distinct); an undefined value is left out.
func (q *Query) PathColumns() (cols []PathColumn, ok bool) {
	if q.star || q.groupBy != nil || q.aggregates {
		return nil, false
	}
	for _, pr := range q.proj {
		p, isPath := pr.x.(*path)
		if !isPath {
			return nil, false
		}
		cols = append(cols, PathColumn{Name: pr.name, Path: slices.Clone(p.segs)})
	}
	return cols, true
}

// Match reports whether the WHERE condition holds (is boolean true) for a
// twin document; it always does without WHERE.
func (q *Query) Match(twin map[string]any) bool {
	return q.where == nil || eval(q.where, twin) == true
}

// Run answers the query over twin documents in IoT Hub's shape (see
// internal/hubtwin): the twins are taken in deviceId order (stable for
// equal ids), filtered by WHERE, then projected, grouped or aggregated, and
// cut to TOP n. The error is reserved for future limits; today Run always
// succeeds.
func (q *Query) Run(twins []map[string]any) (Result, error) {
	res := Result{ItemType: q.ItemType(), Items: []map[string]any{}}
	type keyed struct {
		id  string
		doc map[string]any
	}
	var matching []keyed
	for _, t := range twins {
		if q.Match(t) {
			matching = append(matching, keyed{deviceID(t), t})
		}
	}
	slices.SortStableFunc(matching, func(a, b keyed) int { return cmp.Compare(a.id, b.id) })
	matched := make([]map[string]any, len(matching))
	for i, k := range matching {
		matched[i] = k.doc
	}
	switch {
	case q.star:
		res.Items = append(res.Items, matched...)
	case !q.PerTwin():
		a := q.Aggregate()
		a.Add(matched)
		return a.Result(), nil
	default:
		for _, t := range matched {
			res.Items = append(res.Items, q.row(t))
		}
	}
	if q.top >= 0 && len(res.Items) > q.top {
		res.Items = res.Items[:q.top]
	}
	return res, nil
}

// row builds the projected row of one twin (a projection without GROUP
// BY or aggregates). Undefined values are left out.
func (q *Query) row(doc map[string]any) map[string]any {
	r := make(map[string]any, len(q.proj))
	for _, pr := range q.proj {
		if v := eval(pr.x, doc); kindOf(v) != kUndefined {
			r[pr.name] = v
		}
	}
	return r
}

// deviceID returns a twin's deviceId, or "" if it has none.
func deviceID(doc map[string]any) string {
	s, _ := doc["deviceId"].(string)
	return s
}

// groupKey returns a string equal for values that group together.
func groupKey(v any) string {
	var b strings.Builder
	writeKey(&b, v)
	return b.String()
}

func writeKey(b *strings.Builder, v any) {
	switch k := kindOf(v); k {
	case kUndefined:
		b.WriteByte('u')
	case kNull:
		b.WriteByte('z')
	case kBool:
		if v.(bool) {
			b.WriteByte('T')
		} else {
			b.WriteByte('F')
		}
	case kNumber:
		b.WriteByte('n')
		b.WriteString(string(formatNumber(toFloat(v))))
		b.WriteByte(';')
	case kString:
		b.WriteString(quote(v.(string)))
	default:
		switch x := v.(type) {
		case map[string]any:
			b.WriteByte('{')
			keys := make([]string, 0, len(x))
			for key := range x {
				keys = append(keys, key)
			}
			slices.Sort(keys)
			for _, key := range keys {
				b.WriteString(quote(key))
				b.WriteByte(':')
				writeKey(b, x[key])
			}
			b.WriteByte('}')
		case []any:
			b.WriteByte('[')
			for _, e := range x {
				writeKey(b, e)
				b.WriteByte(',')
			}
			b.WriteByte(']')
		default:
			b.WriteString("?")
		}
	}
}
