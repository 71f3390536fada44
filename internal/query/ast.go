package query

import (
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"unicode/utf8"
)

// expr is a node of a parsed expression.
type expr interface {
	position() pos
	// prec is the node's binding strength, for printing with the fewest
	// parentheses: precOr (weakest) to precPrimary.
	prec() int
	write(b *strings.Builder)
}

// Binding strengths, weakest first.
const (
	precOr = iota + 1
	precAnd
	precNot
	precCompare
	precAdd
	precMul
	precUnary
	precPrimary
)

// literal is a constant: string, json.Number, bool or nil (null).
type literal struct {
	p     pos
	value any
}

// path is a property path; segs[0] is the canonical root name (deviceId,
// tags, properties...), and under properties segs[1] is desired or
// reported. Keys are as written.
type path struct {
	p    pos
	segs []string
}

// unary is NOT x, -x or +x.
type unary struct {
	p  pos
	op string // "NOT", "-", "+"
	x  expr
}

// binary is l op r for a logical, comparison or arithmetic operator.
type binary struct {
	p    pos
	op   string // AND OR = != < <= > >= + - * / %
	l, r expr
}

// inList is x IN [...] or x NIN [...].
type inList struct {
	p    pos
	not  bool
	x    expr
	list []*literal
}

// call is a function or aggregate call.
type call struct {
	p    pos
	fn   *function
	args []expr
}

func (n *literal) position() pos { return n.p }
func (n *path) position() pos    { return n.p }
func (n *unary) position() pos   { return n.p }
func (n *binary) position() pos  { return n.p }
func (n *inList) position() pos  { return n.p }
func (n *call) position() pos    { return n.p }

func (n *literal) prec() int { return precPrimary }
func (n *path) prec() int    { return precPrimary }
func (n *call) prec() int    { return precPrimary }
func (n *inList) prec() int  { return precCompare }

func (n *unary) prec() int {
	if n.op == "NOT" {
		return precNot
	}
	return precUnary
}

func (n *binary) prec() int {
	switch n.op {
	case "OR":
		return precOr
	case "AND":
		return precAnd
	case "+", "-":
		return precAdd
	case "*", "/", "%":
		return precMul
	}
	return precCompare
}

// writeOperand writes x, in parentheses if it binds less strongly than min.
func writeOperand(b *strings.Builder, x expr, min int) {
	if x.prec() < min {
		b.WriteByte('(')
		x.write(b)
		b.WriteByte(')')
		return
	}
	x.write(b)
}

func (n *literal) write(b *strings.Builder) { b.WriteString(literalString(n.value)) }

func (n *path) write(b *strings.Builder) { b.WriteString(pathString(n.segs)) }

func (n *unary) write(b *strings.Builder) {
	if n.op == "NOT" {
		b.WriteString("NOT ")
		writeOperand(b, n.x, precNot)
		return
	}
	b.WriteString(n.op)
	// A literal here is non-negative (the parser folds signs into number
	// literals), but keep "- -x" from reading as something else.
	if u, ok := n.x.(*unary); ok && u.op != "NOT" {
		b.WriteByte('(')
		n.x.write(b)
		b.WriteByte(')')
		return
	}
	writeOperand(b, n.x, precUnary)
}

func (n *binary) write(b *strings.Builder) {
	p := n.prec()
	writeOperand(b, n.l, p)
	b.WriteString(" " + n.op + " ")
	writeOperand(b, n.r, p+1)
}

func (n *inList) write(b *strings.Builder) {
	writeOperand(b, n.x, precCompare)
	if n.not {
		b.WriteString(" NIN [")
	} else {
		b.WriteString(" IN [")
	}
	for i, v := range n.list {
		if i > 0 {
			b.WriteString(", ")
		}
		v.write(b)
	}
	b.WriteByte(']')
}

func (n *call) write(b *strings.Builder) {
	b.WriteString(n.fn.name)
	b.WriteByte('(')
	for i, a := range n.args {
		if i > 0 {
			b.WriteString(", ")
		}
		a.write(b)
	}
	b.WriteByte(')')
}

// exprString returns x as query text.
func exprString(x expr) string {
	var b strings.Builder
	x.write(&b)
	return b.String()
}

// literalString returns a constant as query text.
func literalString(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		return strconv.FormatBool(x)
	case json.Number:
		return string(x)
	case string:
		return quote(x)
	}
	return "?"
}

// quote returns s as a single-quoted query string.
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('\'')
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == '\'' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r == utf8.RuneError && n == 1:
			b.WriteString(`\uFFFD`)
		case r < 0x20 || r == 0x7f:
			b.WriteString(`\u00`)
			b.WriteByte("0123456789ABCDEF"[r>>4])
			b.WriteByte("0123456789ABCDEF"[r&0xf])
		default:
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	b.WriteByte('\'')
	return b.String()
}

// pathString returns a path as query text, escaping keys that are not
// plain names or are reserved words as [[key]].
func pathString(segs []string) string {
	var b strings.Builder
	for i, s := range segs {
		if i > 0 {
			b.WriteByte('.')
		}
		b.WriteString(nameString(s))
	}
	return b.String()
}

// nameString returns a key or alias as query text: bare, or [[escaped]].
func nameString(s string) string {
	if isPlainName(s) {
		return s
	}
	return "[[" + s + "]]"
}

// isPlainName reports whether s can be written without [[ ]]: a name that
// is not a reserved word.
func isPlainName(s string) bool {
	if s == "" || reserved[strings.ToLower(s)] {
		return false
	}
	for i, r := range s {
		if i == 0 && !isIdentStart(r) || !isIdentPart(r) {
			return false
		}
	}
	return true
}

// formatNumber returns f as a JSON number, as encoding/json writes it.
func formatNumber(f float64) json.Number {
	if f == 0 {
		f = 0 // no "-0"
	}
	if abs := math.Abs(f); abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		return json.Number(strconv.FormatFloat(f, 'e', -1, 64))
	}
	return json.Number(strconv.FormatFloat(f, 'f', -1, 64))
}
