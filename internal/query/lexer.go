package query

import (
	"math"
	"math/big"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// tokenKind is the kind of a token.
type tokenKind int

const (
	tEOF     tokenKind = iota
	tIdent             // a name or keyword: select, tags, deviceId, is_defined
	tEscaped           // a [[key]]: text holds the key
	tString            // a quoted string: text holds the value
	tNumber            // a number: num holds the value
	tPunct             // an operator or punctuation: text holds it, "<>" as "!="
)

// token is one lexical token.
type token struct {
	kind tokenKind
	text string  // see tokenKind
	num  float64 // tNumber only
	src  string  // the token as written, for messages
	pos  pos
}

// describe returns the token for an error message: 'text' or "the end of
// the query".
func (t token) describe() string {
	s := t.src
	if utf8.RuneCountInString(s) > 24 {
		r := []rune(s)
		s = string(r[:21]) + "..."
	}
	switch t.kind {
	case tEOF:
		return "the end of the query"
	case tString:
		return "the string " + s
	case tNumber:
		return "the number " + s
	}
	return "'" + s + "'"
}

// isKeyword reports whether t is the bare word kw (lower case), in any case.
func (t token) isKeyword(kw string) bool {
	return t.kind == tIdent && strings.EqualFold(t.text, kw)
}

// isPunct reports whether t is the operator or punctuation p.
func (t token) isPunct(p string) bool { return t.kind == tPunct && t.text == p }

// lexer splits a query into tokens on demand.
type lexer struct {
	src  string
	off  int // byte offset of the next character
	line int
	col  int
}

func newLexer(src string) *lexer { return &lexer{src: src, line: 1, col: 1} }

// peekRune returns the rune at byte offset off+ahead bytes, or -1 at the end.
func (l *lexer) runeAt(off int) (rune, int) {
	if off >= len(l.src) {
		return -1, 0
	}
	c := l.src[off]
	if c < utf8.RuneSelf {
		return rune(c), 1
	}
	return utf8.DecodeRuneInString(l.src[off:])
}

// advance consumes one rune and updates the position.
func (l *lexer) advance() rune {
	r, n := l.runeAt(l.off)
	if n == 0 {
		return -1
	}
	l.off += n
	if r == '\n' {
		l.line++
		l.col = 1
	} else {
		l.col++
	}
	return r
}

func (l *lexer) here() pos { return pos{l.line, l.col} }

// next returns the next token, or an *Error.
func (l *lexer) next() (token, *Error) {
	for {
		r, _ := l.runeAt(l.off)
		if r < 0 || !unicode.IsSpace(r) {
			break
		}
		l.advance()
	}
	start, p := l.off, l.here()
	r, _ := l.runeAt(l.off)
	tok := token{pos: p}
	switch {
	case r < 0:
		return token{kind: tEOF, pos: p}, nil
	case isIdentStart(r):
		for {
			r, _ := l.runeAt(l.off)
			if r < 0 || !isIdentPart(r) {
				break
			}
			l.advance()
		}
		tok.kind, tok.text = tIdent, l.src[start:l.off]
	case r >= '0' && r <= '9':
		if err := l.number(&tok); err != nil {
			return token{}, err
		}
	case r == '\'' || r == '"':
		if err := l.str(&tok); err != nil {
			return token{}, err
		}
	case r == '[' && strings.HasPrefix(l.src[l.off:], "[["):
		end := strings.Index(l.src[l.off+2:], "]]")
		if end < 0 {
			return token{}, errorf(p, "unterminated [[ escape: expected ]]")
		}
		key := l.src[l.off+2 : l.off+2+end]
		if key == "" {
			return token{}, errorf(p, "empty [[ ]] escape: expected a key inside")
		}
		for l.off < start+4+end {
			l.advance()
		}
		tok.kind, tok.text = tEscaped, key
	default:
		_, size := l.runeAt(l.off)
		l.advance()
		op := string(r)
		switch r {
		case '(', ')', '[', ']', ',', '.', '*', '+', '-', '/', '%', '=':
		case '!':
			if n, _ := l.runeAt(l.off); n != '=' {
				return token{}, errorf(p, "unexpected '!': did you mean '!='?")
			}
			l.advance()
			op = "!="
		case '<':
			switch n, _ := l.runeAt(l.off); n {
			case '=':
				l.advance()
				op = "<="
			case '>':
				l.advance()
				op = "!="
			}
		case '>':
			if n, _ := l.runeAt(l.off); n == '=' {
				l.advance()
				op = ">="
			}
		default:
			if r == utf8.RuneError && size == 1 {
				return token{}, errorf(p, "invalid UTF-8 in the query")
			}
			return token{}, errorf(p, "unexpected character %s", strconv.QuoteRune(r))
		}
		tok.kind, tok.text = tPunct, op
	}
	tok.src = l.src[start:l.off]
	return tok, nil
}

func isIdentStart(r rune) bool {
	return r == '_' || r == '$' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= utf8.RuneSelf && unicode.IsLetter(r)
}

func isIdentPart(r rune) bool {
	return isIdentStart(r) || r >= '0' && r <= '9' || r >= utf8.RuneSelf && unicode.IsDigit(r)
}

func isDigit(r rune) bool { return r >= '0' && r <= '9' }

func isHexDigit(r rune) bool {
	return isDigit(r) || r >= 'a' && r <= 'f' || r >= 'A' && r <= 'F'
}

// digits consumes runes while ok holds and returns how many it consumed.
func (l *lexer) digits(ok func(rune) bool) int {
	n := 0
	for {
		r, _ := l.runeAt(l.off)
		if r < 0 || !ok(r) {
			return n
		}
		l.advance()
		n++
	}
}

// number lexes a decimal (1, 1.5, 2e3, 1.5E-3) or hexadecimal (0x1F)
// number.
func (l *lexer) number(tok *token) *Error {
	start, p := l.off, l.here()
	var v float64
	if strings.HasPrefix(l.src[l.off:], "0x") || strings.HasPrefix(l.src[l.off:], "0X") {
		l.advance()
		l.advance()
		if l.digits(isHexDigit) == 0 {
			return errorf(l.here(), "expected a hexadecimal digit after %s", l.src[start:l.off])
		}
		b, _ := new(big.Int).SetString(l.src[start+2:l.off], 16)
		v, _ = new(big.Float).SetInt(b).Float64()
	} else {
		l.digits(isDigit)
		if r, _ := l.runeAt(l.off); r == '.' {
			l.advance()
			if l.digits(isDigit) == 0 {
				return errorf(l.here(), "expected a digit after the decimal point")
			}
		}
		if r, _ := l.runeAt(l.off); r == 'e' || r == 'E' {
			l.advance()
			if r, _ := l.runeAt(l.off); r == '+' || r == '-' {
				l.advance()
			}
			if l.digits(isDigit) == 0 {
				return errorf(l.here(), "expected a digit in the exponent")
			}
		}
		v, _ = strconv.ParseFloat(l.src[start:l.off], 64)
	}
	if r, _ := l.runeAt(l.off); r >= 0 && (isIdentPart(r) || r == '.') {
		return errorf(l.here(), "unexpected %s after the number %s", strconv.QuoteRune(r), l.src[start:l.off])
	}
	if math.IsInf(v, 0) {
		return errorf(p, "number %s is out of range", l.src[start:l.off])
	}
	tok.kind, tok.num = tNumber, v
	return nil
}

// str lexes a string in single or double quotes. Escapes: \' \" \\ \/ \b
// \f \n \r \t and \uXXXX (UTF-16, surrogate pairs combined).
func (l *lexer) str(tok *token) *Error {
	p := l.here()
	quote := l.advance()
	var b strings.Builder
	for {
		r, _ := l.runeAt(l.off)
		switch {
		case r < 0:
			return errorf(p, "unterminated string: expected a closing %c", quote)
		case r == quote:
			l.advance()
			tok.kind, tok.text = tString, b.String()
			return nil
		case r == '\\':
			esc := l.here()
			l.advance()
			e, _ := l.runeAt(l.off)
			switch e {
			case -1:
				return errorf(p, "unterminated string: expected a closing %c", quote)
			case '\'', '"', '\\', '/':
				b.WriteRune(e)
			case 'b':
				b.WriteByte('\b')
			case 'f':
				b.WriteByte('\f')
			case 'n':
				b.WriteByte('\n')
			case 'r':
				b.WriteByte('\r')
			case 't':
				b.WriteByte('\t')
			case 'u':
				l.advance()
				u, err := l.hex4(esc)
				if err != nil {
					return err
				}
				if u >= 0xD800 && u < 0xDC00 { // high surrogate: a low one must follow
					if !strings.HasPrefix(l.src[l.off:], `\u`) {
						return errorf(esc, "invalid escape: \\u%04X must be followed by a low surrogate \\uDC00-\\uDFFF", u)
					}
					l.advance()
					l.advance()
					lo, err := l.hex4(esc)
					if err != nil {
						return err
					}
					if lo < 0xDC00 || lo > 0xDFFF {
						return errorf(esc, "invalid escape: \\u%04X must be followed by a low surrogate \\uDC00-\\uDFFF", u)
					}
					u = 0x10000 + (u-0xD800)<<10 + (lo - 0xDC00)
				} else if u >= 0xDC00 && u <= 0xDFFF {
					return errorf(esc, "invalid escape: \\u%04X is a lone low surrogate", u)
				}
				b.WriteRune(u)
				continue
			default:
				if e == utf8.RuneError {
					return errorf(esc, "invalid escape in string: expected one of \\' \\\" \\\\ \\uXXXX")
				}
				return errorf(esc, "invalid escape '\\%c' in string: expected one of \\' \\\" \\\\ \\uXXXX", e)
			}
			l.advance()
		default:
			r, n := l.runeAt(l.off)
			if r == utf8.RuneError && n == 1 {
				return errorf(l.here(), "invalid UTF-8 in the query")
			}
			b.WriteString(l.src[l.off : l.off+n])
			l.advance()
		}
	}
}

// hex4 reads the four hex digits of a \u escape that started at esc.
func (l *lexer) hex4(esc pos) (rune, *Error) {
	var u rune
	for range 4 {
		r, _ := l.runeAt(l.off)
		if r < 0 || !isHexDigit(r) {
			return 0, errorf(esc, "invalid escape: \\u needs four hexadecimal digits")
		}
		l.advance()
		d, _ := strconv.ParseUint(string(r), 16, 8)
		u = u<<4 | rune(d)
	}
	return u, nil
}
