package hubapi_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubetwin/kubetwin/internal/hubapi"
	"github.com/kubetwin/kubetwin/internal/ratelog"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// A service token signed as the service SDKs sign it: policy iothubowner,
// this key, se 1700000000 (pkg/sas/sas_test.go checks the same vector).
const (
	vectorKey   = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
	vectorHub   = "myhub.azure-devices.net"
	vectorToken = "SharedAccessSignature sr=myhub.azure-devices.net&sig=sJAIZTF5oG40VHrie96heZ865%2BnR4QavBvHnzxZm8rk%3D&skn=iothubowner&se=1700000000"
)

func TestSASTestVector(t *testing.T) {
	key, err := sas.DecodeKey(vectorKey)
	if err != nil {
		t.Fatal(err)
	}
	if got := sas.Sign(vectorHub, key, time.Unix(1700000000, 0), "iothubowner"); got != vectorToken {
		t.Fatalf("Sign = %s\nwant %s", got, vectorToken)
	}

	// A hub whose iothubowner policy has the vector key accepts the
	// vector token until 1700000000.
	ctx := context.Background()
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: policyNS, Name: "vector-policies"}, Data: map[string][]byte{
		"iothubowner.primaryKey": []byte(vectorKey),
		"iothubowner.rights":     []byte("RegistryRead,RegistryWrite,ServiceConnect,DeviceConnect"),
	}}
	_ = k8s.Delete(ctx, sec.DeepCopy())
	if err := k8s.Create(ctx, sec); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		now    int64
		status int
		code   string
	}{
		{1700000000 - 60, http.StatusNotFound, "DeviceNotFound"},
		{1700000000, http.StatusUnauthorized, "IotHubUnauthorizedAccess"},
	} {
		now := time.Unix(tc.now, 0)
		h, err := newHandler(hubapi.Options{HubHostname: vectorHub, Now: func() time.Time { return now }, MaxTokenLifetime: time.Hour,
			PolicySecret: types.NamespacedName{Namespace: policyNS, Name: "vector-policies"}})
		if err != nil {
			t.Fatal(err)
		}
		req := httptest.NewRequest(http.MethodGet, "/twins/myDeviceId?api-version=2021-04-12", nil)
		req.Header.Set("Authorization", vectorToken)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		r := response{status: rec.Code, header: rec.Header(), body: rec.Body.Bytes()}
		r.expectError(t, tc.status, tc.code, "")
		if tc.status == http.StatusUnauthorized && r.errorMessage(t) != "Unauthorized" {
			t.Errorf("message %q", r.errorMessage(t))
		}
	}
}

// unauthorizedCount is kubetwin_service_unauthorized_total{reason}.
func unauthorizedCount(t *testing.T, reason string) float64 {
	return counter(t, "kubetwin_service_unauthorized_total", map[string]string{"reason": reason})
}

