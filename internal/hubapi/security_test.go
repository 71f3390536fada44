package hubapi_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// managedKeySecret creates tw's key Secret as the operator keeps it:
// <twin>-device-key, labelled kubetwin.io/device-keys=true when labelled,
// controlled by tw when owned.
func managedKeySecret(t *testing.T, tw *v1alpha1.DeviceTwin, primary, secondary string, labelled, owned bool) *corev1.Secret {
	t.Helper()
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: tw.Namespace, Name: v1alpha1.KeySecretName(tw.Name)},
		Data: map[string][]byte{"primaryKey": []byte(primary), "secondaryKey": []byte(secondary)}}
	if labelled {
		s.Labels = map[string]string{v1alpha1.DeviceKeysLabel: "true"}
	}
	if owned {
		if err := controllerRef(tw, s); err != nil {
			t.Fatal(err)
		}
	}
	if err := k8s.Create(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	return s
}

// listedIDs returns the device ids of GET /devices.
func listedIDs(t *testing.T) []string {
	t.Helper()
	var ids []string
	for _, d := range call(t, http.MethodGet, "/devices/", nil, nil).expect(t, http.StatusOK).array(t) {
		ids = append(ids, d["deviceId"].(string))
	}
	return ids
}

// TestNamespaceScope: the API serves Options.Namespace only. A twin
// elsewhere is DeviceNotFound to every operation and policy, is neither
// listed nor queried, and is left unchanged.
func TestNamespaceScope(t *testing.T) {
	reset(t)
	ctx := context.Background()
	far := newTwin(t, otherNS, "far-1", "far-1", `{"fleet":"scope"}`, `{"mode":"far"}`)
	managedKeySecret(t, far, sas.NewKey(), sas.NewKey(), true, true)
	newTwin(t, devNS, "near-1", "near-1", `{"fleet":"scope"}`, "")

	notFound := `device "far-1" is not registered`
	for _, tc := range []struct {
		method, path string
		hdr          map[string]string
		body         any
	}{
		{"GET", "/twins/far-1", nil, nil},
		{"PATCH", "/twins/far-1", map[string]string{"If-Match": "*"}, `{"properties":{"desired":{"mode":"hijacked"}}}`},
		{"PUT", "/twins/far-1", map[string]string{"If-Match": "*"}, `{"properties":{"desired":{"mode":"hijacked"}}}`},
		{"GET", "/devices/far-1", nil, nil},
		{"PUT", "/devices/far-1", map[string]string{"If-Match": "*"}, sdkDevice("far-1", sas.NewKey(), "")},
		{"DELETE", "/devices/far-1", map[string]string{"If-Match": "*"}, nil},
	} {
		call(t, tc.method, tc.path, tc.hdr, tc.body).expectError(t, http.StatusNotFound, "DeviceNotFound", notFound)
	}
	// The service policy (ServiceConnect only) cannot reach it either.
	svc := token(t, "service", policyKeys["service"][0], time.Now().Add(time.Hour))
	call(t, "PATCH", "/twins/far-1", map[string]string{"Authorization": svc, "If-Match": "*"}, `{"tags":{"x":1}}`).
		expectError(t, http.StatusNotFound, "DeviceNotFound", notFound)

	if ids := listedIDs(t); strings.Join(ids, ",") != "near-1" {
		t.Errorf("GET /devices listed %v, want only near-1", ids)
	}
	for _, q := range []string{"SELECT * FROM devices", "SELECT deviceId FROM devices WHERE tags.fleet = 'scope'",
		"SELECT COUNT() AS n FROM devices"} {
		body := fmt.Sprintf(`{"query":%q}`, q)
		items := call(t, http.MethodPost, "/devices/query", nil, body).expect(t, http.StatusOK).array(t)
		got := mustJSON(items)
		if strings.Contains(got, "far-1") || !strings.Contains(got, "near-1") && !strings.Contains(got, `"n":1`) {
			t.Errorf("%s: %s, want near-1 only", q, got)
		}
	}
	// Creating the id: it exists, held outside the namespace; the reply
	// does not say where.
	r := call(t, http.MethodPut, "/devices/far-1", nil, sdkDevice("far-1", "", ""))
	r.expectError(t, http.StatusConflict, "DeviceAlreadyExists", "")
	if msg := r.errorMessage(t); strings.Contains(msg, otherNS) || strings.Contains(msg, "far-1/") {
		t.Errorf("409 names the holder outside the served namespace: %s", msg)
	}

	got := getTwinObject(t, otherNS, "far-1")
	if got.ResourceVersion != far.ResourceVersion || !got.DeletionTimestamp.IsZero() {
		t.Errorf("the twin outside the namespace changed: %+v", got.Spec)
	}
	if err := k8s.Get(ctx, types.NamespacedName{Namespace: devNS, Name: "far-1"}, &v1alpha1.DeviceTwin{}); err == nil {
		t.Error("a twin far-1 was created in the served namespace")
	}
}

