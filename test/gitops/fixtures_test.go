// Package gitops tests what GitOps tools make of a DeviceTwin's status: the
// Argo CD health check (config/argocd/health.lua, run with gopher-lua the way
// Argo CD runs it), Flux's kstatus, and the Flux health check expressions of
// config/flux (evaluated with cel-go the way kustomize-controller does).
// Nothing here needs an API server.
package gitops

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// repoRoot is the repository's top folder.
func repoRoot(t *testing.T) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the test file")
	}
	return filepath.Join(filepath.Dir(file), "..", "..")
}

func readFile(t *testing.T, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), rel))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// twinCase is a DeviceTwin as the operator leaves it in one situation, and
// what each tool should make of it.
type twinCase struct {
	name string
	twin *v1alpha1.DeviceTwin
	// argo is the Argo CD health status the Lua check must return.
	argo string
	// flux is the status kustomize-controller computes with the
	// healthCheckExprs of config/flux ("" when evaluation errors, which
	// kustomize-controller reports as Unknown and keeps waiting).
	flux string
	// kstatus is what plain kstatus (Flux without healthCheckExprs) computes.
	kstatus string
}

var now = metav1.NewTime(time.Date(2026, 5, 4, 12, 0, 0, 0, time.UTC))

func cond(typ string, status metav1.ConditionStatus, reason, msg string, gen int64) metav1.Condition {
	return metav1.Condition{Type: typ, Status: status, Reason: reason, Message: msg, ObservedGeneration: gen, LastTransitionTime: now}
}

// twin builds a DeviceTwin at generation gen with a status for observed
// (0: no status at all) and the given conditions.
func twin(gen, observed int64, conds ...metav1.Condition) *v1alpha1.DeviceTwin {
	t := &v1alpha1.DeviceTwin{
		TypeMeta: metav1.TypeMeta{APIVersion: v1alpha1.GroupVersion.String(), Kind: "DeviceTwin"},
		ObjectMeta: metav1.ObjectMeta{
			Name: "mydeviceid", Namespace: "devices", Generation: gen, CreationTimestamp: now,
			Finalizers: []string{"kubetwin.io/retained-desired"},
		},
	}
	if observed > 0 {
		t.Status = v1alpha1.DeviceTwinStatus{
			DeviceID: "myDeviceId", ObservedGeneration: observed, Conditions: conds,
			DesiredVersion: 2, DeviceDesiredVersion: 2, ReportedVersion: 7,
			ConnectionState: v1alpha1.ConnectionStateConnected,
		}
	}
	return t
}

var (
	connected    = cond(v1alpha1.ConditionConnected, metav1.ConditionTrue, v1alpha1.ReasonConnected, "device is connected", 3)
	disconnected = cond(v1alpha1.ConditionConnected, metav1.ConditionFalse, v1alpha1.ReasonDisconnected, "device is disconnected", 3)
)

// twinCases are the situations every tool is checked against. Messages are
// the operator's (controllers/devicetwin_status.go).
var twinCases = []twinCase{
	{
		name: "in sync",
		twin: twin(3, 3, connected, cond(v1alpha1.ConditionInSync, metav1.ConditionTrue, v1alpha1.ReasonInSync,
			"device reports every desired property of version 2", 3),
			cond(v1alpha1.ConditionReady, metav1.ConditionTrue, v1alpha1.ReasonInSync, "device reports every desired property of version 2", 3)),
		argo: "Healthy", flux: "Current", kstatus: "Current",
	},
	{
		name: "converging",
		twin: twin(3, 3, connected, cond(v1alpha1.ConditionInSync, metav1.ConditionFalse, v1alpha1.ReasonConverging,
			"1 desired properties not yet reported with their desired values", 3),
			cond(v1alpha1.ConditionReconciling, metav1.ConditionTrue, v1alpha1.ReasonConverging, "1 desired properties not yet reported with their desired values", 3)),
		argo: "Progressing", flux: "InProgress", kstatus: "InProgress",
	},
	{
		name: "desired not seen, device offline",
		twin: twin(3, 3, disconnected, cond(v1alpha1.ConditionInSync, metav1.ConditionFalse, v1alpha1.ReasonDesiredNotSeen,
			"device has not yet acknowledged desired version 2 (it has 1)", 3),
			cond(v1alpha1.ConditionReconciling, metav1.ConditionTrue, v1alpha1.ReasonDesiredNotSeen, "device has not yet acknowledged desired version 2 (it has 1)", 3)),
		argo: "Progressing", flux: "InProgress", kstatus: "InProgress",
	},
	{
		name: "not yet observed (no status)",
		twin: twin(1, 0),
		argo: "Progressing", flux: "", kstatus: "Current",
	},
	{
		name: "new generation not yet observed",
		twin: twin(4, 3, connected, cond(v1alpha1.ConditionInSync, metav1.ConditionTrue, v1alpha1.ReasonInSync,
			"device reports every desired property of version 2", 3)),
		argo: "Progressing", flux: "InProgress", kstatus: "InProgress",
	},
	{
		name: "refused desired state",
		twin: twin(3, 3, connected, cond(v1alpha1.ConditionInSync, metav1.ConditionFalse, v1alpha1.ReasonInvalidDesired,
			"not sent to the device: spec.desired.telemetry.intervals: arrays are not allowed in device twins", 3),
			cond(v1alpha1.ConditionStalled, metav1.ConditionTrue, v1alpha1.ReasonInvalidDesired, "not sent to the device: spec.desired.telemetry.intervals: arrays are not allowed in device twins", 3)),
		argo: "Degraded", flux: "Failed", kstatus: "Failed",
	},
	{
		name: "duplicate device id",
		twin: twin(1, 1,
			cond(v1alpha1.ConditionConnected, metav1.ConditionFalse, v1alpha1.ReasonDuplicateDeviceID,
				"device id myDeviceId belongs to DeviceTwin devices/older; this twin is not bridged", 1),
			cond(v1alpha1.ConditionInSync, metav1.ConditionTrue, v1alpha1.ReasonInSync,
				"device reports every desired property of version 0", 1),
			cond(v1alpha1.ConditionStalled, metav1.ConditionTrue, v1alpha1.ReasonDuplicateDeviceID,
				"device id myDeviceId belongs to DeviceTwin devices/older; this twin is not bridged", 1)),
		argo: "Degraded", flux: "Failed", kstatus: "Failed",
	},
}

// unstructuredTwin converts a twin the way a client reads it from the API
// server (integers as int64).
func unstructuredTwin(t *testing.T, tw *v1alpha1.DeviceTwin) *unstructured.Unstructured {
	t.Helper()
	m, err := k8sruntime.DefaultUnstructuredConverter.ToUnstructured(tw)
	if err != nil {
		t.Fatal(err)
	}
	// A twin the operator has not seen has no status object at all.
	if tw.Status.ObservedGeneration == 0 {
		delete(m, "status")
	}
	return &unstructured.Unstructured{Object: m}
}
