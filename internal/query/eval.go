package query

import (
	"encoding/json"
	"math"
	"strconv"
	"strings"
)

// undefinedValue is the type of undefined: the value of a missing path and
// the result of an operation without a meaning (comparing a number with a
// string, adding strings...). It is never equal to anything, not even to
// itself, so a condition involving it is never true.
type undefinedValue struct{}

var undefined any = undefinedValue{}

// kind classifies a value.
type kind int

const (
	kUndefined kind = iota
	kNull
	kBool
	kNumber
	kString
	kObject // objects, arrays and anything else: never compared
)

// kindOf returns v's kind. Numbers may be json.Number (as twin documents
// hold them) or any Go number type; a json.Number that is not a valid JSON
// number counts as an object.
func kindOf(v any) kind {
	switch x := v.(type) {
	case undefinedValue:
		return kUndefined
	case nil:
		return kNull
	case bool:
		return kBool
	case string:
		return kString
	case json.Number:
		if ValidNumber(string(x)) {
			return kNumber
		}
		return kObject
	case float64:
		if math.IsNaN(x) {
			return kObject
		}
		return kNumber
	case float32:
		if math.IsNaN(float64(x)) {
			return kObject
		}
		return kNumber
	case int, int8, int16, int32, int64, uint, uint8, uint16, uint32, uint64:
		return kNumber
	}
	return kObject
}

// toFloat returns the value of a number (kindOf(v) == kNumber).
func toFloat(v any) float64 {
	switch x := v.(type) {
	case json.Number:
		f, _ := strconv.ParseFloat(string(x), 64) // ±Inf for huge exponents
		return f
	case float64:
		return x
	case float32:
		return float64(x)
	case int:
		return float64(x)
	case int8:
		return float64(x)
	case int16:
		return float64(x)
	case int32:
		return float64(x)
	case int64:
		return float64(x)
	case uint:
		return float64(x)
	case uint8:
		return float64(x)
	case uint16:
		return float64(x)
	case uint32:
		return float64(x)
	case uint64:
		return float64(x)
	}
	return math.NaN()
}

// ValidNumber reports whether s is a JSON number literal (what json.Marshal
// accepts in a json.Number, besides the empty string).
func ValidNumber(s string) bool {
	i := 0
	if i < len(s) && s[i] == '-' {
		i++
	}
	digits := func() int {
		n := 0
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
			n++
		}
		return n
	}
	switch {
	case i < len(s) && s[i] == '0':
		i++
	case digits() == 0:
		return false
	}
	if i < len(s) && s[i] == '.' {
		i++
		if digits() == 0 {
			return false
		}
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		if digits() == 0 {
			return false
		}
	}
	return i == len(s)
}

// compare orders a and b if they are primitives of the same kind: -1, 0 or
// 1, and ok. Numbers compare by value, strings by their bytes, false before
// true; null equals null (and has no order: see ordered).
func compare(a, b any) (c int, ok bool) {
	ka, kb := kindOf(a), kindOf(b)
	if ka != kb {
		return 0, false
	}
	switch ka {
	case kNull:
		return 0, true
	case kBool:
		x, y := a.(bool), b.(bool)
		switch {
		case x == y:
			return 0, true
		case y:
			return -1, true
		}
		return 1, true
	case kNumber:
		x, y := toFloat(a), toFloat(b)
		switch {
		case x < y:
			return -1, true
		case x > y:
			return 1, true
		}
		return 0, true
	case kString:
		return strings.Compare(a.(string), b.(string)), true
	}
	return 0, false
}

// compareOp applies a comparison operator: true, false, or undefined when a
// and b are not primitives of the same kind.
func compareOp(op string, a, b any) any {
	c, ok := compare(a, b)
	if !ok {
		return undefined
	}
	switch op {
	case "=":
		return c == 0
	case "!=":
		return c != 0
	}
	if kindOf(a) == kNull {
		return undefined // null has no order
	}
	switch op {
	case "<":
		return c < 0
	case "<=":
		return c <= 0
	case ">":
		return c > 0
	case ">=":
		return c >= 0
	}
	return undefined
}

