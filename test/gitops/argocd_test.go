package gitops

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

const healthLua = "config/argocd/health.lua"

// argoHealth runs a health check the way Argo CD runs a health.lua from
// argocd-cm (util/lua in Argo CD): a state without the standard libraries
// except package, base and table (Argo CD adds a reduced os library, which
// this check does not use), a one-second limit, the object as the global
// obj, and a table with status and message as the result.
func argoHealth(script string, obj *unstructured.Unstructured) (status, message string, err error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return "", "", err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj.Object))
	if err := l.DoString(script); err != nil {
		return "", "", err
	}
	ret, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return "", "", fmt.Errorf("health.lua returned %s, not a table", l.Get(-1).Type())
	}
	status = lua.LVAsString(ret.RawGetString("status"))
	message = lua.LVAsString(ret.RawGetString("message"))
	switch status {
	case "Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown":
	default:
		// Argo CD turns an unknown status into Unknown with this message.
		return "Unknown", "Lua returned an invalid health status", nil
	}
	return status, message, nil
}

// toLua converts a decoded object the way Argo CD does: numbers of every
// Go type to Lua numbers, json.Number to a string, lists to sequences.
func toLua(l *lua.LState, v any) lua.LValue {
	switch x := v.(type) {
	case bool:
		return lua.LBool(x)
	case float64:
		return lua.LNumber(x)
	case int64:
		return lua.LNumber(x)
	case int32:
		return lua.LNumber(x)
	case int:
		return lua.LNumber(x)
	case json.Number:
		return lua.LString(x)
	case string:
		return lua.LString(x)
	case []any:
		t := l.CreateTable(len(x), 0)
		for _, item := range x {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]any:
		t := l.CreateTable(0, len(x))
		for k, item := range x {
			t.RawSetH(lua.LString(k), toLua(l, item))
		}
		return t
	}
	return lua.LNil
}

func TestArgoCDHealth(t *testing.T) {
	script := readFile(t, healthLua)
	for _, tc := range twinCases {
		t.Run(tc.name, func(t *testing.T) {
			status, msg, err := argoHealth(script, unstructuredTwin(t, tc.twin))
			if err != nil {
				t.Fatalf("health.lua failed: %v", err)
			}
			if status != tc.argo {
				t.Errorf("health = %s (%q), want %s", status, msg, tc.argo)
			}
			if msg == "" {
				t.Errorf("health %s has no message", status)
			}
			t.Logf("%s: %s", status, msg)
		})
	}
}

// TestArgoCDHealthMessages pins the messages a person sees in the Argo CD UI.
func TestArgoCDHealthMessages(t *testing.T) {
	script := readFile(t, healthLua)
	want := map[string]string{
		"refused desired state":            "not sent to the device: spec.desired.telemetry.intervals: arrays are not allowed in device twins",
		"desired not seen, device offline": "device has not yet acknowledged desired version 2 (it has 1) (device Disconnected)",
		"not yet observed (no status)":     "Waiting for the kubetwin operator to see the twin",
		"new generation not yet observed":  "Waiting for the kubetwin operator to see generation 4 (status is for 3)",
		"duplicate device id":              "device id myDeviceId belongs to DeviceTwin devices/older; this twin is not bridged",
	}
	for _, tc := range twinCases {
		w, ok := want[tc.name]
		if !ok {
			continue
		}
		_, msg, err := argoHealth(script, unstructuredTwin(t, tc.twin))
		if err != nil {
			t.Fatal(err)
		}
		if msg != w {
			t.Errorf("%s: message %q, want %q", tc.name, msg, w)
		}
	}
}

// TestArgoCDHealthOddObjects: the check must answer, not fail, for objects
// that are partly written or come from a newer operator.
func TestArgoCDHealthOddObjects(t *testing.T) {
	script := readFile(t, healthLua)
	for name, tc := range map[string]struct {
		yaml, want string
	}{
		"status without conditions": {`
metadata: {name: a, generation: 2}
status: {observedGeneration: 2}`, "Progressing"},
		"empty conditions": {`
metadata: {name: a, generation: 2}
status: {observedGeneration: 2, conditions: []}`, "Progressing"},
		"unknown InSync reason": {`
metadata: {name: a, generation: 2}
status:
  observedGeneration: 2
  conditions: [{type: InSync, status: "False", reason: SomethingNew, message: ""}]`, "Progressing"},
		"InSync Unknown": {`
metadata: {name: a, generation: 2}
status:
  observedGeneration: 2
  conditions: [{type: InSync, status: Unknown, reason: Pending, message: waiting}]`, "Progressing"},
		"stale InSync condition": {`
metadata: {name: a, generation: 5}
status:
  observedGeneration: 5
  conditions: [{type: InSync, status: "True", reason: InSync, message: ok, observedGeneration: 4}]`, "Progressing"},
		"numbers as strings": {`
metadata: {name: a, generation: "2"}
status:
  observedGeneration: "2"
  conditions: [{type: InSync, status: "True", reason: InSync, message: ok, observedGeneration: "2"}]`, "Healthy"},
		"no generation": {`
metadata: {name: a}
status:
  observedGeneration: 1
  conditions: [{type: InSync, status: "True", reason: InSync, message: ok}]`, "Healthy"},
	} {
		t.Run(name, func(t *testing.T) {
			var m map[string]any
			if err := yaml.Unmarshal([]byte(tc.yaml), &m); err != nil {
				t.Fatal(err)
			}
			status, msg, err := argoHealth(script, &unstructured.Unstructured{Object: m})
			if err != nil {
				t.Fatalf("health.lua failed: %v", err)
			}
			if status != tc.want {
				t.Errorf("health = %s (%q), want %s", status, msg, tc.want)
			}
		})
	}
}

// TestArgoCDConfigMapMatchesHealthLua: the argocd-cm snippet in
// config/argocd/argocd-cm.yaml and in docs/gitops.md is health.lua.
func TestArgoCDConfigMapMatchesHealthLua(t *testing.T) {
	script := readFile(t, healthLua)
	const key = "resource.customizations.health.kubetwin.io_DeviceTwin"

	var cm struct {
		Data map[string]string `json:"data"`
	}
	if err := yaml.Unmarshal([]byte(readFile(t, "config/argocd/argocd-cm.yaml")), &cm); err != nil {
		t.Fatal(err)
	}
	if cm.Data[key] != script {
		t.Errorf("config/argocd/argocd-cm.yaml %s differs from %s: regenerate it with\n"+
			"  sed 's/^/    /; s/^    $//' %s (below its header)", key, healthLua, healthLua)
	}

	// docs/gitops.md shows the same ConfigMap in a ```yaml block that holds the key.
	doc := readFile(t, "docs/gitops.md")
	found := false
	for _, block := range strings.Split(doc, "```yaml\n")[1:] {
		block = block[:strings.Index(block, "```")]
		if !strings.Contains(block, key+":") {
			continue
		}
		found = true
		var docCM struct {
			Data map[string]string `json:"data"`
		}
		if err := yaml.Unmarshal([]byte(block), &docCM); err != nil {
			t.Fatalf("docs/gitops.md argocd-cm block: %v", err)
		}
		if docCM.Data[key] != script {
			t.Errorf("docs/gitops.md argocd-cm block differs from %s", healthLua)
		}
	}
	if !found {
		t.Errorf("docs/gitops.md has no yaml block with %s", key)
	}
}
