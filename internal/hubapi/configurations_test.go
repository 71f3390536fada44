package hubapi_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubapi"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// resetConfigurations deletes every TwinConfiguration of the served
// namespace (no operator runs here, so nothing holds them back).
func resetConfigurations(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	if err := k8s.DeleteAllOf(ctx, &v1alpha1.TwinConfiguration{}, client.InNamespace(devNS)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var list v1alpha1.TwinConfigurationList
		if err := k8s.List(ctx, &list, client.InNamespace(devNS)); err != nil {
			t.Fatal(err)
		}
		if len(list.Items) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d configurations are still there", len(list.Items))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func telemetryConfiguration() map[string]any {
	return map[string]any{
		"id":            "telemetry-30s",
		"schemaVersion": "1.0",
		"labels":        map[string]string{"team": "ops"},
		"content": map[string]any{"deviceContent": map[string]any{
			"properties.desired.telemetry.interval": 30,
			"properties.desired.mode":               "eco",
		}},
		"targetCondition": "tags.location.plant = 'Redmond43'",
		"priority":        10,
		"metrics": map[string]any{"queries": map[string]string{
			"slow": "SELECT deviceId FROM devices WHERE properties.reported.telemetry.interval > 30",
		}},
	}
}

func getConfig(t *testing.T, name string) *v1alpha1.TwinConfiguration {
	t.Helper()
	c := &v1alpha1.TwinConfiguration{}
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: devNS, Name: name}, c); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestConfigurationLifecycle: IoT Hub's configurations REST creates, reads,
// lists, updates (etag or *) and deletes TwinConfigurations of the served
// namespace; status counts are the system metrics and leave the etag alone.
func TestConfigurationLifecycle(t *testing.T) {
	resetConfigurations(t)
	ctx := context.Background()

	created := call(t, "PUT", "/configurations/telemetry-30s", nil, telemetryConfiguration()).expect(t, http.StatusOK).object(t)
	etag, _ := created["etag"].(string)
	if etag == "" || created["id"] != "telemetry-30s" || created["schemaVersion"] != "1.0" {
		t.Fatalf("created %v", created)
	}
	valueEqual(t, "content", created["content"],
		`{"deviceContent":{"properties.desired.mode":"eco","properties.desired.telemetry":{"interval":30}},"moduleContent":{},"modulesContent":{}}`)
	valueEqual(t, "systemMetrics", created["systemMetrics"], `{"queries":{`+
		`"appliedCount":"SELECT deviceId FROM devices WHERE configurations.[[telemetry-30s]].status = 'Applied'",`+
		`"targetedCount":"SELECT deviceId FROM devices WHERE tags.location.plant = 'Redmond43'"},`+
		`"results":{"appliedCount":0,"inSyncCount":0,"targetedCount":0}}`)

	// The TwinConfiguration the operator applies.
	c := getConfig(t, "telemetry-30s")
	jsonEqual(t, "spec.content.desired", c.Spec.Content.Desired, `{"mode":"eco","telemetry":{"interval":30}}`)
	if c.Spec.TargetCondition != "tags.location.plant = 'Redmond43'" || c.Spec.Priority != 10 || c.Labels["team"] != "ops" ||
		len(c.Spec.Metrics) != 1 || c.Spec.Metrics[0].Name != "slow" {
		t.Fatalf("TwinConfiguration %+v %+v", c.ObjectMeta.Labels, c.Spec)
	}
	if len(c.ManagedFields) == 0 || c.ManagedFields[0].Manager != hubapi.FieldManager {
		t.Errorf("managed fields %+v, want %s", c.ManagedFields, hubapi.FieldManager)
	}

	// Creating it again is a conflict, as in IoT Hub.
	call(t, "PUT", "/configurations/telemetry-30s", nil, telemetryConfiguration()).
		expectError(t, http.StatusConflict, hubapi.CodeConfigurationAlreadyExists, "")

	// The operator's counts are the system metrics; the etag stays.
	c.Status.TargetedCount, c.Status.AppliedCount, c.Status.InSyncCount = 3, 2, 1
	c.Status.Metrics = []v1alpha1.ConfigurationMetricResult{{Name: "slow", Count: 1}}
	if err := k8s.Status().Update(ctx, c); err != nil {
		t.Fatal(err)
	}
	got := call(t, "GET", "/configurations/telemetry-30s", nil, nil).expect(t, http.StatusOK).object(t)
	valueEqual(t, "systemMetrics.results", got["systemMetrics"].(map[string]any)["results"],
		`{"appliedCount":2,"inSyncCount":1,"targetedCount":3}`)
	valueEqual(t, "metrics", got["metrics"], `{"queries":{"slow":"SELECT deviceId FROM devices WHERE properties.reported.telemetry.interval > 30"},"results":{"slow":1}}`)
	if got["etag"] != etag {
		t.Errorf("a status change changed the etag: %v, was %s", got["etag"], etag)
	}

	// A rollout set with kubectl survives an update through the REST API,
	// which has no member for it.
	c = getConfig(t, "telemetry-30s")
	c.Spec.Rollout = &v1alpha1.RolloutSpec{MaxInFlight: intstr.FromInt32(2)}
	if err := k8s.Update(ctx, c); err != nil {
		t.Fatal(err)
	}
	call(t, "PUT", "/configurations/telemetry-30s", map[string]string{"If-Match": `"` + etag + `"`}, telemetryConfiguration()).
		expectError(t, http.StatusPreconditionFailed, hubapi.CodePreconditionFailed, "")
	etag = call(t, "GET", "/configurations/telemetry-30s", nil, nil).expect(t, http.StatusOK).object(t)["etag"].(string)

	// Content may change (IoT Hub's may not).
	update := telemetryConfiguration()
	update["content"] = map[string]any{"deviceContent": map[string]any{"properties.desired.telemetry": map[string]any{"interval": 60}}}
	update["priority"] = 20
	update["labels"] = map[string]string{}
	updated := call(t, "PUT", "/configurations/telemetry-30s", map[string]string{"If-Match": `"` + etag + `"`}, update).
		expect(t, http.StatusOK).object(t)
	if updated["etag"] == etag {
		t.Error("the etag did not change with the configuration")
	}
	c = getConfig(t, "telemetry-30s")
	jsonEqual(t, "spec.content.desired", c.Spec.Content.Desired, `{"telemetry":{"interval":60}}`)
	if c.Spec.Priority != 20 || len(c.Labels) != 0 || c.Spec.Rollout == nil || c.Spec.Rollout.MaxInFlight.IntValue() != 2 {
		t.Errorf("after the update: labels %v, spec %+v", c.Labels, c.Spec)
	}
	// The old etag is stale; "*" always applies.
	call(t, "PUT", "/configurations/telemetry-30s", map[string]string{"If-Match": `"` + etag + `"`}, update).
		expectError(t, http.StatusPreconditionFailed, hubapi.CodePreconditionFailed, "")
	update["priority"] = 5
	call(t, "PUT", "/configurations/telemetry-30s", map[string]string{"If-Match": "*"}, update).expect(t, http.StatusOK)
	if p := getConfig(t, "telemetry-30s").Spec.Priority; p != 5 {
		t.Errorf("priority %d after the update with *", p)
	}
	call(t, "PUT", "/configurations/nope", map[string]string{"If-Match": "*"}, map[string]any{
		"id": "nope", "content": update["content"], "targetCondition": "*",
	}).expectError(t, http.StatusNotFound, hubapi.CodeConfigurationNotFound, `configuration "nope" does not exist`)

	// The list, in id order, cut by top.
	second := telemetryConfiguration()
	second["id"] = "a-first"
	call(t, "PUT", "/configurations/a-first", nil, second).expect(t, http.StatusOK)
	var ids []string
	for _, c := range call(t, "GET", "/configurations", nil, nil).expect(t, http.StatusOK).array(t) {
		ids = append(ids, c["id"].(string))
	}
	if strings.Join(ids, ",") != "a-first,telemetry-30s" {
		t.Errorf("listed %v", ids)
	}
	if l := call(t, "GET", "/configurations?top=1", nil, nil).expect(t, http.StatusOK).array(t); len(l) != 1 || l[0]["id"] != "a-first" {
		t.Errorf("top=1 listed %v", l)
	}
	call(t, "GET", "/configurations?top=0", nil, nil).expectError(t, http.StatusBadRequest, hubapi.CodeArgumentInvalid,
		`top: "0" is not a whole number from 1 to 1000`)

	// Delete: a stale etag is refused; then gone.
	call(t, "DELETE", "/configurations/telemetry-30s", map[string]string{"If-Match": `"` + etag + `"`}, nil).
		expectError(t, http.StatusPreconditionFailed, hubapi.CodePreconditionFailed, "")
	call(t, "DELETE", "/configurations/telemetry-30s", nil, nil).expect(t, http.StatusNoContent)
	call(t, "GET", "/configurations/telemetry-30s", nil, nil).
		expectError(t, http.StatusNotFound, hubapi.CodeConfigurationNotFound, `configuration "telemetry-30s" does not exist`)
	call(t, "DELETE", "/configurations/telemetry-30s", nil, nil).expectError(t, http.StatusNotFound, hubapi.CodeConfigurationNotFound, "")
	err := k8s.Get(ctx, client.ObjectKey{Namespace: devNS, Name: "telemetry-30s"}, &v1alpha1.TwinConfiguration{})
	if !apierrors.IsNotFound(err) {
		t.Errorf("the TwinConfiguration is still there: %v", err)
	}
	// Only the served namespace is the hub's.
	other := &v1alpha1.TwinConfiguration{}
	other.Namespace, other.Name = otherNS, "elsewhere"
	other.Spec.TargetCondition = "*"
	other.Spec.Content.Desired = &apiextensionsv1.JSON{Raw: []byte(`{"x":1}`)}
	if err := k8s.Create(ctx, other); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), other) })
	call(t, "GET", "/configurations/elsewhere", nil, nil).expectError(t, http.StatusNotFound, hubapi.CodeConfigurationNotFound, "")
}

