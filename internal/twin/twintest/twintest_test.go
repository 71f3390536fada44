package twintest

import (
	"testing"

	"github.com/kubetwin/kubetwin/internal/twin"
)

// Every case gives its message from ValidateDocument and ValidatePatch.
func TestBadContentMessages(t *testing.T) {
	for _, b := range BadContent() {
		t.Run(b.Name, func(t *testing.T) {
			d, err := twin.Decode([]byte(b.JSON))
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			for _, s := range []struct {
				path string
				err  error
			}{
				{"spec.desired", twin.ValidateDocument(twin.Desired, "spec.desired", d)},
				{"spec.tags", twin.ValidateDocument(twin.Tags, "spec.tags", d)},
				{"reported", twin.ValidatePatch(twin.Reported, "reported", d)},
			} {
				if s.err == nil || s.err.Error() != b.Message(s.path) {
					t.Errorf("%s: error %v, want %q", s.path, s.err, b.Message(s.path))
				}
			}
		})
	}
}

func TestHelpers(t *testing.T) {
	for _, c := range []struct{ n, size int }{{2, 8192}, {3, 8193}, {8, 32768}, {9, 32769}} {
		d, err := twin.Decode([]byte(Sized(c.n, c.size)))
		if err != nil {
			t.Fatal(err)
		}
		if got := twin.Size(d); got != c.size {
			t.Errorf("Sized(%d, %d) has size %d", c.n, c.size, got)
		}
	}
	j, path := Nested(10, "true")
	d, err := twin.Decode([]byte(j))
	if err != nil {
		t.Fatal(err)
	}
	if err := twin.ValidateDocument(twin.Desired, "", d); err != nil {
		t.Errorf("10 levels: %v", err)
	}
	if path != ".k1.k2.k3.k4.k5.k6.k7.k8.k9.k10" {
		t.Errorf("path = %q", path)
	}
}
