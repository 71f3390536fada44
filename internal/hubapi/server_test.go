package hubapi_test

import (
	"context"
	"crypto/tls"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/kubetwin/kubetwin/internal/hubapi"
)

func TestRoutes(t *testing.T) {
	reset(t)
	newTwin(t, devNS, "routes-1", "routes-1", "", "")
	r := call(t, http.MethodGet, "/jobs", nil, nil)
	r.expectError(t, http.StatusNotFound, "NotFound", "there is no API at GET /jobs")
	r = call(t, http.MethodDelete, "/twins/routes-1", nil, nil)
	r.expectError(t, http.StatusMethodNotAllowed, "MethodNotAllowed", "DELETE is not supported on /twins/routes-1 (allowed: GET, PATCH, PUT)")
	if got := r.header.Get("Allow"); got != "GET, PATCH, PUT" {
		t.Errorf("Allow %q", got)
	}
	call(t, http.MethodPost, "/devices", nil, `[]`).expectError(t, http.StatusMethodNotAllowed, "MethodNotAllowed", "")
	call(t, http.MethodGet, "/twins/routes-1/modules/m", nil, nil).expectError(t, http.StatusNotFound, "NotFound", "")
	// Without api-version, and with another one: accepted.
	for _, v := range []string{"", "?api-version=2020-05-31-preview"} {
		req, _ := http.NewRequest(http.MethodGet, baseURL+"/twins/routes-1"+v, nil)
		req.Header.Set("Authorization", ownerToken(t))
		resp, err := httpc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("api-version %q: status %d", v, resp.StatusCode)
		}
	}
	// HTTP/1.1 only, although the client offers HTTP/2.
	if r := call(t, http.MethodGet, "/twins/routes-1", nil, nil).expect(t, http.StatusOK); r.proto != "HTTP/1.1" {
		t.Errorf("protocol %s, want HTTP/1.1", r.proto)
	}
	// Bodies are capped.
	big := `{"tags":{"a":"` + strings.Repeat("x", hubapi.DefaultMaxBodyBytes) + `"}}`
	call(t, http.MethodPatch, "/twins/routes-1", nil, big).
		expectError(t, http.StatusRequestEntityTooLarge, "MessageTooLarge", "the request body is larger than the 262144 bytes allowed")
}

func TestMetrics(t *testing.T) {
	reset(t)
	newTwin(t, devNS, "metrics-1", "metrics-1", "", "")
	before := counter(t, "kubetwin_service_requests_total", map[string]string{"operation": "twinGet", "code": "200"})
	beforeQueries := histogramCount(t, "kubetwin_query_duration_seconds", nil)
	call(t, http.MethodGet, "/twins/metrics-1", nil, nil).expect(t, http.StatusOK)
	call(t, http.MethodGet, "/twins/metrics-1", nil, nil).expect(t, http.StatusOK)
	call(t, http.MethodPost, "/devices/query", nil, `{"query":"SELECT * FROM devices"}`).expect(t, http.StatusOK)
	call(t, http.MethodGet, "/twins/metrics-1", map[string]string{"Authorization": ""}, nil).expect(t, http.StatusUnauthorized)
	if got := counter(t, "kubetwin_service_requests_total", map[string]string{"operation": "twinGet", "code": "200"}); got != before+2 {
		t.Errorf("requests_total{twinGet,200} went from %v to %v, want +2", before, got)
	}
	if got := counter(t, "kubetwin_service_requests_total", map[string]string{"operation": "twinGet", "code": "401"}); got < 1 {
		t.Errorf("requests_total{twinGet,401} = %v", got)
	}
	if got := histogramCount(t, "kubetwin_service_request_duration_seconds", map[string]string{"operation": "query"}); got < 1 {
		t.Errorf("request_duration_seconds{query} count %v", got)
	}
	if got := histogramCount(t, "kubetwin_query_duration_seconds", nil); got != beforeQueries+1 {
		t.Errorf("query_duration_seconds count went from %v to %v, want +1", beforeQueries, got)
	}
}

// metric returns the metric of the family name with the given labels.
func metric(t *testing.T, name string, labels map[string]string) *dto.Metric {
	t.Helper()
	families, err := metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	next:
		for _, m := range f.GetMetric() {
			for k, v := range labels {
				found := false
				for _, l := range m.GetLabel() {
					found = found || l.GetName() == k && l.GetValue() == v
				}
				if !found {
					continue next
				}
			}
			return m
		}
	}
	return nil
}

func counter(t *testing.T, name string, labels map[string]string) float64 {
	return metric(t, name, labels).GetCounter().GetValue()
}

func histogramCount(t *testing.T, name string, labels map[string]string) uint64 {
	return metric(t, name, labels).GetHistogram().GetSampleCount()
}

func TestServerLifecycle(t *testing.T) {
	h, err := newHandler(hubapi.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hubapi.NewServer(hubapi.ServerOptions{Addr: "127.0.0.1:0", Handler: h}); err == nil {
		t.Error("NewServer without TLS: want an error")
	}
	cfg, pool, err := selfSigned()
	if err != nil {
		t.Fatal(err)
	}
	srv, err := hubapi.NewServer(hubapi.ServerOptions{Addr: "127.0.0.1:0", TLSConfig: cfg, Handler: h})
	if err != nil {
		t.Fatal(err)
	}
	if srv.NeedLeaderElection() {
		t.Error("NeedLeaderElection = true: every replica should serve")
	}
	if srv.ReadyCheck(nil) == nil {
		t.Error("ready before Start")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Start(ctx) }()
	select {
	case <-srv.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("not ready")
	}
	if err := srv.ReadyCheck(nil); err != nil {
		t.Errorf("ReadyCheck after start: %v", err)
	}
	if !regexp.MustCompile(`^127\.0\.0\.1:[1-9][0-9]*$`).MatchString(srv.Addr()) {
		t.Errorf("Addr %q", srv.Addr())
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := c.Get("https://" + srv.Addr() + "/twins/x")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("status %d", resp.StatusCode)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Start returned %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Start did not return after the context ended")
	}
	if srv.ReadyCheck(nil) == nil {
		t.Error("ready after stop")
	}
}
