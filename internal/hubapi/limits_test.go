package hubapi_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/internal/hubapi"
)

// hangingReader passes Get and List to its Reader until hang is called;
// from then on they block until release (or their context ends) and then
// fail with failErr, or pass through when failErr is nil.
type hangingReader struct {
	client.Reader
	mu      sync.Mutex
	hanging bool
	release chan struct{}
	failErr error
	// entered receives a value each time a call starts to hang.
	entered chan struct{}
	gets    atomic.Int32
}

func newHangingReader(r client.Reader) *hangingReader {
	return &hangingReader{Reader: r, release: make(chan struct{}), entered: make(chan struct{}, 100)}
}

func (r *hangingReader) hang(failErr error) {
	r.mu.Lock()
	r.hanging, r.failErr = true, failErr
	r.mu.Unlock()
}

// wait blocks a call while the reader hangs; it returns the call's error,
// or nil to go on to the real reader.
func (r *hangingReader) wait(ctx context.Context) error {
	r.mu.Lock()
	hanging, failErr := r.hanging, r.failErr
	r.mu.Unlock()
	if !hanging {
		return nil
	}
	r.entered <- struct{}{}
	select {
	case <-r.release:
		return failErr
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (r *hangingReader) Get(ctx context.Context, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
	r.gets.Add(1)
	if err := r.wait(ctx); err != nil {
		return err
	}
	return r.Reader.Get(ctx, key, obj, opts...)
}

func (r *hangingReader) List(ctx context.Context, list client.ObjectList, opts ...client.ListOption) error {
	if err := r.wait(ctx); err != nil {
		return err
	}
	return r.Reader.List(ctx, list, opts...)
}

// serve sends a request straight to h, with an iothubowner token unless
// hdr sets Authorization.
func serve(t testing.TB, h http.Handler, method, path string, hdr map[string]string, body string) response {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req := httptest.NewRequest(method, "https://"+hubHost+path+"?api-version=2021-04-12", rd)
	req.Header.Set("Authorization", ownerToken(t))
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return response{status: rec.Code, header: rec.Header(), body: rec.Body.Bytes()}
}

// fakeClock is a clock tests move by hand.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Now().UnixNano())
	return c
}

func (c *fakeClock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) advance(d time.Duration) { c.ns.Add(int64(d)) }

// TestPoliciesServedWhileSecretReadHangs: when the policies are due for a
// re-read and the API server does not answer, requests are served with the
// last good copy at once; they do not queue behind the read, and only one
// read runs.
func TestPoliciesServedWhileSecretReadHangs(t *testing.T) {
	rd := newHangingReader(mgr.GetAPIReader())
	clock := newFakeClock()
	h, err := newHandler(hubapi.Options{APIReader: rd, Now: clock.now, PolicyTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	serve(t, h, http.MethodGet, "/devices", nil, "").expect(t, http.StatusOK) // the good copy
	if n := rd.gets.Load(); n != 1 {
		t.Fatalf("%d reads of the policies for the first request, want 1", n)
	}

	clock.advance(2 * time.Minute)
	rd.hang(apierrors.NewServiceUnavailable("the API server is down"))
	t.Cleanup(func() { close(rd.release) })
	const n = 10
	statuses := make(chan int, n)
	for range n {
		go func() { statuses <- serve(t, h, http.MethodGet, "/devices", nil, "").status }()
	}
	timeout := time.After(20 * time.Second)
	for i := range n {
		select {
		case s := <-statuses:
			if s != http.StatusOK {
				t.Errorf("request %d: status %d, want 200 from the cached policies", i, s)
			}
		case <-timeout:
			t.Fatalf("only %d of %d requests finished while the policies Secret read hung: they wait for it", i, n)
		}
	}
	// The refresh runs in the background: wait until it has started.
	select {
	case <-rd.entered:
	case <-time.After(20 * time.Second):
		t.Fatal("no refresh of the policies started")
	}
	if got := rd.gets.Load(); got != 2 {
		t.Errorf("%d reads of the policies Secret, want 2 (one at the start, one refresh for all %d requests)", got, n)
	}
}

// TestPolicyReadTimeout: without a copy, requests wait for one read (not one
// each), which ends at PolicyReadTimeout with 503; a failed read is not
// repeated for every request.
func TestPolicyReadTimeout(t *testing.T) {
	rd := newHangingReader(mgr.GetAPIReader())
	rd.hang(nil)
	t.Cleanup(func() { close(rd.release) })
	clock := newFakeClock()
	h, err := newHandler(hubapi.Options{APIReader: rd, Now: clock.now, PolicyReadTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	const n = 5
	replies := make(chan response, n)
	start := time.Now()
	for range n {
		go func() { replies <- serve(t, h, http.MethodGet, "/devices", nil, "") }()
	}
	for range n {
		r := <-replies
		r.expectError(t, http.StatusServiceUnavailable, hubapi.CodeServiceUnavailable,
			"reading the shared access policies timed out waiting for the Kubernetes API server: retry later")
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("the requests took %v: the read is not bounded by PolicyReadTimeout", d)
	}
	if got := rd.gets.Load(); got != 1 {
		t.Errorf("%d reads of the policies Secret for %d requests, want 1", got, n)
	}
	// Within a second of the failure, no new read: the error at once.
	serve(t, h, http.MethodGet, "/devices", nil, "").expect(t, http.StatusServiceUnavailable)
	if got := rd.gets.Load(); got != 1 {
		t.Errorf("%d reads of the policies Secret after a failure, want still 1", got)
	}
}

// TestQueryConcurrencyLimit: with MaxConcurrentQueries (8) queries running,
// the next one gets 429 ThrottlingException at once; once they finish,
// queries run again.
func TestQueryConcurrencyLimit(t *testing.T) {
	reset(t)
	newTwin(t, devNS, "limit-1", "limit-1", "", "")
	rd := newHangingReader(mgr.GetClient())
	h, err := newHandler(hubapi.Options{Reader: rd})
	if err != nil {
		t.Fatal(err)
	}
	const q = `{"query":"SELECT * FROM devices"}`
	throttledBefore := counter(t, "kubetwin_service_queries_throttled_total", nil)
	rd.hang(nil) // List blocks until release, then lists
	var wg sync.WaitGroup
	statuses := make(chan int, hubapi.DefaultMaxConcurrentQueries)
	for range hubapi.DefaultMaxConcurrentQueries {
		wg.Go(func() { statuses <- serve(t, h, http.MethodPost, "/devices/query", nil, q).status })
	}
	released := false
	release := func() {
		if !released {
			released = true
			close(rd.release)
		}
	}
	t.Cleanup(func() { release(); wg.Wait() })
	for i := range hubapi.DefaultMaxConcurrentQueries {
		select {
		case <-rd.entered:
		case <-time.After(20 * time.Second):
			t.Fatalf("only %d queries started", i)
		}
	}
	if got := metric(t, "kubetwin_service_queries_in_flight", nil).GetGauge().GetValue(); got != hubapi.DefaultMaxConcurrentQueries {
		t.Errorf("queries_in_flight = %v, want %d", got, hubapi.DefaultMaxConcurrentQueries)
	}

	ninth := make(chan response, 1)
	go func() { ninth <- serve(t, h, http.MethodPost, "/devices/query", nil, q) }()
	select {
	case r := <-ninth:
		r.expectError(t, http.StatusTooManyRequests, hubapi.CodeThrottlingException,
			"too many queries: this server runs at most 8 at once%3B retry later")
		if ra := r.header.Get("Retry-After"); ra != "1" {
			t.Errorf("Retry-After %q, want 1", ra)
		}
	case <-rd.entered:
		t.Fatal("a 9th concurrent query was run, not refused")
	}
	if got := counter(t, "kubetwin_service_queries_throttled_total", nil); got != throttledBefore+1 {
		t.Errorf("queries_throttled_total went from %v to %v, want +1", throttledBefore, got)
	}

	release()
	wg.Wait()
	close(statuses)
	for s := range statuses {
		if s != http.StatusOK {
			t.Errorf("a held query ended with %d, want 200", s)
		}
	}
	if got := metric(t, "kubetwin_service_queries_in_flight", nil).GetGauge().GetValue(); got != 0 {
		t.Errorf("queries_in_flight = %v after the queries, want 0", got)
	}
	serve(t, h, http.MethodPost, "/devices/query", nil, q).expect(t, http.StatusOK)
}

// TestQueryPageByteLimit: a page ends early, with a continuation token,
// rather than grow past MaxQueryPageBytes, and following the tokens still
// returns every row once.
func TestQueryPageByteLimit(t *testing.T) {
	reset(t)
	pad := strings.Repeat("x", 400)
	for i := range 7 {
		newTwin(t, devNS, fmt.Sprintf("bytes-%d", i), fmt.Sprintf("bytes-%d", i), `{"fleet":"bytes","pad":"`+pad+`"}`, "")
	}
	const limit = 1500 // two or three twins of about 600 bytes
	h, err := newHandler(hubapi.Options{MaxQueryPageBytes: limit})
	if err != nil {
		t.Fatal(err)
	}
	cutBefore := counter(t, "kubetwin_service_query_pages_cut_total", nil)
	for _, tc := range []struct{ query, key string }{
		{"SELECT * FROM devices WHERE tags.fleet = 'bytes'", "deviceId"},
		{"SELECT TOP 100 * FROM devices WHERE tags.fleet = 'bytes'", "deviceId"},
		{"SELECT deviceId, tags FROM devices WHERE tags.fleet = 'bytes'", "deviceId"},
	} {
		body, _ := json.Marshal(map[string]string{"query": tc.query})
		var got []string
		tok := ""
		for pages := 0; ; pages++ {
			if pages > 7 {
				t.Fatalf("%s: more pages than twins", tc.query)
			}
			hdr := map[string]string{"x-ms-max-item-count": "100"}
			if tok != "" {
				hdr["x-ms-continuation"] = tok
			}
			r := serve(t, h, http.MethodPost, "/devices/query", hdr, string(body)).expect(t, http.StatusOK)
			items := r.array(t)
			if len(items) > 1 && len(r.body) > limit+1 { // +1: the reply's newline
				t.Errorf("%s: page of %d items is %d bytes, over the %d allowed", tc.query, len(items), len(r.body), limit)
			}
			for _, it := range items {
				got = append(got, fmt.Sprint(it[tc.key]))
			}
			if tok = r.header.Get("x-ms-continuation"); tok == "" {
				break
			}
			if len(items) == 0 {
				t.Fatalf("%s: an empty page with a continuation token", tc.query)
			}
		}
		want := "bytes-0 bytes-1 bytes-2 bytes-3 bytes-4 bytes-5 bytes-6"
		if strings.Join(got, " ") != want {
			t.Errorf("%s: rows %v, want %s", tc.query, got, want)
		}
	}
	if got := counter(t, "kubetwin_service_query_pages_cut_total", nil); got < cutBefore+3 {
		t.Errorf("query_pages_cut_total went from %v to %v, want at least 3 more", cutBefore, got)
	}
	// A twin larger than the limit comes alone on its page.
	h, err = newHandler(hubapi.Options{MaxQueryPageBytes: 100})
	if err != nil {
		t.Fatal(err)
	}
	r := serve(t, h, http.MethodPost, "/devices/query", map[string]string{"x-ms-max-item-count": "5"},
		`{"query":"SELECT * FROM devices WHERE tags.fleet = 'bytes'"}`).expect(t, http.StatusOK)
	if items := r.array(t); len(items) != 1 || r.header.Get("x-ms-continuation") == "" {
		t.Errorf("page of %d items (continuation %q), want 1 and a continuation", len(items), r.header.Get("x-ms-continuation"))
	}
	if !bytes.HasPrefix(r.body, []byte(`[{"`)) {
		t.Errorf("body %.40s", r.body)
	}
}
