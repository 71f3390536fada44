package hubapi

import (
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/kubetwin/kubetwin/internal/query"
)

func TestTwinName(t *testing.T) {
	for id, want := range map[string]string{
		"mydevice":               "mydevice",
		"sensor.1-a":             "sensor.1-a",
		"MyDevice":               "mydevice-",
		"a+b#c?d%e":              "a-b-c-d-e-",
		"%%%":                    "device-",
		"-leading":               "leading-",
		strings.Repeat("a", 64):  strings.Repeat("a", 40) + "-",
		"x;y$z'(1)!*":            "x-y-z-1-",
		"UPPER_case:and.special": "upper-case-and-special-",
	} {
		got := TwinName(id)
		if want == id {
			if got != id {
				t.Errorf("TwinName(%q) = %q, want the id itself", id, got)
			}
			continue
		}
		if !strings.HasPrefix(got, want) || len(got) != len(want)+10 {
			t.Errorf("TwinName(%q) = %q, want %s<10 hex digits>", id, got, want)
		}
	}
	if TwinName("MyDevice") == TwinName("mYdEVICE") {
		t.Error("ids that differ in case share a name")
	}
}

func TestErrorBody(t *testing.T) {
	now := time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)
	b := newErrorBody(CodeDeviceNotFound, `device "a;b" is not registered`, "abc", now)
	if b.Message != `ErrorCode:DeviceNotFound;device "a%3Bb" is not registered` {
		t.Errorf("Message %q", b.Message)
	}
	if b.ExceptionMessage != "Tracking ID:abc-TimeStamp:05/06/2024 07:08:09" {
		t.Errorf("ExceptionMessage %q", b.ExceptionMessage)
	}
	if b := newErrorBody(CodeServerError, "", "x", now); b.Message != "ErrorCode:ServerError;ServerError" {
		t.Errorf("empty message: %q", b.Message)
	}
}

func TestContinuation(t *testing.T) {
	q, err := query.Parse("SELECT * FROM devices")
	if err != nil {
		t.Fatal(err)
	}
	same, _ := query.Parse("select *   from DEVICES")
	other, _ := query.Parse("SELECT deviceId FROM devices")
	hash := queryHash(q)
	if queryHash(same) != hash || queryHash(other) == hash {
		t.Error("queryHash does not follow the canonical query")
	}
	tok := (&continuation{V: continuationVersion, Query: hash, After: &twinKey{ID: "d;1", Namespace: "ns", Name: "n"}}).encode()
	if strings.ContainsAny(tok, "+/=;, ") {
		t.Errorf("token %q is not header-safe base64url", tok)
	}
	c, err := decodeContinuation(tok, hash, true, false)
	if err != nil || c.After == nil || c.After.ID != "d;1" {
		t.Errorf("decode: %+v, %v", c, err)
	}
	two, zero := 2, 0
	withTop := (&continuation{V: continuationVersion, Query: hash, After: &twinKey{ID: "d"}, Left: &two}).encode()
	if c, err := decodeContinuation(withTop, hash, true, true); err != nil || c.Left == nil || *c.Left != 2 {
		t.Errorf("decode with TOP: %+v, %v", c, err)
	}
	for _, bad := range []struct {
		tok          string
		perTwin, top bool
	}{
		{tok, false, false},
		{tok, true, true},      // TOP without what it still allows
		{withTop, true, false}, // what TOP allows, for a query without TOP
		{(&continuation{V: continuationVersion, Query: hash, After: &twinKey{ID: "d"}, Left: &zero}).encode(), true, true},
		{(&continuation{V: continuationVersion, Query: hash, Offset: 3, Groups: "g"}).encode(), true, false},
		{(&continuation{V: 1, Query: hash, Offset: 3}).encode(), false, false},
		{(&continuation{V: continuationVersion, Query: "other", Offset: 3, Groups: "g"}).encode(), false, false},
		{(&continuation{V: continuationVersion, Query: hash, Offset: 3, Groups: "g", Left: &two}).encode(), false, true},
		{(&continuation{V: continuationVersion, Query: hash, Offset: 3}).encode(), false, false},
		{"not base64!", false, false},
	} {
		if _, err := decodeContinuation(bad.tok, hash, bad.perTwin, bad.top); err == nil {
			t.Errorf("decodeContinuation(%q, perTwin %v, top %v): want an error", bad.tok, bad.perTwin, bad.top)
		}
	}
}