// TestConfigurationBadRequests: a body or id the API cannot take is 400
// ArgumentInvalid naming the member, and creates nothing.
func TestConfigurationBadRequests(t *testing.T) {
	resetConfigurations(t)
	with := func(change func(m map[string]any)) map[string]any {
		m := telemetryConfiguration()
		m["id"] = "bad"
		change(m)
		return m
	}
	content := func(dc map[string]any) func(map[string]any) {
		return func(m map[string]any) { m["content"] = map[string]any{"deviceContent": dc} }
	}
	for _, tc := range []struct {
		name string
		path string
		body any
		msg  string
	}{
		{"not JSON", "/configurations/bad", "{", "the request body: invalid JSON: unexpected EOF"},
		{"id differs", "/configurations/bad", with(func(m map[string]any) { m["id"] = "other" }),
			`id: "other" does not match the configuration id of the path "bad"`},
		{"id in path", "/configurations/Bad_Config", with(func(m map[string]any) { m["id"] = "Bad_Config" }),
			`id: "Bad_Config" is not a valid configuration id: use at most 63 lower-case letters, digits, '-' and '.', ` +
				`starting and ending with a letter or digit (it names the TwinConfiguration and the twins' label configurations.kubetwin.io/<id>)`},
		{"no content", "/configurations/bad", with(func(m map[string]any) { delete(m, "content") }),
			`content: required: {"deviceContent": {"properties.desired.<path>": <value>, ...}}`},
		{"empty content", "/configurations/bad", with(content(map[string]any{})),
			`content.deviceContent: required: at least one "properties.desired.<path>": <value>`},
		{"tags in content", "/configurations/bad", with(content(map[string]any{"tags.x": 1})),
			`content.deviceContent: "tags.x" is not a desired property path: keys are properties.desired.<key>[.<key>...]`},
		{"overlapping keys", "/configurations/bad", with(content(map[string]any{"properties.desired.a": map[string]any{"b": 1}, "properties.desired.a.c": 2})),
			`content.deviceContent: "properties.desired.a.c" is inside "properties.desired.a", which is set too`},
		{"array", "/configurations/bad", with(content(map[string]any{"properties.desired.modes": []string{"a"}})),
			"content.deviceContent.properties.desired.modes: arrays are not allowed in device twins"},
		{"null", "/configurations/bad", with(content(map[string]any{"properties.desired.mode": nil})),
			"content.deviceContent.properties.desired.mode: null is only allowed in a patch, where it deletes the key"},
		{"modules", "/configurations/bad", with(func(m map[string]any) {
			m["content"] = map[string]any{"modulesContent": map[string]any{"$edgeAgent": map[string]any{}}}
		}), "content.modulesContent: IoT Edge module content is not supported: use content.deviceContent"},
		{"no target", "/configurations/bad", with(func(m map[string]any) { delete(m, "targetCondition") }),
			`targetCondition: required: the WHERE clause of a query over twins, such as tags.environment = 'test' ("*" targets every twin)`},
		{"bad target", "/configurations/bad", with(func(m map[string]any) { m["targetCondition"] = "tags.x = " }),
			"targetCondition: line 1, column 10: expected a value after '='"},
		{"priority", "/configurations/bad", with(func(m map[string]any) { m["priority"] = -1 }),
			"priority: -1 is not a whole number from 0 to 2147483647"},
		{"priority type", "/configurations/bad", with(func(m map[string]any) { m["priority"] = "high" }),
			`priority: "high" is not a whole number from 0 to 2147483647`},
		{"label", "/configurations/bad", with(func(m map[string]any) { m["labels"] = map[string]any{"team": "two words"} }),
			`labels.team: "two words" is not a valid label value: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')`},
		{"metric query", "/configurations/bad", with(func(m map[string]any) {
			m["metrics"] = map[string]any{"queries": map[string]any{"failed": "SELECT deviceId FROM devices WHERE"}}
		}), "metrics.queries.failed: line 1, column 35: expected a value after 'WHERE'"},
		{"metric aggregate", "/configurations/bad", with(func(m map[string]any) {
			m["metrics"] = map[string]any{"queries": map[string]any{"n": "SELECT COUNT() FROM devices"}}
		}), "metrics.queries.n: a metric counts twins: use SELECT deviceId FROM devices WHERE ..., without aggregates or GROUP BY"},
		{"metric name", "/configurations/bad", with(func(m map[string]any) {
			m["metrics"] = map[string]any{"queries": map[string]any{"-x": "SELECT deviceId FROM devices"}}
		}), `metrics.queries: "-x" is not a metric name: use at most 63 letters, digits, '_', '.' and '-', starting with a letter or digit`},
		{"unknown member", "/configurations/bad", with(func(m map[string]any) { m["targetConditon"] = "*" }),
			`"targetConditon" is not a member of a configuration (id, schemaVersion, labels, content, targetCondition, priority, metrics)`},
		{"schema", "/configurations/bad", with(func(m map[string]any) { m["schemaVersion"] = "2.0" }),
			`schemaVersion: "2.0" is not supported (the only one is "1.0")`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			call(t, "PUT", tc.path, nil, tc.body).expectError(t, http.StatusBadRequest, hubapi.CodeArgumentInvalid, tc.msg)
		})
	}
	var list v1alpha1.TwinConfigurationList
	if err := k8s.List(context.Background(), &list, client.InNamespace(devNS)); err != nil || len(list.Items) != 0 {
		t.Errorf("bad requests created %d configurations (%v)", len(list.Items), err)
	}
}

