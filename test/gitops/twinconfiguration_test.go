package gitops

import (
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// configuration builds a TwinConfiguration at generation gen with a status
// for observed (0: no status) and the given conditions, as the operator
// writes them (controllers/twinconfiguration_status.go: Reconciling and
// Stalled only when True).
func configuration(gen, observed int64, conds ...metav1.Condition) *unstructured.Unstructured {
	c := &v1alpha1.TwinConfiguration{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.GroupVersion.String(), Kind: "TwinConfiguration"},
		ObjectMeta: metav1.ObjectMeta{Name: "firmware", Namespace: "devices", Generation: gen, CreationTimestamp: now},
	}
	c.Status = v1alpha1.TwinConfigurationStatus{ObservedGeneration: observed, TargetedCount: 10, AppliedCount: 4, InSyncCount: 3, Conditions: conds}
	m, err := k8sruntime.DefaultUnstructuredConverter.ToUnstructured(c)
	if err != nil {
		panic(err)
	}
	if observed == 0 {
		delete(m, "status")
	}
	return &unstructured.Unstructured{Object: m}
}

// configConds returns Ready, Progressing and, when set, Reconciling or
// Stalled, all with the same reason and message.
func configConds(gen int64, ready, progressing metav1.ConditionStatus, reconciling, stalled bool, reason, msg string) []metav1.Condition {
	out := []metav1.Condition{
		cond(v1alpha1.ConditionReady, ready, reason, msg, gen),
		cond(v1alpha1.ConfigConditionProgressing, progressing, reason, msg, gen),
	}
	if reconciling {
		out = append(out, cond(v1alpha1.ConditionReconciling, metav1.ConditionTrue, reason, msg, gen))
	}
	if stalled {
		out = append(out, cond(v1alpha1.ConditionStalled, metav1.ConditionTrue, reason, msg, gen))
	}
	return out
}

var configCases = []struct {
	name          string
	obj           *unstructured.Unstructured
	argo, kstatus string
	argoMessage   string
}{
	{"applied and in sync", configuration(2, 2, configConds(2, "True", "False", false, false, v1alpha1.ReasonApplied,
		"4 twins have the content and report it back (10 targeted)")...),
		"Healthy", "Current", "4 twins have the content and report it back (10 targeted)"},
	{"applying", configuration(2, 2, configConds(2, "False", "True", true, false, v1alpha1.ReasonApplying,
		"6 of 10 targeted twins are being given the content")...),
		"Progressing", "InProgress", "6 of 10 targeted twins are being given the content"},
	{"waiting for devices", configuration(2, 2, configConds(2, "False", "True", true, false, v1alpha1.ReasonWaitingForDevices,
		"3 of 4 twins with the content report it back")...),
		"Progressing", "InProgress", "3 of 4 twins with the content report it back"},
	{"rollout paused", configuration(2, 2, configConds(2, "False", "False", false, false, v1alpha1.ReasonRolloutPaused,
		"rollout paused: 6 targeted twins wait for the content")...),
		"Suspended", "InProgress", "rollout paused: 6 targeted twins wait for the content"},
	{"rollout halted", configuration(2, 2, configConds(2, "False", "False", false, true, v1alpha1.ReasonRolloutHalted,
		"metric failed counts 2 twins, more than the 0 allowed: 6 targeted twins wait for the content")...),
		"Degraded", "Failed", "metric failed counts 2 twins, more than the 0 allowed: 6 targeted twins wait for the content"},
	{"invalid", configuration(2, 2, configConds(2, "False", "False", false, true, v1alpha1.ReasonInvalidConfiguration,
		"spec.targetCondition: line 1, column 10: unexpected =")...),
		"Degraded", "Failed", "spec.targetCondition: line 1, column 10: unexpected ="},
	{"not yet observed", configuration(1, 0), "Progressing", "Current",
		"Waiting for the kubetwin operator to see generation 1 of the configuration"},
	{"new generation not yet observed", configuration(3, 2, configConds(2, "True", "False", false, false, v1alpha1.ReasonApplied, "done")...),
		"Progressing", "InProgress", "Waiting for the kubetwin operator to see generation 3 of the configuration"},
}

// TestArgoCDHealthTwinConfiguration: the health check, registered for
// TwinConfiguration too, shows a rollout's state in Argo CD.
func TestArgoCDHealthTwinConfiguration(t *testing.T) {
	script := readFile(t, healthLua)
	for _, tc := range configCases {
		t.Run(tc.name, func(t *testing.T) {
			got, msg, err := argoHealth(script, tc.obj)
			if err != nil {
				t.Fatalf("health.lua failed: %v", err)
			}
			if got != tc.argo || msg != tc.argoMessage {
				t.Errorf("health = %s (%q), want %s (%q)", got, msg, tc.argo, tc.argoMessage)
			}
		})
	}
}

// TestKstatusTwinConfiguration: Flux (kstatus) sees a rollout in progress
// (a paused one too: Ready is False), and a halted or invalid
// configuration as Failed.
func TestKstatusTwinConfiguration(t *testing.T) {
	for _, tc := range configCases {
		t.Run(tc.name, func(t *testing.T) {
			res, err := status.Compute(tc.obj)
			if err != nil {
				t.Fatal(err)
			}
			if string(res.Status) != tc.kstatus {
				t.Errorf("kstatus = %s (%s), want %s", res.Status, res.Message, tc.kstatus)
			}
		})
	}
}

// TestArgoCDConfigMapTwinConfiguration: argocd-cm registers the same script
// for TwinConfiguration.
func TestArgoCDConfigMapTwinConfiguration(t *testing.T) {
	var cm struct {
		Data map[string]string `json:"data"`
	}
	if err := yaml.Unmarshal([]byte(readFile(t, "config/argocd/argocd-cm.yaml")), &cm); err != nil {
		t.Fatal(err)
	}
	if cm.Data["resource.customizations.health.kubetwin.io_TwinConfiguration"] != readFile(t, healthLua) {
		t.Errorf("config/argocd/argocd-cm.yaml has no resource.customizations.health.kubetwin.io_TwinConfiguration equal to %s", healthLua)
	}
}
