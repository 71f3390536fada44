package hubapi_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubapi"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// sdkDevice is the body azure-iothub's Registry.create sends for
// {deviceId} after _normalizeAuthentication: empty keys mean "generate".
func sdkDevice(id, primary, secondary string) map[string]any {
	return map[string]any{
		"deviceId": id,
		"status":   "enabled",
		"authentication": map[string]any{
			"type":         "sas",
			"symmetricKey": map[string]any{"primaryKey": primary, "secondaryKey": secondary},
		},
	}
}

// encodeURIComponent escapes like JavaScript's encodeURIComponent, as the
// SDK builds its paths.
func encodeURIComponent(s string) string {
	e := url.QueryEscape(s)
	e = strings.ReplaceAll(e, "+", "%20")
	for _, c := range []string{"!", "'", "(", ")", "*"} {
		e = strings.ReplaceAll(e, url.QueryEscape(c), c)
	}
	return e
}

// keySecret reads a twin's key Secret.
func keySecret(t *testing.T, twinName string) *corev1.Secret {
	t.Helper()
	s := &corev1.Secret{}
	if err := k8s.Get(context.Background(), types.NamespacedName{Namespace: devNS, Name: v1alpha1.KeySecretName(twinName)}, s); err != nil {
		t.Fatalf("key Secret of %s: %v", twinName, err)
	}
	return s
}

// checkDevice checks the shape of a device reply and returns its keys.
func checkDevice(t *testing.T, d map[string]any, id, status string) (primary, secondary string) {
	t.Helper()
	for _, k := range []string{"deviceId", "generationId", "etag", "connectionState", "status", "statusReason",
		"connectionStateUpdatedTime", "statusUpdatedTime", "lastActivityTime", "cloudToDeviceMessageCount", "authentication", "capabilities"} {
		if _, ok := d[k]; !ok {
			t.Errorf("device reply lacks %s: %v", k, d)
		}
	}
	valueEqual(t, "deviceId", d["deviceId"], mustJSON(id))
	valueEqual(t, "status", d["status"], mustJSON(status))
	valueEqual(t, "connectionState", d["connectionState"], `"Disconnected"`)
	valueEqual(t, "capabilities", d["capabilities"], `{"iotEdge":false}`)
	auth, _ := d["authentication"].(map[string]any)
	valueEqual(t, "authentication.type", auth["type"], `"sas"`)
	valueEqual(t, "authentication.x509Thumbprint", auth["x509Thumbprint"], `{"primaryThumbprint":null,"secondaryThumbprint":null}`)
	sk, _ := auth["symmetricKey"].(map[string]any)
	primary, _ = sk["primaryKey"].(string)
	secondary, _ = sk["secondaryKey"].(string)
	return primary, secondary
}

func mustJSON(v any) string { b, _ := json.Marshal(v); return string(b) }

