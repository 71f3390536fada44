package hubapi_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubetwin/kubetwin/internal/hubapi"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// The service token of spec §4: policy iothubowner, this key, se 1700000000.
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
		h, err := newHandler(hubapi.Options{HubHostname: vectorHub, Now: func() time.Time { return now },
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
		if tc.status == http.StatusUnauthorized && r.errorMessage(t) != "the token expired at 2023-11-14T22:13:20Z" {
			t.Errorf("message %q", r.errorMessage(t))
		}
	}
}

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
		status                   int
		msg                      string
	}{
		{"no token", "GET", "/twins/authDevice1", "", nil, 401,
			"the Authorization header is missing: send a SharedAccessSignature token signed with the key of a shared access policy"},
		{"not a SAS token", "GET", "/twins/authDevice1", "Bearer abc", nil, 401,
			`the Authorization header is not a valid SharedAccessSignature token: does not start with "SharedAccessSignature "`},
		{"bad signature", "GET", "/twins/authDevice1", token(t, "iothubowner", otherKey, hour), nil, 401,
			`the token's signature does not match the primary or secondary key of shared access policy "iothubowner"`},
		{"expired", "GET", "/twins/authDevice1", token(t, "iothubowner", ownerPrimary, time.Unix(1600000000, 0)), nil, 401,
			"the token expired at 2020-09-13T12:26:40Z"},
		{"unknown policy", "GET", "/twins/authDevice1", token(t, "nobody", ownerPrimary, hour), nil, 401,
			`there is no shared access policy named "nobody"`},
		{"other hub", "GET", "/twins/authDevice1", sas.Sign("other.example", k, hour, "iothubowner"), nil, 401,
			`the token is for "other.example", not for this hub: its resource (sr) must be the hub host name "hub.kubetwin.test"`},
		{"device token", "GET", "/twins/authDevice1", sas.Sign(hubHost+"/devices/authDevice1", k, hour, ""), nil, 401,
			"the token names no shared access policy (skn): device tokens are not accepted by the service API"},
		{"host in upper case", "GET", "/twins/authDevice1", sas.Sign(strings.ToUpper(hubHost), k, hour, "iothubowner"), nil, 200, ""},
		{"scoped to the twin", "GET", "/twins/authDevice1", sas.Sign(hubHost+"/twins/authDevice1", k, hour, "iothubowner"), nil, 200, ""},
		{"scoped elsewhere", "GET", "/twins/authDevice1", sas.Sign(hubHost+"/twins/other", k, hour, "iothubowner"), nil, 401,
			`the token's resource "hub.kubetwin.test/twins/other" does not cover /twins/authDevice1`},
		{"secondary key", "GET", "/twins/authDevice1", token(t, "service", serviceSecondary, hour), nil, 200, ""},
		{"registryRead reads no twins", "GET", "/twins/authDevice1", token(t, "registryRead", readPrimary, hour), nil, 401,
			`shared access policy "registryRead" may not read twins: that needs the right ServiceConnect`},
		{"service reads no registry", "GET", "/devices/", token(t, "service", servicePrimary, hour), nil, 401,
			`shared access policy "service" may not read the device registry: that needs the right RegistryRead`},
		{"registryRead writes no registry", "DELETE", "/devices/authDevice1", token(t, "registryRead", readPrimary, hour), nil, 401,
			`shared access policy "registryRead" may not delete devices: that needs the right RegistryWrite`},
		{"service queries", "POST", "/devices/query", token(t, "service", servicePrimary, hour), `{"query":"SELECT * FROM devices"}`, 200, ""},
		{"registryRead queries", "POST", "/devices/query", token(t, "registryRead", readPrimary, hour), `{"query":"SELECT * FROM devices"}`, 200, ""},
		{"registryRead reads the registry", "GET", "/devices/authDevice1", token(t, "registryRead", readPrimary, hour), nil, 200, ""},
		{"unknown API needs a token", "GET", "/jobs", "", nil, 401, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := call(t, tc.method, tc.path, map[string]string{"Authorization": tc.auth}, tc.body)
			if tc.status == 200 {
				r.expect(t, 200)
				return
			}
			r.expectError(t, tc.status, "IotHubUnauthorizedAccess", tc.msg)
		})
	}
}

func TestPolicyRotation(t *testing.T) {
	reset(t)
	ctx := context.Background()
	newTwin(t, devNS, "rotate-1", "rotateDevice1", "", "")
	key := types.NamespacedName{Namespace: policyNS, Name: policySecret}
	s := &corev1.Secret{}
	if err := k8s.Get(ctx, key, s); err != nil {
		t.Fatal(err)
	}
	old := string(s.Data["service.primaryKey"])
	rotated := sas.NewKey()
	// Warm the handler's copy of the policies.
	call(t, "GET", "/twins/rotateDevice1", map[string]string{"Authorization": token(t, "service", old, time.Now().Add(time.Hour))}, nil).expect(t, 200)

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
	// The new key works at once (a failed signature re-reads the policies)...
	deadline := time.Now().Add(5 * time.Second)
	for {
		r := call(t, "GET", "/twins/rotateDevice1", map[string]string{"Authorization": token(t, "service", rotated, time.Now().Add(time.Hour))}, nil)
		if r.status == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the rotated key is refused: %d %s", r.status, r.body)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// ...and the old one is refused once the policies were read again.
	time.Sleep(2 * testTTL)
	call(t, "GET", "/twins/rotateDevice1", map[string]string{"Authorization": token(t, "service", old, time.Now().Add(time.Hour))}, nil).
		expectError(t, 401, "IotHubUnauthorizedAccess", `the token's signature does not match the primary or secondary key of shared access policy "service"`)
	call(t, "GET", "/twins/rotateDevice1", map[string]string{"Authorization": token(t, "broken", string(s.Data["broken.primaryKey"]), time.Now().Add(time.Hour))}, nil).
		expectError(t, 401, "IotHubUnauthorizedAccess", `shared access policy "broken" is misconfigured and refuses every request (the operator's log says why)`)
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