// TestConfigurationAuthorization: configurations reach the whole fleet, so
// device-scoped tokens are refused; reading needs RegistryRead, writing
// RegistryWrite.
func TestConfigurationAuthorization(t *testing.T) {
	resetConfigurations(t)
	k, err := sas.DecodeKey(policyKeys["iothubowner"][0])
	if err != nil {
		t.Fatal(err)
	}
	hour := time.Now().Add(time.Hour)
	scoped := sas.Sign(hubHost+"/devices/telemetry-30s", k, hour, "iothubowner")
	read := token(t, "registryRead", policyKeys["registryRead"][0], hour)
	service := token(t, "service", policyKeys["service"][0], hour)
	body := telemetryConfiguration()
	call(t, "PUT", "/configurations/telemetry-30s", map[string]string{"Authorization": scoped}, body).
		expectError(t, http.StatusUnauthorized, hubapi.CodeIotHubUnauthorizedAccess, "Unauthorized")
	call(t, "PUT", "/configurations/telemetry-30s", map[string]string{"Authorization": read}, body).
		expectError(t, http.StatusUnauthorized, hubapi.CodeIotHubUnauthorizedAccess, "Unauthorized")
	call(t, "GET", "/configurations", map[string]string{"Authorization": service}, nil).
		expectError(t, http.StatusUnauthorized, hubapi.CodeIotHubUnauthorizedAccess, "Unauthorized")
	call(t, "POST", "/devices/d1/applyConfigurationContent", map[string]string{"Authorization": scoped},
		body["content"]).expectError(t, http.StatusUnauthorized, hubapi.CodeIotHubUnauthorizedAccess, "Unauthorized")
	call(t, "PUT", "/configurations/telemetry-30s", nil, body).expect(t, http.StatusOK)
	call(t, "GET", "/configurations/telemetry-30s", map[string]string{"Authorization": read}, nil).expect(t, http.StatusOK)
	call(t, "POST", "/configurations/testQueries", map[string]string{"Authorization": service},
		map[string]any{"targetCondition": "*"}).expect(t, http.StatusOK)
	call(t, "PATCH", "/configurations/telemetry-30s", nil, body).expectError(t, http.StatusMethodNotAllowed, hubapi.CodeMethodNotAllowed, "")
}

