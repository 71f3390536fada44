// Package mqttwire encodes MQTT 3.1.1 packets byte by byte, for tests that
// speak raw MQTT to a broker (what a client library would never send, or
// devices that cost the test no goroutine).
package mqttwire

import "encoding/binary"

// Packet frames body with its fixed header: the first byte, then the
// remaining length.
func Packet(first byte, body []byte) []byte {
	b := append([]byte{first}, RemainingLength(len(body))...)
	return append(b, body...)
}

// RemainingLength encodes n as MQTT's variable-length integer.
func RemainingLength(n int) []byte {
	var b []byte
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			return b
		}
	}
}

// AppendString appends an MQTT UTF-8 string: its length, then its bytes.
func AppendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}