func TestRegistry(t *testing.T) {
	reset(t)
	ctx := context.Background()

	// Create with generated keys.
	r := call(t, http.MethodPut, "/devices/reg-1", nil, sdkDevice("reg-1", "", "")).expect(t, http.StatusOK)
	primary, secondary := checkDevice(t, r.object(t), "reg-1", "enabled")
	for _, k := range []string{primary, secondary} {
		if b, err := sas.DecodeKey(k); err != nil || len(b) != 32 {
			t.Errorf("generated key %q: %v", k, err)
		}
	}
	tw := getTwinObject(t, devNS, "reg-1")
	if tw.Spec.DeviceID != "reg-1" || tw.Spec.Status != v1alpha1.DeviceEnabled {
		t.Errorf("twin spec %+v", tw.Spec)
	}
	s := keySecret(t, "reg-1")
	if string(s.Data["primaryKey"]) != primary || string(s.Data["secondaryKey"]) != secondary ||
		string(s.Data["connectionString"]) != "HostName="+hubHost+";DeviceId=reg-1;SharedAccessKey="+primary {
		t.Errorf("key Secret data %v", s.Data)
	}
	if s.Labels[v1alpha1.DeviceKeysLabel] != "true" || !metav1.IsControlledBy(s, tw) {
		t.Errorf("key Secret is not the twin's: labels %v, owners %v", s.Labels, s.OwnerReferences)
	}

	// Create with given keys; the id is not a Kubernetes name.
	k1, k2 := sas.NewKey(), sas.NewKey()
	r = call(t, http.MethodPut, "/devices/Reg_2", nil, sdkDevice("Reg_2", k1, k2)).expect(t, http.StatusOK)
	if p, s := checkDevice(t, r.object(t), "Reg_2", "enabled"); p != k1 || s != k2 {
		t.Errorf("keys %q %q, want the given ones", p, s)
	}
	name := hubapi.TwinName("Reg_2")
	if getTwinObject(t, devNS, name).Spec.DeviceID != "Reg_2" {
		t.Error("twin of Reg_2 lacks spec.deviceId")
	}
	if s := keySecret(t, name); string(s.Data["primaryKey"]) != k1 || string(s.Data["secondaryKey"]) != k2 {
		t.Errorf("key Secret data %v", s.Data)
	}

	// Duplicates, bad bodies.
	call(t, http.MethodPut, "/devices/reg-1", nil, sdkDevice("reg-1", "", "")).
		expectError(t, http.StatusConflict, "DeviceAlreadyExists", `device "reg-1" already exists (its id is held by DeviceTwin devices/reg-1)`)
	call(t, http.MethodPut, "/devices/reg-3", nil, sdkDevice("reg-3", "c2hvcnQ=", "")).
		expectError(t, http.StatusBadRequest, "ArgumentInvalid", "authentication.symmetricKey.primaryKey: key is 5 bytes long, want 16 to 64")
	call(t, http.MethodPut, "/devices/reg-3", nil, sdkDevice("reg-4", "", "")).
		expectError(t, http.StatusBadRequest, "ArgumentInvalid", `deviceId: "reg-4" does not match the device id of the path "reg-3"`)
	call(t, http.MethodPut, "/devices/reg-3", nil, `{"deviceId":"reg-3","authentication":{"type":"selfSigned"}}`).
		expectError(t, http.StatusBadRequest, "ArgumentInvalid", `authentication.type: "selfSigned" is not supported: devices authenticate with symmetric keys (sas)`)
	call(t, http.MethodPut, "/devices/a%2Fb", nil, sdkDevice("a/b", "", "")).
		expectError(t, http.StatusBadRequest, "ArgumentInvalid",
			`deviceId: device id must not contain '/' (allowed: ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ %3B $ ')`)
	if err := k8s.Get(ctx, types.NamespacedName{Namespace: devNS, Name: "reg-3"}, &v1alpha1.DeviceTwin{}); !apierrors.IsNotFound(err) {
		t.Errorf("a refused create left a twin: %v", err)
	}

	// Get and list.
	r = call(t, http.MethodGet, "/devices/reg-1", nil, nil).expect(t, http.StatusOK)
	if p, s := checkDevice(t, r.object(t), "reg-1", "enabled"); p != primary || s != secondary {
		t.Errorf("GET keys %q %q, want those of the create", p, s)
	}
	list := call(t, http.MethodGet, "/devices/", nil, nil).expect(t, http.StatusOK).array(t)
	var ids []string
	for _, d := range list {
		ids = append(ids, d["deviceId"].(string))
	}
	joined := "," + strings.Join(ids, ",") + ","
	if !strings.Contains(joined, ",Reg_2,") || !strings.Contains(joined, ",reg-1,") || strings.Index(joined, ",Reg_2,") > strings.Index(joined, ",reg-1,") {
		t.Errorf("list %v: want Reg_2 and reg-1, in device id order", ids)
	}
	if got := call(t, http.MethodGet, "/devices?top=1", nil, nil).expect(t, http.StatusOK).array(t); len(got) != 1 {
		t.Errorf("top=1 listed %d", len(got))
	}

	// Update: status and one key.
	k3 := sas.NewKey()
	body := sdkDevice("reg-1", k3, "")
	body["status"] = "disabled"
	r = call(t, http.MethodPut, "/devices/reg-1", map[string]string{"If-Match": `"*"`}, body).expect(t, http.StatusOK)
	if p, s := checkDevice(t, r.object(t), "reg-1", "disabled"); p != k3 || s != secondary {
		t.Errorf("updated keys %q %q, want the new primary and the old secondary", p, s)
	}
	if tw := getTwinObject(t, devNS, "reg-1"); tw.Spec.Status != v1alpha1.DeviceDisabled {
		t.Errorf("spec.status %q after update", tw.Spec.Status)
	}
	if s := keySecret(t, "reg-1"); string(s.Data["primaryKey"]) != k3 || string(s.Data["secondaryKey"]) != secondary {
		t.Errorf("key Secret after update %v", s.Data)
	}
	call(t, http.MethodPut, "/devices/reg-1", map[string]string{"If-Match": `"MQ=="`}, body).
		expectError(t, http.StatusPreconditionFailed, "PreconditionFailed", "")

	// Delete.
	call(t, http.MethodDelete, "/devices/reg-1", map[string]string{"If-Match": `"*"`}, nil).expect(t, http.StatusNoContent)
	if err := k8s.Get(ctx, types.NamespacedName{Namespace: devNS, Name: "reg-1"}, &v1alpha1.DeviceTwin{}); !apierrors.IsNotFound(err) {
		t.Errorf("twin after delete: %v", err)
	}
	call(t, http.MethodDelete, "/devices/reg-1", map[string]string{"If-Match": `"*"`}, nil).
		expectError(t, http.StatusNotFound, "DeviceNotFound", `device "reg-1" is not registered`)
	call(t, http.MethodGet, "/devices/reg-1", nil, nil).
		expectError(t, http.StatusNotFound, "DeviceNotFound", `device "reg-1" is not registered`)
	call(t, http.MethodGet, "/twins/reg-1", nil, nil).
		expectError(t, http.StatusNotFound, "DeviceNotFound", `device "reg-1" is not registered`)
	// The id is free again.
	call(t, http.MethodPut, "/devices/reg-1", nil, sdkDevice("reg-1", "", "")).expect(t, http.StatusOK)
}

