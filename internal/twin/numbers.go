package twin

import (
	"encoding/json"
	"math"
	"math/big"
	"strconv"
	"strings"
)

// number is a JSON number literal split into its parts.
type number struct {
	neg  bool
	intg string // integer digits
	frac string // fraction digits, without the dot
	exp  string // exponent with optional sign, without the 'e'
}

// parseNumber splits s if it is a JSON number literal (RFC 8259 grammar).
func parseNumber(s string) (number, bool) {
	var n number
	i := 0
	if i < len(s) && s[i] == '-' {
		n.neg = true
		i++
	}
	start := i
	switch {
	case i < len(s) && s[i] == '0':
		i++
	case i < len(s) && s[i] >= '1' && s[i] <= '9':
		for i < len(s) && isDigit(s[i]) {
			i++
		}
	default:
		return n, false
	}
	n.intg = s[start:i]
	if i < len(s) && s[i] == '.' {
		i++
		start = i
		for i < len(s) && isDigit(s[i]) {
			i++
		}
		if i == start {
			return n, false
		}
		n.frac = s[start:i]
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		start = i
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		digits := i
		for i < len(s) && isDigit(s[i]) {
			i++
		}
		if i == digits {
			return n, false
		}
		n.exp = s[start:i]
	}
	return n, i == len(s)
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// isInteger reports whether the literal has neither fraction nor exponent.
func (n number) isInteger() bool { return n.frac == "" && n.exp == "" }

// canonical returns a form of the number that is equal for equal values:
// "0", or sign, significant digits without leading or trailing zeros, "e" and
// the decimal exponent of the last digit. Huge exponents are handled exactly.
func (n number) canonical() string {
	mant := strings.TrimLeft(n.intg+n.frac, "0")
	if mant == "" {
		return "0"
	}
	trimmed := strings.TrimRight(mant, "0")
	shift := int64(len(mant)-len(trimmed)) - int64(len(n.frac))
	expLit := strings.TrimPrefix(n.exp, "+")
	var exp string
	if e, err := strconv.ParseInt(expLit, 10, 64); n.exp == "" || err == nil && e > math.MinInt64/2 && e < math.MaxInt64/2 {
		exp = strconv.FormatInt(e+shift, 10) // e is 0 without an exponent
	} else {
		b, _ := new(big.Int).SetString(expLit, 10)
		exp = b.Add(b, big.NewInt(shift)).String()
	}
	sign := ""
	if n.neg {
		sign = "-"
	}
	return sign + trimmed + "e" + exp
}

// numberLiteral returns the JSON literal of a numeric Go value: json.Number
// (if it is a valid literal), floats (as encoding/json writes them; NaN and
// infinities have none) and integer types. ok is false for anything else.
func numberLiteral(v any) (lit string, ok bool) {
	switch x := v.(type) {
	case json.Number:
		if _, ok := parseNumber(string(x)); ok {
			return string(x), true
		}
		return "", false
	case float64:
		return floatLiteral(x, 64)
	case float32:
		return floatLiteral(float64(x), 32)
	case int:
		return strconv.FormatInt(int64(x), 10), true
	case int8:
		return strconv.FormatInt(int64(x), 10), true
	case int16:
		return strconv.FormatInt(int64(x), 10), true
	case int32:
		return strconv.FormatInt(int64(x), 10), true
	case int64:
		return strconv.FormatInt(x, 10), true
	case uint:
		return strconv.FormatUint(uint64(x), 10), true
	case uint8:
		return strconv.FormatUint(uint64(x), 10), true
	case uint16:
		return strconv.FormatUint(uint64(x), 10), true
	case uint32:
		return strconv.FormatUint(uint64(x), 10), true
	case uint64:
		return strconv.FormatUint(x, 10), true
	case uintptr:
		return strconv.FormatUint(uint64(x), 10), true
	}
	return "", false
}

// isNumber reports whether v is one of the numeric types numberLiteral
// knows, valid or not.
func isNumber(v any) bool {
	switch v.(type) {
	case json.Number, float64, float32, int, int8, int16, int32, int64,
		uint, uint8, uint16, uint32, uint64, uintptr:
		return true
	}
	return false
}

// floatLiteral formats f the way encoding/json does.
func floatLiteral(f float64, bits int) (string, bool) {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return "", false
	}
	return string(appendFloat(nil, f, bits)), true
}

// appendFloat appends finite f as encoding/json writes it.
func appendFloat(b []byte, f float64, bits int) []byte {
	format := byte('f')
	if abs := math.Abs(f); abs != 0 {
		if bits == 64 && (abs < 1e-6 || abs >= 1e21) || bits == 32 && (float32(abs) < 1e-6 || float32(abs) >= 1e21) {
			format = 'e'
		}
	}
	b = strconv.AppendFloat(b, f, format, -1, bits)
	if format == 'e' {
		// Clean up e-09 to e-9, as encoding/json does.
		if n := len(b); n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			b[n-2] = b[n-1]
			b = b[:n-1]
		}
	}
	return b
}

// integerRule checks the ±2^52 rule for a number literal: a literal without
// fraction or exponent, or one whose value is integral, must lie within
// ±MaxInt. It returns the broken rule, or "".
func integerRule(lit string) string {
	const outOfRange = "integer out of range ±2^52"
	n, ok := parseNumber(lit)
	if !ok {
		return "invalid number " + strconv.Quote(lit)
	}
	if n.isInteger() {
		// JSON integers have no leading zeros, so the digit count bounds
		// the value: 2^52 has 16 digits.
		if len(n.intg) > 16 {
			return outOfRange
		}
		v, _ := strconv.ParseUint(n.intg, 10, 64)
		if v > MaxInt {
			return outOfRange
		}
		return ""
	}
	f, err := strconv.ParseFloat(lit, 64)
	if err != nil && math.IsInf(f, 0) {
		return outOfRange
	}
	if f == math.Trunc(f) && math.Abs(f) > MaxInt {
		return outOfRange
	}
	return ""
}
