package query

import (
	"encoding/json"
	"math"
	"slices"
	"strconv"
	"strings"
)

// reserved are the words that cannot be used bare as keys or aliases; write
// them as [[word]].
var reserved = map[string]bool{
	"select": true, "from": true, "where": true, "group": true, "by": true,
	"order": true, "top": true, "as": true, "and": true, "or": true,
	"not": true, "in": true, "nin": true, "true": true, "false": true,
	"null": true,
}

// function describes a function or aggregate.
type function struct {
	name      string // canonical upper-case name
	args      int    // number of arguments
	aggregate bool
}

var functions = map[string]*function{
	"is_defined":  {name: "IS_DEFINED", args: 1},
	"startswith":  {name: "STARTSWITH", args: 2},
	"starts_with": {name: "STARTSWITH", args: 2},
	"endswith":    {name: "ENDSWITH", args: 2},
	"count":       {name: "COUNT", args: 0, aggregate: true},
	"avg":         {name: "AVG", args: 1, aggregate: true},
	"sum":         {name: "SUM", args: 1, aggregate: true},
	"min":         {name: "MIN", args: 1, aggregate: true},
	"max":         {name: "MAX", args: 1, aggregate: true},
}

// rootKind says what may follow a root name in a path.
type rootKind int

const (
	rootScalar         rootKind = iota // no members
	rootObject                         // any keys: tags
	rootProperties                     // desired or reported, then any keys
	rootCapabilities                   // iotEdge
	rootConfigurations                 // a configuration's name, then status
)

// roots maps lower-case root names to their name in the twin document.
var roots = map[string]struct {
	name string
	kind rootKind
}{
	"deviceid":                   {"deviceId", rootScalar},
	"etag":                       {"etag", rootScalar},
	"version":                    {"version", rootScalar},
	"status":                     {"status", rootScalar},
	"statusreason":               {"statusReason", rootScalar},
	"statusupdatetime":           {"statusUpdateTime", rootScalar},
	"connectionstate":            {"connectionState", rootScalar},
	"connectionstateupdatedtime": {"connectionStateUpdatedTime", rootScalar},
	"lastactivitytime":           {"lastActivityTime", rootScalar},
	"cloudtodevicemessagecount":  {"cloudToDeviceMessageCount", rootScalar},
	"authenticationtype":         {"authenticationType", rootScalar},
	"capabilities":               {"capabilities", rootCapabilities},
	"tags":                       {"tags", rootObject},
	"properties":                 {"properties", rootProperties},
	"configurations":             {"configurations", rootConfigurations},
}

// maxDepth bounds the nesting of expressions.
const maxDepth = 100

// parser is a recursive-descent parser. Errors are raised by panicking
// with an *Error, which Parse recovers.
type parser struct {
	lx    *lexer
	tok   token // the current token
	prev  token // the token before it
	depth int
}

func (p *parser) fail(at pos, format string, args ...any) {
	panic(errorf(at, format, args...))
}

// next moves to the next token.
func (p *parser) next() {
	t, err := p.lx.next()
	if err != nil {
		panic(err)
	}
	p.prev, p.tok = p.tok, t
}

// keyword consumes the keyword kw if it is the current token.
func (p *parser) keyword(kw string) bool {
	if p.tok.isKeyword(kw) {
		p.next()
		return true
	}
	return false
}

// punct consumes the punctuation s if it is the current token.
func (p *parser) punct(s string) bool {
	if p.tok.isPunct(s) {
		p.next()
		return true
	}
	return false
}

// expect consumes the punctuation s or fails with "expected s what".
func (p *parser) expect(s, what string) {
	if !p.punct(s) {
		p.fail(p.tok.pos, "expected '%s' %s, got %s", s, what, p.tok.describe())
	}
}

// Parse parses a query of the IoT Hub query language:
//
//	SELECT [TOP n] <* | expression [AS alias], ...> FROM devices [WHERE condition] [GROUP BY path]
//
// A malformed query gives an *Error locating the problem.
func Parse(q string) (query *Query, err error) {
	p := &parser{lx: newLexer(q)}
	defer func() {
		if r := recover(); r != nil {
			e, ok := r.(*Error)
			if !ok {
				panic(r)
			}
			query, err = nil, e
		}
	}()
	p.next()
	return p.query(), nil
}