// TestDeviceKeysOnlyFromManagedSecret: GET /devices/{id} and GET /devices
// return keys only from the twin's managed Secret (labelled and controlled
// by the twin), never from the Secret spec.authentication.secretRef names.
func TestDeviceKeysOnlyFromManagedSecret(t *testing.T) {
	reset(t)
	ctx := context.Background()
	loot := sas.NewKey()
	if err := k8s.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: devNS, Name: "loot"},
		Data: map[string][]byte{"primaryKey": []byte(loot), "secondaryKey": []byte(loot)}}); err != nil {
		t.Fatal(err)
	}
	ref := newTwinWith(t, "keys-ref", func(tw *v1alpha1.DeviceTwin) {
		tw.Spec.Authentication = &v1alpha1.Authentication{SecretRef: &v1alpha1.SecretReference{Name: "loot"}}
	})
	own1, own2 := sas.NewKey(), sas.NewKey()
	managedKeySecret(t, ref, own1, own2, true, true)
	// A twin whose secretRef names the Secret, and no managed Secret.
	newTwinWith(t, "keys-bare", func(tw *v1alpha1.DeviceTwin) {
		tw.Spec.Authentication = &v1alpha1.Authentication{SecretRef: &v1alpha1.SecretReference{Name: "loot"}}
	})
	// Secrets of the managed name that are not the twin's managed Secret.
	unlabelled := newTwin(t, devNS, "keys-unlabelled", "keys-unlabelled", "", "")
	managedKeySecret(t, unlabelled, loot, loot, false, true)
	unowned := newTwin(t, devNS, "keys-unowned", "keys-unowned", "", "")
	managedKeySecret(t, unowned, loot, loot, true, false)

	r := call(t, http.MethodGet, "/devices/keys-ref", nil, nil).expect(t, http.StatusOK)
	if p, s := checkDevice(t, r.object(t), "keys-ref", "enabled"); p != own1 || s != own2 {
		t.Errorf("keys-ref: keys %q %q, want those of its managed Secret", p, s)
	}
	for _, id := range []string{"keys-bare", "keys-unlabelled", "keys-unowned"} {
		r := call(t, http.MethodGet, "/devices/"+id, nil, nil).expect(t, http.StatusOK)
		if p, s := checkDevice(t, r.object(t), id, "enabled"); p != "" || s != "" {
			t.Errorf("%s: keys %q %q, want none", id, p, s)
		}
	}
	list := call(t, http.MethodGet, "/devices/", nil, nil).expect(t, http.StatusOK)
	if strings.Contains(string(list.body), loot) {
		t.Errorf("GET /devices returned the keys of a Secret that is no twin's managed Secret: %s", list.body)
	}
	if !strings.Contains(string(list.body), own1) {
		t.Errorf("GET /devices lacks the managed keys of keys-ref: %s", list.body)
	}
}

// newTwinWith creates a twin of device id name in devNS, changed by edit.
func newTwinWith(t *testing.T, name string, edit func(*v1alpha1.DeviceTwin)) *v1alpha1.DeviceTwin {
	t.Helper()
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: devNS, Name: name}, Spec: v1alpha1.DeviceTwinSpec{DeviceID: name}}
	edit(tw)
	if err := k8s.Create(context.Background(), tw); err != nil {
		t.Fatalf("creating twin %s: %v", name, err)
	}
	waitCached(t, tw)
	return tw
}