// and, or and not are three-valued (Kleene) logic over true, false and
// anything else (undefined, or a value that is not a boolean).
func and(a, b any) any {
	if a == false || b == false {
		return false
	}
	if a == true && b == true {
		return true
	}
	return undefined
}

func or(a, b any) any {
	if a == true || b == true {
		return true
	}
	if a == false && b == false {
		return false
	}
	return undefined
}

func not(a any) any {
	if x, ok := a.(bool); ok {
		return !x
	}
	return undefined
}

// arithmetic applies + - * / % to two numbers; anything else, and a result
// that is not a finite number (division by zero, overflow), is undefined.
func arithmetic(op string, a, b any) any {
	if kindOf(a) != kNumber || kindOf(b) != kNumber {
		return undefined
	}
	x, y := toFloat(a), toFloat(b)
	var r float64
	switch op {
	case "+":
		r = x + y
	case "-":
		r = x - y
	case "*":
		r = x * y
	case "/":
		r = x / y
	case "%":
		r = math.Mod(x, y)
	}
	if math.IsNaN(r) || math.IsInf(r, 0) {
		return undefined
	}
	return formatNumber(r)
}

// lookup returns the value at segs in doc, or undefined.
func lookup(doc map[string]any, segs []string) any {
	var v any = doc
	for _, s := range segs {
		m, ok := v.(map[string]any)
		if !ok {
			return undefined
		}
		if v, ok = m[s]; !ok {
			return undefined
		}
	}
	return v
}

// eval evaluates x on one twin document.
func eval(x expr, doc map[string]any) any {
	switch n := x.(type) {
	case *literal:
		return n.value
	case *path:
		return lookup(doc, n.segs)
	case *unary:
		v := eval(n.x, doc)
		switch n.op {
		case "NOT":
			return not(v)
		case "-":
			return arithmetic("-", json.Number("0"), v)
		}
		if kindOf(v) != kNumber {
			return undefined
		}
		return v
	case *binary:
		switch n.op {
		case "AND":
			l := eval(n.l, doc)
			if l == false {
				return false
			}
			return and(l, eval(n.r, doc))
		case "OR":
			l := eval(n.l, doc)
			if l == true {
				return true
			}
			return or(l, eval(n.r, doc))
		case "+", "-", "*", "/", "%":
			return arithmetic(n.op, eval(n.l, doc), eval(n.r, doc))
		}
		return compareOp(n.op, eval(n.l, doc), eval(n.r, doc))
	case *inList:
		// x IN [a, b] is x = a OR x = b; x NIN [a, b] is NOT (x IN [a, b]),
		// that is x != a AND x != b.
		v := eval(n.x, doc)
		var r any = false
		for _, e := range n.list {
			if r = or(r, compareOp("=", v, e.value)); r == true {
				break
			}
		}
		if n.not {
			return not(r)
		}
		return r
	case *call:
		return evalCall(n, doc)
	}
	return undefined
}

func evalCall(n *call, doc map[string]any) any {
	switch n.fn.name {
	case "IS_DEFINED":
		return kindOf(eval(n.args[0], doc)) != kUndefined
	case "STARTSWITH", "ENDSWITH":
		s, ok1 := eval(n.args[0], doc).(string)
		affix, ok2 := eval(n.args[1], doc).(string)
		if !ok1 || !ok2 {
			return undefined
		}
		if n.fn.name == "STARTSWITH" {
			return strings.HasPrefix(s, affix)
		}
		return strings.HasSuffix(s, affix)
	}
	return undefined // aggregates are computed over groups, not here
}

func finite(f float64) any {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return undefined
	}
	return formatNumber(f)
}

// orderAny orders primitives of any kinds for MIN and MAX: null, then
// booleans, numbers and strings, each kind in its own order.
func orderAny(a, b any) int {
	ka, kb := kindOf(a), kindOf(b)
	if ka != kb {
		if ka < kb {
			return -1
		}
		return 1
	}
	c, _ := compare(a, b)
	return c
}
