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

// BenchmarkParseSection measures decoding and validating a small valid
// section, as the reconciler does with spec.desired.
func BenchmarkParseSection(b *testing.B) {
	raw := []byte(`{"telemetry":{"interval":12},"led":true,"name":"x"}`)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseSection(Desired, "spec.desired", raw); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkValidateDocument measures validating a decoded valid section.
func BenchmarkValidateDocument(b *testing.B) {
	d, err := Decode([]byte(`{"telemetry":{"interval":12},"led":true,"name":"x","n":1.5}`))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := ValidateDocument(Desired, "spec.desired", d); err != nil {
			b.Fatal(err)
		}
	}
}