func (p *parser) query() *Query {
	q := &Query{top: -1}
	if !p.keyword("select") {
		p.fail(p.tok.pos, "expected SELECT at the start of the query, got %s", p.tok.describe())
	}
	if p.tok.isKeyword("top") {
		p.next()
		if p.tok.kind != tNumber {
			p.fail(p.tok.pos, "expected a number after TOP, got %s", p.tok.describe())
		}
		n := p.tok.num
		if n != math.Trunc(n) || n > math.MaxInt32 {
			p.fail(p.tok.pos, "TOP needs a whole number up to %d, got %s", math.MaxInt32, p.tok.src)
		}
		q.top = int(n)
		p.next()
	}
	if p.tok.isPunct("*") {
		q.star = true
		p.next()
	} else {
		p.projections(q)
	}
	if q.star && p.tok.isPunct(",") {
		p.fail(p.tok.pos, "'*' cannot be combined with other projections")
	}
	if !p.keyword("from") {
		what := "the projections"
		if q.star {
			what = "'*'"
		}
		p.fail(p.tok.pos, "expected FROM after %s, got %s", what, p.tok.describe())
	}
	p.collection()
	if p.keyword("where") {
		q.where = p.expr()
		if a := findAggregate(q.where); a != nil {
			p.fail(a.p, "aggregate %s is not allowed in WHERE", a.fn.name)
		}
	}
	if p.tok.isKeyword("group") {
		p.next()
		if !p.keyword("by") {
			p.fail(p.tok.pos, "expected BY after GROUP, got %s", p.tok.describe())
		}
		if p.tok.kind != tIdent || isReserved(p.tok) {
			p.fail(p.tok.pos, "expected a path after GROUP BY, got %s", p.tok.describe())
		}
		at := p.tok
		p.next()
		if p.tok.isPunct("(") {
			p.fail(at.pos, "GROUP BY takes a path, not a function call")
		}
		q.groupBy = p.path(at)
	}
	if p.tok.isKeyword("order") {
		p.fail(p.tok.pos, "ORDER BY is not supported: results come in deviceId order")
	}
	if p.tok.kind != tEOF {
		expected := "the end of the query"
		switch {
		case q.groupBy != nil:
		case q.where != nil:
			expected = "GROUP BY or the end of the query"
		default:
			expected = "WHERE, GROUP BY or the end of the query"
		}
		p.fail(p.tok.pos, "expected %s, got %s", expected, p.tok.describe())
	}
	p.check(q)
	return q
}

// collection parses the FROM target: devices.
func (p *parser) collection() {
	t := p.tok
	if t.kind != tIdent || isReserved(t) {
		p.fail(t.pos, "expected a collection after FROM, got %s", t.describe())
	}
	name := t.text
	p.next()
	for p.tok.isPunct(".") {
		p.next()
		if p.tok.kind != tIdent {
			p.fail(p.tok.pos, "expected a name after '.', got %s", p.tok.describe())
		}
		name += "." + p.tok.text
		p.next()
	}
	if !strings.EqualFold(name, "devices") {
		p.fail(t.pos, "unknown collection '%s': only FROM devices can be queried", name)
	}
}

func (p *parser) projections(q *Query) {
	unnamed := 0
	for {
		if p.tok.isPunct("*") {
			p.fail(p.tok.pos, "'*' cannot be mixed with other projections")
		}
		start := p.tok
		x := p.expr()
		pr := projection{x: x, at: start.pos}
		if p.keyword("as") {
			pr.name, pr.alias = p.name("AS"), true
		} else if pt, ok := x.(*path); ok {
			pr.name = pt.segs[len(pt.segs)-1]
		} else {
			unnamed++
			pr.name = "$" + strconv.Itoa(unnamed)
		}
		for _, o := range q.proj {
			if o.name == pr.name {
				p.fail(start.pos, "duplicate column name '%s': give one of them another name with AS", pr.name)
			}
		}
		if c, ok := x.(*call); ok && c.fn.aggregate {
			q.aggregates = true
		} else if a := findAggregate(x); a != nil {
			p.fail(a.p, "aggregate %s must be a whole projection, not part of an expression", a.fn.name)
		}
		q.proj = append(q.proj, pr)
		if !p.punct(",") {
			return
		}
	}
}