// TestConcurrentKeyRotation: the device etag covers the keys. Rotations
// sent at once with the same etag: exactly one wins, the others get 412;
// the stale etag then fails for keys and status alike.
func TestConcurrentKeyRotation(t *testing.T) {
	reset(t)
	call(t, http.MethodPut, "/devices/rot-1", nil, sdkDevice("rot-1", "", "")).expect(t, http.StatusOK)
	dev := call(t, http.MethodGet, "/devices/rot-1", nil, nil).expect(t, http.StatusOK).object(t)
	etag := `"` + dev["etag"].(string) + `"`

	const n = 4
	keys := make([]string, n)
	results := make([]response, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		keys[i] = sas.NewKey()
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			results[i] = call(t, http.MethodPut, "/devices/rot-1", map[string]string{"If-Match": etag}, sdkDevice("rot-1", keys[i], ""))
		}()
	}
	close(start)
	wg.Wait()
	winner := -1
	for i, r := range results {
		switch r.status {
		case http.StatusOK:
			if winner >= 0 {
				t.Errorf("rotations %d and %d both succeeded with the same etag", winner, i)
			}
			winner = i
		case http.StatusPreconditionFailed:
			r.expectError(t, http.StatusPreconditionFailed, "PreconditionFailed", "")
		default:
			t.Errorf("rotation %d: %d %s", i, r.status, r.body)
		}
	}
	if winner < 0 {
		t.Fatal("no rotation succeeded")
	}
	if s := keySecret(t, "rot-1"); string(s.Data["primaryKey"]) != keys[winner] {
		t.Errorf("the key Secret holds %q, want the winner's %q", s.Data["primaryKey"], keys[winner])
	}
	won := results[winner].object(t)
	if won["etag"] == dev["etag"] {
		t.Error("the etag did not change with the keys")
	}

	// The stale etag: refused for another rotation and for a status change.
	call(t, http.MethodPut, "/devices/rot-1", map[string]string{"If-Match": etag}, sdkDevice("rot-1", sas.NewKey(), "")).
		expectError(t, http.StatusPreconditionFailed, "PreconditionFailed", "")
	disable := sdkDevice("rot-1", "", "")
	disable["status"] = "disabled"
	call(t, http.MethodPut, "/devices/rot-1", map[string]string{"If-Match": etag}, disable).
		expectError(t, http.StatusPreconditionFailed, "PreconditionFailed", "")
	call(t, http.MethodDelete, "/devices/rot-1", map[string]string{"If-Match": etag}, nil).
		expectError(t, http.StatusPreconditionFailed, "PreconditionFailed", "")
	// The twin's etag is not the device's.
	twinETag := call(t, http.MethodGet, "/twins/rot-1", nil, nil).expect(t, http.StatusOK).header.Get("Etag")
	call(t, http.MethodPut, "/devices/rot-1", map[string]string{"If-Match": twinETag}, sdkDevice("rot-1", sas.NewKey(), "")).
		expectError(t, http.StatusPreconditionFailed, "PreconditionFailed", "")
	// The winner's etag works, and a GET shows the same one.
	if got := call(t, http.MethodGet, "/devices/rot-1", nil, nil).expect(t, http.StatusOK).object(t)["etag"]; got != won["etag"] {
		t.Errorf("GET etag %v, want the one the update returned %v", got, won["etag"])
	}
	r := call(t, http.MethodPut, "/devices/rot-1", map[string]string{"If-Match": `"` + won["etag"].(string) + `"`}, disable).expect(t, http.StatusOK)
	if p, _ := checkDevice(t, r.object(t), "rot-1", "disabled"); p != keys[winner] {
		t.Errorf("after the status change the primary key is %q, want %q", p, keys[winner])
	}
}

