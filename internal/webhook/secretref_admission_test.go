package webhook_test

import (
	"context"
	"testing"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// TestSecretRefAdmission: through the API server, a twin whose secretRef
// names another twin's key Secret is refused on create and on update with
// the field path and why; a labelled Secret no twin owns is accepted.
func TestSecretRefAdmission(t *testing.T) {
	apiServer(t)
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	owner := newTwin(ns, "owner", "Sr-Owner", "", "")
	g.Expect(k8s.Create(ctx, owner)).To(Succeed())
	labelled := map[string]string{v1alpha1.DeviceKeysLabel: "true"}
	g.Expect(k8s.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: v1alpha1.KeySecretName("owner"), Labels: labelled,
		OwnerReferences: []metav1.OwnerReference{{APIVersion: v1alpha1.GroupVersion.String(), Kind: "DeviceTwin", Name: "owner", UID: owner.UID}}}})).To(Succeed())
	g.Expect(k8s.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "byo", Labels: labelled}})).To(Succeed())

	rule := "Secret owner-device-key is owned by DeviceTwin owner (it is that twin's key Secret); name a Secret labelled kubetwin.io/device-keys=true that no DeviceTwin owns"
	withRef := func(tw *v1alpha1.DeviceTwin, ref string) *v1alpha1.DeviceTwin {
		tw.Spec.Authentication = &v1alpha1.Authentication{SecretRef: &v1alpha1.SecretReference{Name: ref}}
		return tw
	}
	// The webhook sees the Secret through its cache: poll (dry run) until
	// it does, then create for real.
	g.Eventually(func(g Gomega) {
		err := k8s.Create(ctx, withRef(newTwin(ns, "victim", "Sr-Victim", "", ""), v1alpha1.KeySecretName("owner")), client.DryRunAll)
		expectRefused(g, err, nil, nil)
	}, "20s", "100ms").Should(Succeed())
	err := k8s.Create(ctx, withRef(newTwin(ns, "victim", "Sr-Victim", "", ""), v1alpha1.KeySecretName("owner")))
	expectRefused(g, err, []string{"spec.authentication.secretRef.name: " + rule}, []cause{{"spec.authentication.secretRef.name", rule}})

	tw := withRef(newTwin(ns, "victim", "Sr-Victim", "", ""), "byo")
	g.Expect(k8s.Create(ctx, tw)).To(Succeed())
	patch := client.MergeFrom(tw.DeepCopy())
	tw.Spec.Authentication.SecretRef.Name = v1alpha1.KeySecretName("owner")
	expectRefused(g, k8s.Patch(ctx, tw, patch), []string{"spec.authentication.secretRef.name: " + rule}, nil)
	stored, err := getTwin(t, ns, "victim")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(stored.Spec.Authentication.SecretRef.Name).To(Equal("byo"))
}
