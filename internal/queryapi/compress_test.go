package queryapi

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/kubetwin/kubetwin/internal/queryapi/wire"
	"github.com/kubetwin/kubetwin/internal/twinscan/twinscantest"
)

func TestAcceptsGzip(t *testing.T) {
	for _, c := range []struct {
		values []string
		want   bool
	}{
		{nil, false},
		{[]string{"gzip"}, true},
		{[]string{"br, GZip;q=0.5"}, true},
		{[]string{"identity", "deflate, gzip"}, true},
		{[]string{"*"}, true},
		{[]string{"x-gzip"}, true},
		{[]string{"gzip;q=0"}, false},
		{[]string{"gzip; q=0.000"}, false},
		{[]string{"identity"}, false},
		{[]string{"br, deflate"}, false},
		{[]string{"gzipx"}, false},
	} {
		if got := acceptsGzip(c.values); got != c.want {
			t.Errorf("acceptsGzip(%q) = %v, want %v", c.values, got, c.want)
		}
	}
}

// TestAnswerGzipped: a large answer is gzipped for a client that accepts
// it (what client-go's transport asks for and inflates), and decodes to
// the answer sent to one that does not; a small one, and errors, are sent
// as they are.
func TestAnswerGzipped(t *testing.T) {
	h := testHandler(&twinReader{twins: twinscantest.Fleet(200)}, Options{}, nil)
	post := func(q, enc string) *httptest.ResponseRecorder {
		body, _ := json.Marshal(wire.TwinQuery{Spec: wire.TwinQuerySpec{Query: q}})
		r := httptest.NewRequest(http.MethodPost, "/apis/"+wire.GroupVersion+"/namespaces/scale/"+wire.Resource, bytes.NewReader(body))
		if enc != "" {
			r.Header.Set("Accept-Encoding", enc)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, r)
		return rec
	}
	plain := post("SELECT * FROM devices", "")
	if plain.Code != http.StatusCreated || plain.Header().Get("Content-Encoding") != "" || plain.Body.Len() < compressMin {
		t.Fatalf("without Accept-Encoding: %d %q, %d bytes", plain.Code, plain.Header().Get("Content-Encoding"), plain.Body.Len())
	}
	gz := post("SELECT * FROM devices", "gzip")
	if gz.Code != http.StatusCreated || gz.Header().Get("Content-Encoding") != "gzip" || gz.Header().Get("Content-Length") != "" {
		t.Fatalf("with gzip: %d, headers %v", gz.Code, gz.Header())
	}
	if gz.Body.Len()*4 > plain.Body.Len() {
		t.Errorf("gzipped %d bytes of %d", gz.Body.Len(), plain.Body.Len())
	}
	zr, err := gzip.NewReader(gz.Body)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, plain.Body.Bytes()) {
		t.Fatalf("the gzipped answer inflates to %d bytes that differ from the plain answer's %d", len(got), plain.Body.Len())
	}
	// Twice more: a writer from the pool is reset.
	for range 2 {
		again := post("SELECT * FROM devices", "gzip")
		zr, err := gzip.NewReader(again.Body)
		if err != nil {
			t.Fatal(err)
		}
		if b, err := io.ReadAll(zr); err != nil || !bytes.Equal(b, plain.Body.Bytes()) {
			t.Fatalf("again: %v, %d bytes", err, len(b))
		}
	}
	if small := post("SELECT TOP 1 deviceId FROM devices", "gzip"); small.Code != http.StatusCreated || small.Header().Get("Content-Encoding") != "" {
		t.Errorf("a small answer: %d %q", small.Code, small.Header().Get("Content-Encoding"))
	}
	if bad := post("SELECT FROM", "gzip"); bad.Code != http.StatusBadRequest || bad.Header().Get("Content-Encoding") != "" {
		t.Errorf("an error: %d %q", bad.Code, bad.Header().Get("Content-Encoding"))
	}
	if q0 := post("SELECT * FROM devices", "gzip;q=0"); q0.Header().Get("Content-Encoding") != "" || !bytes.Equal(q0.Body.Bytes(), plain.Body.Bytes()) {
		t.Errorf("gzip;q=0: %q", q0.Header().Get("Content-Encoding"))
	}
}