// heldPolicy makes the API server refuse DeviceTwins whose device id
// starts with "held-" as the admission webhook refuses an id another twin
// holds (a ValidatingAdmissionPolicy stands in for the webhook, which the
// suite does not run): "held-in-..." ids are held by devices/holder-in,
// the others by other-devices/holder-out.
func heldPolicy(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	fail := admissionregistrationv1.Fail
	policy := &admissionregistrationv1.ValidatingAdmissionPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "hubapi-test-held-ids"},
		Spec: admissionregistrationv1.ValidatingAdmissionPolicySpec{
			FailurePolicy: &fail,
			MatchConstraints: &admissionregistrationv1.MatchResources{ResourceRules: []admissionregistrationv1.NamedRuleWithOperations{{
				RuleWithOperations: admissionregistrationv1.RuleWithOperations{
					Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create},
					Rule: admissionregistrationv1.Rule{APIGroups: []string{"kubetwin.io"}, APIVersions: []string{"*"},
						Resources: []string{"devicetwins"}},
				},
			}}},
			Validations: []admissionregistrationv1.Validation{{
				Expression: `!object.spec.deviceId.startsWith('held-')`,
				MessageExpression: `'spec.deviceId: device id "' + object.spec.deviceId + '" is already held by DeviceTwin ' + ` +
					`(object.spec.deviceId.startsWith('held-in-') ? '` + devNS + `/holder-in' : '` + otherNS + `/holder-out')`,
			}},
		},
	}
	binding := &admissionregistrationv1.ValidatingAdmissionPolicyBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "hubapi-test-held-ids"},
		Spec: admissionregistrationv1.ValidatingAdmissionPolicyBindingSpec{PolicyName: policy.Name,
			ValidationActions: []admissionregistrationv1.ValidationAction{admissionregistrationv1.Deny}},
	}
	for _, o := range []client.Object{policy, binding} {
		if err := k8s.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = k8s.Delete(context.Background(), o) })
	}
	// The API server applies a policy once its informer has it.
	deadline := time.Now().Add(30 * time.Second)
	for {
		probe := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: devNS, Name: "held-probe"},
			Spec: v1alpha1.DeviceTwinSpec{DeviceID: "held-probe"}}
		err := k8s.Create(ctx, probe, client.DryRunAll)
		if err != nil && strings.Contains(err.Error(), "is already held by") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the admission policy is not in force: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestCreateDuplicateDeviceID: PUT /devices/{id} of an id another twin
// holds is 409 DeviceAlreadyExists, whether the cache shows the holder or
// the admission webhook refuses the new twin; the holder is named only
// when it is in the served namespace.
func TestCreateDuplicateDeviceID(t *testing.T) {
	reset(t)
	ctx := context.Background()
	newTwin(t, devNS, "dup-near", "dup-near", "", "")
	newTwin(t, otherNS, "dup-far", "dup-far", "", "")
	call(t, http.MethodPut, "/devices/dup-near", nil, sdkDevice("dup-near", "", "")).
		expectError(t, http.StatusConflict, "DeviceAlreadyExists", `device "dup-near" already exists (its id is held by DeviceTwin devices/dup-near)`)
	outside := `device "%s" already exists: its id is held by a DeviceTwin outside namespace devices, which this hub serves (device ids are unique per hub)`
	call(t, http.MethodPut, "/devices/dup-far", nil, sdkDevice("dup-far", "", "")).
		expectError(t, http.StatusConflict, "DeviceAlreadyExists", fmt.Sprintf(outside, "dup-far"))

	heldPolicy(t)
	call(t, http.MethodPut, "/devices/held-out-1", nil, sdkDevice("held-out-1", "", "")).
		expectError(t, http.StatusConflict, "DeviceAlreadyExists", fmt.Sprintf(outside, "held-out-1"))
	call(t, http.MethodPut, "/devices/held-in-1", nil, sdkDevice("held-in-1", "", "")).
		expectError(t, http.StatusConflict, "DeviceAlreadyExists", `device "held-in-1" already exists (its id is held by DeviceTwin devices/holder-in)`)
	for _, name := range []string{"held-out-1", "held-in-1"} {
		if err := k8s.Get(ctx, types.NamespacedName{Namespace: devNS, Name: name}, &v1alpha1.DeviceTwin{}); err == nil {
			t.Errorf("a refused create left twin %s", name)
		}
	}
	// Other ids are created as before.
	call(t, http.MethodPut, "/devices/free-1", nil, sdkDevice("free-1", "", "")).expect(t, http.StatusOK)
}
