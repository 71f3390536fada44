package controllers

import (
	"slices"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/events"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// Events are API writes: at start-up with a fleet of twins, one per twin
// and condition would double what the operator writes. Only a condition
// that changes status or reason is worth one.
func TestRecordTransitionsOnlyOnRealTransitions(t *testing.T) {
	c := func(typ string, status metav1.ConditionStatus, reason string) metav1.Condition {
		return metav1.Condition{Type: typ, Status: status, Reason: reason, Message: reason}
	}
	never := c(v1alpha1.ConditionConnected, metav1.ConditionFalse, v1alpha1.ReasonNeverConnected)
	connected := c(v1alpha1.ConditionConnected, metav1.ConditionTrue, v1alpha1.ReasonConnected)
	insync := c(v1alpha1.ConditionInSync, metav1.ConditionTrue, v1alpha1.ReasonInSync)
	invalid := c(v1alpha1.ConditionInSync, metav1.ConditionFalse, v1alpha1.ReasonInvalidDesired)
	ready := c(v1alpha1.ConditionReady, metav1.ConditionTrue, v1alpha1.ReasonInSync)
	notReady := c(v1alpha1.ConditionReady, metav1.ConditionFalse, v1alpha1.ReasonInvalidDesired)
	stalled := c(v1alpha1.ConditionStalled, metav1.ConditionTrue, v1alpha1.ReasonInvalidDesired)
	keys := c(v1alpha1.ConditionCredentialsReady, metav1.ConditionTrue, v1alpha1.ReasonKeysReady)

	cases := map[string]struct {
		old, next []metav1.Condition
		want      []string // "type reason" of each event
	}{
		"a twin's first status":              {nil, []metav1.Condition{never, insync, ready}, nil},
		"a twin's first status, invalid":     {nil, []metav1.Condition{never, invalid, notReady, stalled}, nil},
		"restart, nothing changed":           {[]metav1.Condition{never, insync, ready}, []metav1.Condition{never, insync, ready}, nil},
		"a condition reported for the first": {[]metav1.Condition{never, insync, ready}, []metav1.Condition{never, insync, ready, keys}, nil},
		"the device connects":                {[]metav1.Condition{never, insync, ready}, []metav1.Condition{connected, insync, ready}, []string{"Normal Connected"}},
		"desired becomes invalid": {[]metav1.Condition{connected, insync, ready}, []metav1.Condition{connected, invalid, notReady, stalled},
			[]string{"Warning InvalidDesired"}},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			rec := events.NewFakeRecorder(10)
			r := &DeviceTwinReconciler{Recorder: rec}
			tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "t"}}
			r.recordTransitions(tw, v1alpha1.DeviceTwinStatus{Conditions: tc.old}, v1alpha1.DeviceTwinStatus{Conditions: tc.next})
			close(rec.Events)
			var got []string
			for e := range rec.Events {
				f := strings.Fields(e) // "<type> <reason> <action> <message>"
				got = append(got, f[0]+" "+f[1])
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("events %q, want %q", got, tc.want)
			}
		})
	}
}