func TestPageSize(t *testing.T) {
	for v, want := range map[string]int{"": DefaultPageSize, "3": 3, " 7 ": 7, "5000": MaxPageSize, "99999999999999999999999": MaxPageSize,
		"0": -1, "-2": -1, "x": -1, "1.5": -1} {
		h := http.Header{}
		if v != "" {
			h.Set(HeaderMaxItemCount, v)
		}
		got, aerr := pageSize(h)
		if want < 0 {
			if aerr == nil || aerr.status != http.StatusBadRequest {
				t.Errorf("pageSize(%q) = %d, want a 400", v, got)
			}
			continue
		}
		if aerr != nil || got != want {
			t.Errorf("pageSize(%q) = %d, %v; want %d", v, got, aerr, want)
		}
	}
}

func TestParseRights(t *testing.T) {
	got, err := parseRights(" registryread, ServiceConnect,,RegistryRead ")
	if err != nil || len(got) != 2 || got[0] != RegistryRead || got[1] != ServiceConnect {
		t.Errorf("parseRights = %v, %v", got, err)
	}
	if _, err := parseRights("ServiceConnect,Root"); err == nil || !strings.Contains(err.Error(), `unknown right "Root"`) {
		t.Errorf("unknown right: %v", err)
	}
	ps := parsePolicies(map[string][]byte{
		"a.primaryKey": []byte("not base64"), "a.rights": []byte("ServiceConnect"),
		"b.primaryKey": []byte("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="), "b.secondaryKey": []byte("c2hvcnQ="),
		"c.rights":             []byte("ServiceConnect"),
		"my.policy.primaryKey": []byte("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="),
		"hostName":             []byte("h"),
	})
	for name, wantErr := range map[string]string{"a": "a.primaryKey: key is not base64", "b": "b.secondaryKey: key is 5 bytes long", "c": "c.primaryKey is missing", "my.policy": ""} {
		p := ps[name]
		switch {
		case p == nil:
			t.Errorf("policy %s missing", name)
		case wantErr == "" && p.err != nil:
			t.Errorf("policy %s: %v", name, p.err)
		case wantErr != "" && (p.err == nil || !strings.Contains(p.err.Error(), wantErr)):
			t.Errorf("policy %s: error %v, want %q", name, p.err, wantErr)
		}
	}
	if len(ps) != 4 {
		t.Errorf("%d policies", len(ps))
	}
}

func TestFromAPI(t *testing.T) {
	gr := schema.GroupResource{Group: "kubetwin.io", Resource: "devicetwins"}
	for _, tc := range []struct {
		err    error
		status int
		code   string
		retry  time.Duration
	}{
		{apierrors.NewTooManyRequests("slow down", 3), http.StatusTooManyRequests, CodeThrottlingException, 3 * time.Second},
		{apierrors.NewInvalid(schema.GroupKind{Group: "kubetwin.io", Kind: "DeviceTwin"}, "x", nil), http.StatusBadRequest, CodeArgumentInvalid, 0},
		{apierrors.NewServerTimeout(gr, "patch", 1), http.StatusServiceUnavailable, CodeServiceUnavailable, time.Second},
		{apierrors.NewForbidden(gr, "x", errors.New("no")), http.StatusInternalServerError, CodeServerError, 0},
	} {
		e := fromAPI("doing it", tc.err)
		if e.status != tc.status || e.code != tc.code || e.retryAfter != tc.retry || e.cause == nil {
			t.Errorf("fromAPI(%v) = %d %s retry %v", tc.err, e.status, e.code, e.retryAfter)
		}
	}
}