// TestConfigurationTestQueries: IoT Hub's testQueries answers 200 with the
// error of each query that does not parse.
func TestConfigurationTestQueries(t *testing.T) {
	got := call(t, "POST", "/configurations/testQueries", nil, map[string]any{
		"targetCondition": "tags.location.plant = 'Redmond43' AND configurations.[[other]].status = 'Applied'",
		"customMetricQueries": map[string]string{
			"ok": "SELECT deviceId FROM devices WHERE properties.reported.x = 1",
		},
	}).expect(t, http.StatusOK)
	valueEqual(t, "valid queries", got.object(t), `{"customMetricQueryErrors":{},"targetConditionError":""}`)
	got = call(t, "POST", "/configurations/testQueries", nil, map[string]any{
		"targetCondition": "tags.location.plant = ",
		"customMetricQueries": map[string]string{
			"ok":  "SELECT deviceId FROM devices",
			"bad": "SELECT deviceId FROM devices WHERE foo = 1",
		},
	}).expect(t, http.StatusOK)
	valueEqual(t, "invalid queries", got.object(t), `{"customMetricQueryErrors":{"bad":"line 1, column 36: unknown property 'foo': `+
		`a path starts with deviceId, status, connectionState, lastActivityTime, version, etag, tags, properties, capabilities or configurations"},`+
		`"targetConditionError":"line 1, column 23: expected a value after '='"}`)
	call(t, "POST", "/configurations/testQueries", nil, `{"customMetricQueries": ["x"]}`).
		expectError(t, http.StatusBadRequest, hubapi.CodeArgumentInvalid, "customMetricQueries: must be a JSON object of named queries")
}