// TestRegistryKeySecretRace covers the operator creating the key Secret
// first: the API's keys replace the generated ones.
func TestRegistryKeySecretRace(t *testing.T) {
	reset(t)
	ctx := context.Background()
	tw := newTwin(t, devNS, "race-1", "race-1", "", "")
	generated := sas.NewKey()
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: devNS, Name: v1alpha1.KeySecretName(tw.Name),
		Labels: map[string]string{v1alpha1.DeviceKeysLabel: "true"}},
		Data: map[string][]byte{"primaryKey": []byte(generated), "secondaryKey": []byte(generated)}}
	if err := controllerRef(tw, s); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Create(ctx, s); err != nil {
		t.Fatal(err)
	}
	k := sas.NewKey()
	r := call(t, http.MethodPut, "/devices/race-1", map[string]string{"If-Match": "*"}, sdkDevice("race-1", k, k)).expect(t, http.StatusOK)
	if p, _ := checkDevice(t, r.object(t), "race-1", "enabled"); p != k {
		t.Errorf("primary key %q, want the given one", p)
	}
	if s := keySecret(t, tw.Name); string(s.Data["primaryKey"]) != k || string(s.Data["connectionString"]) != "HostName="+hubHost+";DeviceId=race-1;SharedAccessKey="+k {
		t.Errorf("key Secret %v", s.Data)
	}

	// A Secret of that name that is not the twin's is left alone.
	other := newTwin(t, devNS, "race-2", "race-2", "", "")
	if err := k8s.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: devNS, Name: v1alpha1.KeySecretName(other.Name)}}); err != nil {
		t.Fatal(err)
	}
	call(t, http.MethodPut, "/devices/race-2", map[string]string{"If-Match": "*"}, sdkDevice("race-2", k, "")).
		expectError(t, http.StatusConflict, "Conflict", `the Secret devices/race-2-device-key that holds the keys of device "race-2" exists and is not its DeviceTwin's: delete or rename it`)
}

func controllerRef(owner *v1alpha1.DeviceTwin, s *corev1.Secret) error {
	yes := true
	s.OwnerReferences = []metav1.OwnerReference{{APIVersion: v1alpha1.GroupVersion.String(), Kind: "DeviceTwin",
		Name: owner.Name, UID: owner.UID, Controller: &yes, BlockOwnerDeletion: &yes}}
	return nil
}

// TestSpecialDeviceIDs sends ids with every special character through the
// paths, encoded as the SDK encodes them.
func TestSpecialDeviceIDs(t *testing.T) {
	reset(t)
	for _, id := range []string{"a+b#c?d%e", "x;y$z'(1)!*", "-:.+%_#*?!(),=@;$'"} {
		t.Run(id, func(t *testing.T) {
			enc := encodeURIComponent(id)
			r := call(t, http.MethodPut, "/devices/"+enc, nil, sdkDevice(id, "", "")).expect(t, http.StatusOK)
			checkDevice(t, r.object(t), id, "enabled")
			tw := getTwinObject(t, devNS, hubapi.TwinName(id))
			if tw.Spec.DeviceID != id {
				t.Fatalf("spec.deviceId %q", tw.Spec.DeviceID)
			}
			// Go's own escaping (which leaves '+' and the like alone) works too.
			doc := call(t, http.MethodGet, "/twins/"+url.PathEscape(id), nil, nil).expect(t, http.StatusOK).object(t)
			valueEqual(t, "deviceId", doc["deviceId"], mustJSON(id))
			call(t, http.MethodPatch, "/twins/"+enc, map[string]string{"If-Match": `"` + doc["etag"].(string) + `"`}, `{"tags":{"special":"yes"}}`).
				expect(t, http.StatusOK)
			q, _ := json.Marshal(map[string]string{"query": "SELECT * FROM devices WHERE tags.special = 'yes' AND deviceId = '" +
				strings.ReplaceAll(id, "'", `\'`) + "'"})
			items := call(t, http.MethodPost, "/devices/query", nil, q).expect(t, http.StatusOK).array(t)
			if len(items) != 1 || items[0]["deviceId"] != id {
				t.Errorf("query by id: %v", items)
			}
			// A ';' in the id must not cut the SDK's error message short.
			call(t, http.MethodPut, "/devices/"+enc, nil, sdkDevice(id, "", "")).
				expectError(t, http.StatusConflict, "DeviceAlreadyExists", `device "`+strings.ReplaceAll(id, ";", "%3B")+`" already exists (its id is held by DeviceTwin devices/`+tw.Name+`)`)
			call(t, http.MethodDelete, "/devices/"+enc, map[string]string{"If-Match": `"*"`}, nil).expect(t, http.StatusNoContent)
			call(t, http.MethodGet, "/twins/"+enc, nil, nil).expectError(t, http.StatusNotFound, "DeviceNotFound", "")
		})
	}
}
