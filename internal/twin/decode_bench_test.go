package twin

import "testing"

// BenchmarkDecode measures what decoding a small twin document allocates
// (a restart decodes several per twin).
func BenchmarkDecode(b *testing.B) {
	raw := []byte(`{"location":{"plant":"P3","line":17},"model":"m1"}`)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decode(raw); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeWithDecoder is BenchmarkDecode through encoding/json's
// Decoder, as Decode did before parseObject.
func BenchmarkDecodeWithDecoder(b *testing.B) {
	raw := []byte(`{"location":{"plant":"P3","line":17},"model":"m1"}`)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := decodeWithDecoder(raw); err != nil {
			b.Fatal(err)
		}
	}
}
