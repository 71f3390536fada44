package twin

import (
	"encoding/json"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// parseObject decodes data, which must be valid JSON (json.Valid) whose
// top-level value is an object, into the Doc encoding/json's Decoder with
// UseNumber gives. It exists because that Decoder costs about a kilobyte
// of buffers per call, and a restart decodes several documents per twin;
// FuzzParseObject checks that both agree.
func parseObject(data []byte) Doc {
	p := parser{data: data}
	p.space()
	return p.object()
}

// parser reads valid JSON: it does no syntax checking of its own.
type parser struct {
	data []byte
	i    int
}

func (p *parser) space() {
	for p.i < len(p.data) {
		switch p.data[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

func (p *parser) object() Doc {
	d := Doc{}
	p.i++ // {
	p.space()
	if p.data[p.i] == '}' {
		p.i++
		return d
	}
	for {
		p.space()
		k := p.string()
		p.space()
		p.i++ // :
		p.space()
		d[k] = p.value()
		p.space()
		c := p.data[p.i]
		p.i++
		if c == '}' {
			return d
		}
	}
}

func (p *parser) array() []any {
	a := []any{}
	p.i++ // [
	p.space()
	if p.data[p.i] == ']' {
		p.i++
		return a
	}
	for {
		p.space()
		a = append(a, p.value())
		p.space()
		c := p.data[p.i]
		p.i++
		if c == ']' {
			return a
		}
	}
}

func (p *parser) value() any {
	switch c := p.data[p.i]; c {
	case '{':
		return p.object()
	case '[':
		return p.array()
	case '"':
		return p.string()
	case 't':
		p.i += len("true")
		return true
	case 'f':
		p.i += len("false")
		return false
	case 'n':
		p.i += len("null")
		return nil
	}
	start := p.i
	for p.i < len(p.data) && numberByte(p.data[p.i]) {
		p.i++
	}
	return json.Number(p.data[start:p.i])
}

func numberByte(c byte) bool {
	return c >= '0' && c <= '9' || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E'
}

// string reads a string literal as encoding/json unquotes it: invalid
// UTF-8 and unpaired surrogates become U+FFFD.
func (p *parser) string() string {
	p.i++ // "
	start := p.i
	for p.i < len(p.data) {
		c := p.data[p.i]
		if c == '"' {
			s := string(p.data[start:p.i])
			p.i++
			return s
		}
		if c == '\\' {
			break
		}
		if c < utf8.RuneSelf {
			p.i++
			continue
		}
		r, size := utf8.DecodeRune(p.data[p.i:])
		if r == utf8.RuneError && size == 1 {
			break
		}
		p.i += size
	}
	b := make([]byte, p.i-start, p.i-start+16)
	copy(b, p.data[start:p.i])
	for {
		c := p.data[p.i]
		switch {
		case c == '"':
			p.i++
			return string(b)
		case c == '\\':
			switch e := p.data[p.i+1]; e {
			case 'b':
				b = append(b, '\b')
			case 'f':
				b = append(b, '\f')
			case 'n':
				b = append(b, '\n')
			case 'r':
				b = append(b, '\r')
			case 't':
				b = append(b, '\t')
			case 'u':
				r := hex4(p.data[p.i+2:])
				p.i += 6
				if utf16.IsSurrogate(r) {
					if p.i+6 <= len(p.data) && p.data[p.i] == '\\' && p.data[p.i+1] == 'u' {
						if dec := utf16.DecodeRune(r, hex4(p.data[p.i+2:])); dec != unicode.ReplacementChar {
							p.i += 6
							b = utf8.AppendRune(b, dec)
							continue
						}
					}
					r = unicode.ReplacementChar
				}
				b = utf8.AppendRune(b, r)
				continue
			default: // '"', '\\', '/'
				b = append(b, e)
			}
			p.i += 2
		case c < utf8.RuneSelf:
			b = append(b, c)
			p.i++
		default:
			r, size := utf8.DecodeRune(p.data[p.i:])
			b = utf8.AppendRune(b, r)
			p.i += size
		}
	}
}

// hex4 reads the four hex digits of a \u escape.
func hex4(s []byte) rune {
	var r rune
	for _, c := range s[:4] {
		switch {
		case c >= '0' && c <= '9':
			c -= '0'
		case c >= 'a' && c <= 'f':
			c = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			c = c - 'A' + 10
		default:
			return -1
		}
		r = r*16 + rune(c)
	}
	return r
}
