package webhook

import (
	"context"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// TestSecretRefsCheck: a secretRef to another twin's key Secret, or to an
// unlabelled Secret the reader can see, is refused with the field path and
// why; a labelled Secret no twin owns, a Secret the reader cannot see and
// an unchanged reference pass.
func TestSecretRefsCheck(t *testing.T) {
	s := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(s)
	_ = v1alpha1.AddToScheme(s)
	labelled := map[string]string{v1alpha1.DeviceKeysLabel: "true"}
	owned := []metav1.OwnerReference{{APIVersion: v1alpha1.GroupVersion.String(), Kind: "DeviceTwin", Name: "other", UID: "u"}}
	r := fake.NewClientBuilder().WithScheme(s).WithObjects(
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "other-device-key", Labels: labelled, OwnerReferences: owned}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "byo", Labels: labelled}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "plain"}},
	).Build()
	twinWith := func(ref string) *v1alpha1.DeviceTwin {
		tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "victim"}}
		if ref != "" {
			tw.Spec.Authentication = &v1alpha1.Authentication{SecretRef: &v1alpha1.SecretReference{Name: ref}}
		}
		return tw
	}
	for _, c := range []struct {
		old, ref, want string // want: "" allowed, else a part of the rule
	}{
		{"", "other-device-key", "Secret other-device-key is owned by DeviceTwin other"},
		{"byo", "other-device-key", "owned by DeviceTwin other"},
		{"", "plain", "Secret plain lacks the label kubetwin.io/device-keys=true"},
		{"", "byo", ""},
		{"", "missing", ""},
		{"", "", ""},
		{"other-device-key", "other-device-key", ""}, // unchanged: ratchet
	} {
		var old *v1alpha1.DeviceTwin
		if c.old != "" {
			old = twinWith(c.old)
		}
		err := SecretRefs{Reader: r}.Check(context.Background(), old, twinWith(c.ref))
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s -> %s: refused: %v", c.old, c.ref, err)
		case c.want != "" && (err == nil || err.Path != "spec.authentication.secretRef.name" || !strings.Contains(err.Rule, c.want)):
			t.Errorf("%s -> %s: got %v, want spec.authentication.secretRef.name: ...%s...", c.old, c.ref, err, c.want)
		}
	}
}