// TestAuthorization: every refused token gets IoT Hub's bare 401
// ("Unauthorized", nothing about policies or keys); the reason is counted
// by kubetwin_service_unauthorized_total{reason}.
func TestAuthorization(t *testing.T) {
	reset(t)
	newTwin(t, devNS, "auth-1", "authDevice1", "", "")
	hour := time.Now().Add(time.Hour)
	keys := func(p string) (string, string) { return policyKeys[p][0], policyKeys[p][1] }
	ownerPrimary, _ := keys("iothubowner")
	servicePrimary, serviceSecondary := keys("service")
	readPrimary, _ := keys("registryRead")
	otherKey := sas.NewKey()
	k, _ := sas.DecodeKey(ownerPrimary)

	for _, tc := range []struct {
		name, method, path, auth string
		body                     any
		// reason is the unauthorized reason; "" for 200.
		reason string
	}{
		{"no token", "GET", "/twins/authDevice1", "", nil, "noToken"},
		{"not a SAS token", "GET", "/twins/authDevice1", "Bearer abc", nil, "malformedToken"},
		{"bad signature", "GET", "/twins/authDevice1", token(t, "iothubowner", otherKey, hour), nil, "badSignature"},
		{"expired", "GET", "/twins/authDevice1", token(t, "iothubowner", ownerPrimary, time.Unix(1600000000, 0)), nil, "expired"},
		{"unknown policy", "GET", "/twins/authDevice1", token(t, "nobody", ownerPrimary, hour), nil, "unknownPolicy"},
		{"other hub", "GET", "/twins/authDevice1", sas.Sign("other.example", k, hour, "iothubowner"), nil, "otherHub"},
		{"device token", "GET", "/twins/authDevice1", sas.Sign(hubHost+"/devices/authDevice1", k, hour, ""), nil, "deviceToken"},
		{"host in upper case", "GET", "/twins/authDevice1", sas.Sign(strings.ToUpper(hubHost), k, hour, "iothubowner"), nil, ""},
		{"scoped to the twin", "GET", "/twins/authDevice1", sas.Sign(hubHost+"/twins/authDevice1", k, hour, "iothubowner"), nil, ""},
		{"scoped elsewhere", "GET", "/twins/authDevice1", sas.Sign(hubHost+"/twins/other", k, hour, "iothubowner"), nil, "outOfScope"},
		{"secondary key", "GET", "/twins/authDevice1", token(t, "service", serviceSecondary, hour), nil, ""},
		{"registryRead reads no twins", "GET", "/twins/authDevice1", token(t, "registryRead", readPrimary, hour), nil, "missingRight"},
		{"service reads no registry", "GET", "/devices/", token(t, "service", servicePrimary, hour), nil, "missingRight"},
		{"registryRead writes no registry", "DELETE", "/devices/authDevice1", token(t, "registryRead", readPrimary, hour), nil, "missingRight"},
		{"service queries", "POST", "/devices/query", token(t, "service", servicePrimary, hour), `{"query":"SELECT * FROM devices"}`, ""},
		{"registryRead queries", "POST", "/devices/query", token(t, "registryRead", readPrimary, hour), `{"query":"SELECT * FROM devices"}`, ""},
		{"registryRead reads the registry", "GET", "/devices/authDevice1", token(t, "registryRead", readPrimary, hour), nil, ""},
		{"unknown API needs a token", "GET", "/jobs", "", nil, "noToken"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := unauthorizedCount(t, tc.reason)
			r := call(t, tc.method, tc.path, map[string]string{"Authorization": tc.auth}, tc.body)
			if tc.reason == "" {
				r.expect(t, 200)
				return
			}
			r.expectError(t, 401, "IotHubUnauthorizedAccess", "Unauthorized")
			if got := unauthorizedCount(t, tc.reason); got != before+1 {
				t.Errorf("kubetwin_service_unauthorized_total{reason=%q} went from %v to %v, want +1", tc.reason, before, got)
			}
		})
	}
}