// name parses an alias after what: a name or a [[escaped]] name.
func (p *parser) name(what string) string {
	t := p.tok
	switch {
	case t.kind == tEscaped:
	case t.kind == tIdent && isReserved(t):
		p.fail(t.pos, "'%s' is a reserved word: write it as [[%s]]", t.text, t.text)
	case t.kind != tIdent:
		p.fail(t.pos, "expected a name after %s, got %s", what, t.describe())
	}
	p.next()
	return t.text
}

// check enforces the rules between projections and GROUP BY.
func (p *parser) check(q *Query) {
	if q.groupBy != nil && q.star {
		p.fail(q.groupBy.p, "GROUP BY cannot be used with SELECT *: project the GROUP BY path and aggregates")
	}
	for _, pr := range q.proj {
		if c, ok := pr.x.(*call); ok && c.fn.aggregate {
			continue
		}
		switch {
		case q.groupBy != nil:
			if pt, ok := pr.x.(*path); !ok || !slices.Equal(pt.segs, q.groupBy.segs) {
				p.fail(pr.at, "%s is not the GROUP BY path: with GROUP BY %s, project that path or aggregates",
					exprString(pr.x), pathString(q.groupBy.segs))
			}
		case q.aggregates:
			if _, ok := pr.x.(*path); ok {
				p.fail(pr.at, "%s cannot be projected next to an aggregate without GROUP BY %s",
					exprString(pr.x), exprString(pr.x))
			}
			p.fail(pr.at, "%s cannot be projected next to an aggregate: only a GROUP BY path can", exprString(pr.x))
		}
	}
}

// findAggregate returns the first aggregate call in x, or nil.
func findAggregate(x expr) *call {
	switch n := x.(type) {
	case *call:
		if n.fn.aggregate {
			return n
		}
		for _, a := range n.args {
			if c := findAggregate(a); c != nil {
				return c
			}
		}
	case *unary:
		return findAggregate(n.x)
	case *binary:
		if c := findAggregate(n.l); c != nil {
			return c
		}
		return findAggregate(n.r)
	case *inList:
		return findAggregate(n.x)
	}
	return nil
}

func isReserved(t token) bool { return t.kind == tIdent && reserved[strings.ToLower(t.text)] }

// enter and leave bound the recursion depth.
func (p *parser) enter() {
	p.depth++
	if p.depth > maxDepth {
		p.fail(p.tok.pos, "expression nested too deeply (more than %d levels)", maxDepth)
	}
}

func (p *parser) leave() { p.depth-- }

// expr parses a full expression: OR is the weakest operator.
func (p *parser) expr() expr {
	p.enter()
	defer p.leave()
	x := p.and()
	for p.tok.isKeyword("or") {
		at := p.tok.pos
		p.next()
		x = &binary{p: at, op: "OR", l: x, r: p.and()}
	}
	return x
}

func (p *parser) and() expr {
	x := p.not()
	for p.tok.isKeyword("and") {
		at := p.tok.pos
		p.next()
		x = &binary{p: at, op: "AND", l: x, r: p.not()}
	}
	return x
}

func (p *parser) not() expr {
	if p.tok.isKeyword("not") {
		at := p.tok.pos
		p.next()
		p.enter()
		defer p.leave()
		return &unary{p: at, op: "NOT", x: p.not()}
	}
	return p.comparison()
}

var comparisons = map[string]bool{"=": true, "!=": true, "<": true, "<=": true, ">": true, ">=": true}

func (p *parser) comparison() expr {
	x := p.additive()
	for {
		switch t := p.tok; {
		case t.kind == tPunct && comparisons[t.text]:
			p.next()
			x = &binary{p: t.pos, op: t.text, l: x, r: p.additive()}
		case t.isKeyword("in") || t.isKeyword("nin"):
			p.next()
			x = &inList{p: t.pos, not: t.isKeyword("nin"), x: x, list: p.array(t)}
		case t.isKeyword("not") && p.peek().isKeyword("in"):
			p.fail(t.pos, "NOT IN is written NIN")
		default:
			return x
		}
	}
}