// TestApplyConfigurationContent: the content's desired properties are
// merged into one twin's, as a twin update.
func TestApplyConfigurationContent(t *testing.T) {
	reset(t)
	tw := newTwin(t, devNS, "apply-1", "apply-1", "", `{"keep":true,"mode":"normal"}`)
	call(t, "POST", "/devices/apply-1/applyConfigurationContent", nil, map[string]any{
		"deviceContent": map[string]any{"properties.desired.telemetry.interval": 30, "properties.desired.mode": nil},
	}).expect(t, http.StatusOK)
	jsonEqual(t, "spec.desired", getTwinObject(t, devNS, tw.Name).Spec.Desired, `{"keep":true,"telemetry":{"interval":30}}`)
	call(t, "POST", "/devices/missing/applyConfigurationContent", nil, map[string]any{
		"deviceContent": map[string]any{"properties.desired.x": 1},
	}).expectError(t, http.StatusNotFound, hubapi.CodeDeviceNotFound, `device "missing" is not registered`)
	call(t, "POST", "/devices/apply-1/applyConfigurationContent", nil, map[string]any{
		"deviceContent": map[string]any{"properties.desired.x": []int{1}},
	}).expectError(t, http.StatusBadRequest, hubapi.CodeArgumentInvalid, "content.deviceContent.properties.desired.x: arrays are not allowed in device twins")
	jsonEqual(t, "spec.desired after a refused apply", getTwinObject(t, devNS, tw.Name).Spec.Desired, `{"keep":true,"telemetry":{"interval":30}}`)
}