// TestUnauthorizedLog: the reason a request is refused goes to the log
// (never the token), rate-limited per kind of line.
func TestUnauthorizedLog(t *testing.T) {
	reset(t)
	var mu sync.Mutex
	var lines []string
	log := funcr.New(func(prefix, args string) {
		mu.Lock()
		defer mu.Unlock()
		lines = append(lines, args)
	}, funcr.Options{})
	frozen := time.Now()
	h, err := newHandler(hubapi.Options{Logger: log, LogLimiter: ratelog.New(1).WithClock(func() time.Time { return frozen })})
	if err != nil {
		t.Fatal(err)
	}
	bad := token(t, "iothubowner", sas.NewKey(), time.Now().Add(time.Hour))
	for range 5 {
		serve(t, h, http.MethodGet, "/twins/x", map[string]string{"Authorization": bad}, "").
			expectError(t, 401, "IotHubUnauthorizedAccess", "Unauthorized")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(lines) != 2 {
		t.Fatalf("%d log lines for 5 refusals, want 2 (the burst of a limit of 1 a second): %q", len(lines), lines)
	}
	for _, l := range lines {
		for _, want := range []string{`"msg"="service API request unauthorized"`, `"unauthorizedReason"="badSignature"`,
			`shared access policy \"iothubowner\"`} {
			if !strings.Contains(l, want) {
				t.Errorf("log line %s lacks %s", l, want)
			}
		}
		if strings.Contains(l, "sig=") {
			t.Errorf("log line %s holds the token", l)
		}
	}
}

// TestTokenLifetime: a token whose expiry is further than
// MaxTokenLifetime from now is refused.
func TestTokenLifetime(t *testing.T) {
	reset(t)
	newTwin(t, devNS, "life-1", "life-1", "", "")
	owner := policyKeys["iothubowner"][0]
	// The suite's handler has the default, a year.
	before := unauthorizedCount(t, "lifetimeTooLong")
	call(t, http.MethodGet, "/twins/life-1", map[string]string{"Authorization": token(t, "iothubowner", owner, time.Now().Add(hubapi.DefaultMaxTokenLifetime+time.Hour))}, nil).
		expectError(t, 401, "IotHubUnauthorizedAccess", "Unauthorized")
	if got := unauthorizedCount(t, "lifetimeTooLong"); got != before+1 {
		t.Errorf("lifetimeTooLong count went from %v to %v", before, got)
	}
	call(t, http.MethodGet, "/twins/life-1", map[string]string{"Authorization": token(t, "iothubowner", owner, time.Now().Add(hubapi.DefaultMaxTokenLifetime-time.Hour))}, nil).
		expect(t, http.StatusOK)

	clock := newFakeClock()
	h, err := newHandler(hubapi.Options{Now: clock.now, MaxTokenLifetime: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	serve(t, h, http.MethodGet, "/twins/life-1", map[string]string{"Authorization": token(t, "iothubowner", owner, clock.now().Add(61*time.Minute))}, "").
		expectError(t, 401, "IotHubUnauthorizedAccess", "Unauthorized")
	serve(t, h, http.MethodGet, "/twins/life-1", map[string]string{"Authorization": token(t, "iothubowner", owner, clock.now().Add(59*time.Minute))}, "").
		expect(t, http.StatusOK)

	// Negative: no bound (--max-sas-token-lifetime=0).
	unbounded, err := newHandler(hubapi.Options{MaxTokenLifetime: -1})
	if err != nil {
		t.Fatal(err)
	}
	serve(t, unbounded, http.MethodGet, "/twins/life-1", map[string]string{"Authorization": token(t, "iothubowner", owner, time.Now().AddDate(100, 0, 0))}, "").
		expect(t, http.StatusOK)
}

// TestTokenScope: a token for a path below the hub is checked against the
// route's decoded segments. hub/devices/x covers /devices/x and /twins/x
// only; fleet-wide operations need a hub-wide token.
func TestTokenScope(t *testing.T) {
	reset(t)
	newTwin(t, devNS, "scope-1", "scopeDev", "", "")
	k, _ := sas.DecodeKey(policyKeys["iothubowner"][0])
	scoped := func(resource string) string {
		return sas.Sign(hubHost+"/"+resource, k, time.Now().Add(time.Hour), "iothubowner")
	}
	for _, tc := range []struct {
		name, resource, method, path string
		body                         any
		status                       int
	}{
		{"device token reads its twin", "devices/scopeDev", "GET", "/twins/scopeDev", nil, 200},
		{"device token writes its twin", "devices/scopeDev", "PATCH", "/twins/scopeDev", `{"tags":{"a":1}}`, 200},
		{"device token reads its identity", "devices/scopeDev", "GET", "/devices/scopeDev", nil, 200},
		{"device token, another device", "devices/scopeDev", "GET", "/twins/other", nil, 401},
		{"device token, id with an encoded slash", "devices/scopeDev", "GET", "/devices/scopeDev%2Fy", nil, 401},
		{"device token, id with an encoded slash (twin)", "devices/scopeDev", "GET", "/twins/scopeDev%2Fy", nil, 401},
		{"device token, list", "devices/scopeDev", "GET", "/devices/", nil, 401},
		{"device token, query", "devices/scopeDev", "POST", "/devices/query", `{"query":"SELECT * FROM devices"}`, 401},
		{"token for device query does not query", "devices/query", "POST", "/devices/query", `{"query":"SELECT * FROM devices"}`, 401},
		{"token for device query reads device query", "devices/query", "GET", "/devices/query", nil, 404},
		{"twin token, identity", "twins/scopeDev", "GET", "/devices/scopeDev", nil, 401},
		{"twin token, twin", "twins/scopeDev", "GET", "/twins/scopeDev", nil, 200},
		{"collection token", "devices", "GET", "/devices/scopeDev", nil, 401},
		{"deeper token", "devices/scopeDev/modules", "GET", "/devices/scopeDev", nil, 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := call(t, tc.method, tc.path, map[string]string{"Authorization": scoped(tc.resource), "If-Match": "*"}, tc.body)
			switch tc.status {
			case 401:
				r.expectError(t, 401, "IotHubUnauthorizedAccess", "Unauthorized")
			case 404:
				r.expectError(t, 404, "DeviceNotFound", "")
			default:
				r.expect(t, tc.status)
			}
		})
	}
}

// TestPolicyRotation: a rotated policy key works at once and the old one
// stops; the handler's clock is a fake one, so the policy TTL and the
// re-read interval pass when the test says.
func TestPolicyRotation(t *testing.T) {
	reset(t)
	ctx := context.Background()
	newTwin(t, devNS, "rotate-1", "rotateDevice1", "", "")
	key := types.NamespacedName{Namespace: policyNS, Name: policySecret}
	s := &corev1.Secret{}
	if err := k8s.Get(ctx, key, s); err != nil {
		t.Fatal(err)
	}
	clock := newFakeClock()
	h, err := newHandler(hubapi.Options{Now: clock.now, PolicyTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	get := func(policy, k string) response {
		return serve(t, h, http.MethodGet, "/twins/rotateDevice1", map[string]string{"Authorization": token(t, policy, k, clock.now().Add(time.Hour))}, "")
	}
	old := string(s.Data["service.primaryKey"])
	rotated := sas.NewKey()
	get("service", old).expect(t, 200) // the handler's copy of the policies

	s.Data["service.primaryKey"] = []byte(rotated)
	// A broken policy next to it refuses requests and does not disturb the others.
	s.Data["broken.primaryKey"] = []byte(sas.NewKey())
	s.Data["broken.rights"] = []byte("ServiceConnect,Everything")
	if err := k8s.Update(ctx, s); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s := &corev1.Secret{}
		if err := k8s.Get(ctx, key, s); err == nil {
			s.Data["service.primaryKey"] = []byte(old)
			delete(s.Data, "broken.primaryKey")
			delete(s.Data, "broken.rights")
			_ = k8s.Update(ctx, s)
		}
	})
	// Within a second of the last read, a failed signature does not read
	// again (an attacker's wrong keys cannot make the handler hammer the
	// API server): the new key is refused...
	get("service", rotated).expectError(t, 401, "IotHubUnauthorizedAccess", "Unauthorized")
	// ...a second on, it re-reads the policies (long before the TTL) and
	// the new key works,
	clock.advance(time.Second)
	get("service", rotated).expect(t, 200)
	// and the old one is refused.
	get("service", old).expectError(t, 401, "IotHubUnauthorizedAccess", "Unauthorized")
	before := unauthorizedCount(t, "invalidPolicy")
	get("broken", string(s.Data["broken.primaryKey"])).expectError(t, 401, "IotHubUnauthorizedAccess", "Unauthorized")
	if got := unauthorizedCount(t, "invalidPolicy"); got != before+1 {
		t.Errorf("invalidPolicy count went from %v to %v", before, got)
	}
}

func TestEnsurePolicies(t *testing.T) {
	ctx := context.Background()
	const name = "ensure-policies"
	key := types.NamespacedName{Namespace: policyNS, Name: name}
	_ = k8s.Delete(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: policyNS, Name: name}})
	if err := hubapi.EnsurePolicies(ctx, k8s, policyNS, name, "first.example"); err != nil {
		t.Fatal(err)
	}
	s := &corev1.Secret{}
	if err := k8s.Get(ctx, key, s); err != nil {
		t.Fatal(err)
	}
	wantRights := map[string]string{
		"iothubowner":       "RegistryRead,RegistryWrite,ServiceConnect,DeviceConnect",
		"service":           "ServiceConnect",
		"registryRead":      "RegistryRead",
		"registryReadWrite": "RegistryRead,RegistryWrite",
	}
	if len(s.Data) != 4*len(wantRights)+1 || string(s.Data["hostName"]) != "first.example" {
		t.Fatalf("data keys: %v", keysOf(s.Data))
	}
	for p, rights := range wantRights {
		primary := string(s.Data[p+".primaryKey"])
		for _, k := range []string{primary, string(s.Data[p+".secondaryKey"])} {
			if b, err := sas.DecodeKey(k); err != nil || len(b) != 32 {
				t.Errorf("%s: key %d bytes, %v", p, len(b), err)
			}
		}
		if got := string(s.Data[p+".rights"]); got != rights {
			t.Errorf("%s.rights = %q, want %q", p, got, rights)
		}
		if got, want := string(s.Data[p+".connectionString"]), "HostName=first.example;SharedAccessKeyName="+p+";SharedAccessKey="+primary; got != want {
			t.Errorf("%s.connectionString = %q, want %q", p, got, want)
		}
	}

	// The user's changes are kept; what is missing is filled in.
	userKey := sas.NewKey()
	oldSecondary := string(s.Data["iothubowner.secondaryKey"])
	s.Data["iothubowner.primaryKey"] = []byte(userKey)
	delete(s.Data, "service.secondaryKey")
	s.Data["registryRead.rights"] = []byte("")
	s.Data["custom.primaryKey"] = []byte(userKey)
	s.Data["custom.rights"] = []byte("RegistryRead")
	if err := k8s.Update(ctx, s); err != nil {
		t.Fatal(err)
	}
	if err := hubapi.EnsurePolicies(ctx, k8s, policyNS, name, "second.example"); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Get(ctx, key, s); err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{
		"iothubowner.primaryKey":       userKey,
		"iothubowner.secondaryKey":     oldSecondary,
		"iothubowner.connectionString": "HostName=second.example;SharedAccessKeyName=iothubowner;SharedAccessKey=" + userKey,
		"registryRead.rights":          "",
		"custom.primaryKey":            userKey,
		"custom.rights":                "RegistryRead",
		"custom.connectionString":      "HostName=second.example;SharedAccessKeyName=custom;SharedAccessKey=" + userKey,
		"hostName":                     "second.example",
	} {
		if got := string(s.Data[k]); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
	if _, err := sas.DecodeKey(string(s.Data["service.secondaryKey"])); err != nil {
		t.Errorf("service.secondaryKey was not filled in: %v", err)
	}
	// Nothing to change: nothing written.
	rv := s.ResourceVersion
	if err := hubapi.EnsurePolicies(ctx, k8s, policyNS, name, "second.example"); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Get(ctx, key, s); err != nil || s.ResourceVersion != rv {
		t.Errorf("EnsurePolicies wrote an unchanged Secret (%v)", err)
	}
}

func keysOf(m map[string][]byte) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}
