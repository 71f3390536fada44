package helm

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// config/default (kustomize) builds, and the real API server accepts every
// object it makes (server-side dry run, in the namespace it names).
func TestKustomizeDefaultAccepted(t *testing.T) {
	c := apiServer(t)
	kubectl := filepath.Join(os.Getenv("KUBEBUILDER_ASSETS"), "kubectl")
	out, err := exec.Command(kubectl, "kustomize", filepath.Join(repoRoot(), "config", "default")).Output()
	if err != nil {
		t.Fatalf("kubectl kustomize config/default: %v", err)
	}
	objs := decodeObjects(t, string(out))
	ctx := context.Background()
	// A namespace of its own, so the chart tests' objects (same names in
	// kubetwin-system) cannot collide with these.
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "kustomize-"}}
	if err := c.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}
	kinds := map[string]bool{}
	for _, o := range objs {
		kinds[o.GetKind()] = true
		if o.GetNamespace() != "" {
			if o.GetNamespace() != "kubetwin-system" {
				t.Errorf("%s %s is in namespace %q, want kubetwin-system", o.GetKind(), o.GetName(), o.GetNamespace())
			}
			o.SetNamespace(ns.Name)
		}
		if err := c.Apply(ctx, client.ApplyConfigurationFromUnstructured(o.DeepCopy()), testFieldOwner, client.ForceOwnership, client.DryRunAll); err != nil {
			t.Errorf("%s %s/%s refused: %v", o.GetKind(), o.GetNamespace(), o.GetName(), err)
		}
	}
	for _, k := range []string{"CustomResourceDefinition", "Deployment", "Service", "ServiceAccount", "ClusterRole",
		"ClusterRoleBinding", "Role", "RoleBinding", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"} {
		if !kinds[k] {
			t.Errorf("config/default makes no %s", k)
		}
	}
}