// peek returns the token after the current one without consuming it; a
// lexical error there gives an EOF token (it is reported once reached).
func (p *parser) peek() token {
	l := *p.lx
	t, err := l.next()
	if err != nil {
		return token{kind: tEOF}
	}
	return t
}

// array parses the [literal, ...] after IN or NIN (op).
func (p *parser) array(op token) []*literal {
	if !p.tok.isPunct("[") {
		p.fail(p.tok.pos, "expected '[' after %s, got %s", strings.ToUpper(op.text), p.tok.describe())
	}
	p.next()
	var list []*literal
	for {
		lit, ok := p.constant()
		if !ok {
			if p.tok.isPunct("]") && len(list) == 0 {
				p.fail(p.tok.pos, "expected a value after '[': %s needs at least one value", strings.ToUpper(op.text))
			}
			p.fail(p.tok.pos, "expected a string, number, true, false or null after '%s', got %s", p.prev.src, p.tok.describe())
		}
		list = append(list, lit)
		if p.punct("]") {
			return list
		}
		if !p.punct(",") {
			p.fail(p.tok.pos, "expected ',' or ']' in the array, got %s", p.tok.describe())
		}
	}
}

// constant parses a literal with an optional sign on a number.
func (p *parser) constant() (*literal, bool) {
	t := p.tok
	sign := 1.0
	if t.isPunct("-") || t.isPunct("+") {
		if t.text == "-" {
			sign = -1
		}
		p.next()
		if p.tok.kind != tNumber {
			p.fail(p.tok.pos, "expected a number after '%s', got %s", t.text, p.tok.describe())
		}
	}
	switch n := p.tok; {
	case n.kind == tNumber:
		p.next()
		return &literal{p: t.pos, value: formatNumber(sign * n.num)}, true
	case n.kind == tString:
		p.next()
		return &literal{p: t.pos, value: n.text}, true
	case n.isKeyword("true"), n.isKeyword("false"):
		p.next()
		return &literal{p: t.pos, value: strings.EqualFold(n.text, "true")}, true
	case n.isKeyword("null"):
		p.next()
		return &literal{p: t.pos, value: nil}, true
	}
	return nil, false
}

func (p *parser) additive() expr {
	x := p.multiplicative()
	for p.tok.isPunct("+") || p.tok.isPunct("-") {
		t := p.tok
		p.next()
		x = &binary{p: t.pos, op: t.text, l: x, r: p.multiplicative()}
	}
	return x
}

func (p *parser) multiplicative() expr {
	x := p.unary()
	for p.tok.isPunct("*") || p.tok.isPunct("/") || p.tok.isPunct("%") {
		t := p.tok
		p.next()
		x = &binary{p: t.pos, op: t.text, l: x, r: p.unary()}
	}
	return x
}

func (p *parser) unary() expr {
	if t := p.tok; t.isPunct("-") || t.isPunct("+") {
		p.next()
		p.enter()
		defer p.leave()
		x := p.unary()
		if lit, ok := x.(*literal); ok {
			if n, ok := lit.value.(json.Number); ok {
				f, _ := strconv.ParseFloat(string(n), 64)
				if t.text == "-" {
					f = -f
				}
				return &literal{p: t.pos, value: formatNumber(f)}
			}
		}
		return &unary{p: t.pos, op: t.text, x: x}
	}
	return p.primary()
}

func (p *parser) primary() expr {
	t := p.tok
	switch {
	case t.isPunct("("):
		p.next()
		x := p.expr()
		p.expect(")", "to close the '(' at "+posString(t.pos))
		return x
	case t.isPunct("["):
		p.fail(t.pos, "arrays are only allowed on the right of IN and NIN")
	case t.kind == tNumber, t.kind == tString, t.isKeyword("true"), t.isKeyword("false"), t.isKeyword("null"):
		lit, _ := p.constant()
		return lit
	case t.kind == tIdent && !isReserved(t):
		p.next()
		if p.tok.isPunct("(") {
			return p.call(t)
		}
		if fn, ok := functions[strings.ToLower(t.text)]; ok {
			p.fail(p.tok.pos, "expected '(' after %s, got %s", fn.name, p.tok.describe())
		}
		return p.path(t)
	case t.kind == tEscaped:
		p.fail(t.pos, "a path must start with a property name such as tags or properties, not [[%s]]", t.text)
	}
	p.fail(t.pos, "expected a value after '%s'", p.prev.src)
	return nil
}

