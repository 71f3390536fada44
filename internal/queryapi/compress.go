package queryapi

import (
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/klauspost/compress/gzip"
)

// compressMin is the size from which an answer is sent gzipped to a
// client that accepts it, as kube-apiserver sends its own responses
// (level 1, from 128 KiB): a part of a whole fleet's answer is up to
// --query-api-max-response-bytes (32 MiB) of JSON, which kube-apiserver's
// proxy would otherwise carry byte for byte; a small answer gains nothing.
const compressMin = 128 << 10

// gzipWriters are reused: a writer holds about 400 KiB of state. At
// most --query-api-max-concurrent-queries are in use at once.
var gzipWriters = sync.Pool{New: func() any {
	w, _ := gzip.NewWriterLevel(io.Discard, gzip.BestSpeed)
	return w
}}

// writeAnswer writes a query's answer, gzipped when it is large and the
// request accepts gzip (client-go asks for it unless told not to, and
// kube-apiserver's proxy passes the header and the encoding through).
func writeAnswer(w http.ResponseWriter, r *http.Request, code int, b []byte) int {
	if len(b) < compressMin || !acceptsGzip(r.Header.Values("Accept-Encoding")) {
		return writeJSON(w, code, b)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Encoding", "gzip")
	w.Header().Add("Vary", "Accept-Encoding")
	w.WriteHeader(code)
	gz := gzipWriters.Get().(*gzip.Writer)
	gz.Reset(w)
	_, _ = gz.Write(b)
	_ = gz.Close()
	gz.Reset(io.Discard) // not to keep w
	gzipWriters.Put(gz)
	return code
}

// acceptsGzip reports whether Accept-Encoding values allow gzip: a gzip
// (or *) coding with a quality above 0 (RFC 9110, section 12.5.3).
func acceptsGzip(values []string) bool {
	for _, v := range values {
		for c := range strings.SplitSeq(v, ",") {
			name, params, _ := strings.Cut(c, ";")
			name = strings.ToLower(strings.TrimSpace(name))
			if name != "gzip" && name != "x-gzip" && name != "*" {
				continue
			}
			q := 1.0
			for p := range strings.SplitSeq(params, ";") {
				k, val, ok := strings.Cut(strings.TrimSpace(p), "=")
				if ok && strings.EqualFold(strings.TrimSpace(k), "q") {
					if f, err := strconv.ParseFloat(strings.TrimSpace(val), 64); err == nil {
						q = f
					}
				}
			}
			if q > 0 {
				return true
			}
		}
	}
	return false
}