func posString(at pos) string {
	return "line " + strconv.Itoa(at.line) + ", column " + strconv.Itoa(at.col)
}

// call parses the arguments of the function named by name; the current
// token is '('.
func (p *parser) call(name token) expr {
	fn, ok := functions[strings.ToLower(name.text)]
	if !ok {
		p.fail(name.pos, "unknown function '%s'", name.text)
	}
	p.next() // (
	c := &call{p: name.pos, fn: fn}
	if !p.punct(")") {
		for {
			if p.tok.isPunct("*") && fn.name == "COUNT" {
				p.fail(p.tok.pos, "COUNT takes no argument: write COUNT()")
			}
			c.args = append(c.args, p.expr())
			if p.punct(")") {
				break
			}
			if !p.punct(",") {
				p.fail(p.tok.pos, "expected ',' or ')' after an argument of %s, got %s", fn.name, p.tok.describe())
			}
		}
	}
	if len(c.args) != fn.args {
		plural := "s"
		if fn.args == 1 {
			plural = ""
		}
		p.fail(name.pos, "%s takes %d argument%s, got %d", fn.name, fn.args, plural, len(c.args))
	}
	for _, a := range c.args {
		if agg := findAggregate(a); agg != nil {
			p.fail(agg.p, "aggregate %s cannot be an argument of %s", agg.fn.name, fn.name)
		}
	}
	return c
}

// path parses the rest of a path whose first name, root, has been
// consumed.
func (p *parser) path(root token) *path {
	if strings.EqualFold(root.text, "devices") {
		if !p.tok.isPunct(".") {
			p.fail(p.tok.pos, "expected '.' and a property after devices, got %s", p.tok.describe())
		}
		p.next()
		if p.tok.kind != tIdent || isReserved(p.tok) {
			p.fail(p.tok.pos, "expected a property name after 'devices.', got %s", p.tok.describe())
		}
		root = p.tok
		p.next()
	}
	r, ok := roots[strings.ToLower(root.text)]
	if !ok {
		p.fail(root.pos, "unknown property '%s': a path starts with deviceId, status, connectionState, "+
			"lastActivityTime, version, etag, tags, properties, capabilities or configurations", root.text)
	}
	pt := &path{p: root.pos, segs: []string{r.name}}
	for p.tok.isPunct(".") {
		p.next()
		key := p.tok
		switch {
		case key.kind == tEscaped:
		case key.kind == tIdent && isReserved(key):
			p.fail(key.pos, "'%s' is a reserved word: write it as [[%s]]", key.text, key.text)
		case key.kind != tIdent:
			p.fail(key.pos, "expected a name after '.', got %s", key.describe())
		}
		name := key.text
		switch {
		case r.kind == rootScalar:
			p.fail(key.pos, "%s has no members", r.name)
		case r.kind == rootProperties && len(pt.segs) == 1:
			switch strings.ToLower(name) {
			case "desired", "reported":
				name = strings.ToLower(name)
			default:
				p.fail(key.pos, "expected desired or reported after properties, got '%s'", name)
			}
		case r.kind == rootCapabilities && len(pt.segs) == 1:
			if !strings.EqualFold(name, "iotEdge") {
				p.fail(key.pos, "unknown capability '%s': the only one is iotEdge", name)
			}
			name = "iotEdge"
		case r.kind == rootCapabilities:
			p.fail(key.pos, "capabilities.iotEdge has no members")
		case r.kind == rootConfigurations && len(pt.segs) == 2:
			// IoT Hub's configurations.[[id]].status: a twin records
			// only the status of each configuration.
			if !strings.EqualFold(name, "status") {
				p.fail(key.pos, "expected status after configurations.%s, got '%s'", nameString(pt.segs[1]), name)
			}
			name = "status"
		case r.kind == rootConfigurations && len(pt.segs) == 3:
			p.fail(key.pos, "configurations.%s.status has no members", nameString(pt.segs[1]))
		}
		pt.segs = append(pt.segs, name)
		p.next()
	}
	return pt
}
