package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// applyManifest creates the objects of a YAML file of the repository
// (kept if they exist).
func applyManifest(t *testing.T, rel string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, rel))
	if err != nil {
		t.Fatal(err)
	}
	for _, doc := range strings.Split(string(b), "\n---\n") {
		u := &unstructured.Unstructured{}
		if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		if len(u.Object) == 0 {
			continue
		}
		if err := k8s.Create(context.Background(), u); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatalf("%s: creating %s %s: %v", rel, u.GetKind(), u.GetName(), err)
		}
	}
}

// as returns a client that impersonates a user.
func as(t *testing.T, user string, groups ...string) client.Client {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfigPath)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: append(groups, "system:authenticated")}
	c, err := client.New(cfg, client.Options{Scheme: testScheme})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRBACRecipes checks the roles of docs/security.md against the API
// server: who can read twins, set desired properties, and manage devices
// and their keys.
func TestRBACRecipes(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	for _, f := range []string{
		"config/rbac/devicetwin_viewer_role.yaml", "config/rbac/devicetwin_desired_editor_role.yaml",
		"config/rbac/devicetwin_editor_role.yaml", "config/rbac/devicetwin_device_manager_role.yaml",
		"config/rbac/devicetwin_desired_only_policy.yaml",
	} {
		applyManifest(t, f)
	}
	ns := newNamespace(t)
	bind := func(user, group, role string) {
		rb := &rbacv1.RoleBinding{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: role + "-" + user + group},
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role},
		}
		if user != "" {
			rb.Subjects = append(rb.Subjects, rbacv1.Subject{Kind: "User", Name: user})
		} else {
			rb.Subjects = append(rb.Subjects, rbacv1.Subject{Kind: "Group", Name: group})
		}
		rb.Name = strings.ReplaceAll(rb.Name, ":", "-")
		g.Expect(k8s.Create(ctx, rb)).To(Succeed())
	}
	bind("vera", "", "devicetwin-viewer")
	bind("", "kubetwin:desired-editors", "devicetwin-desired-editor")
	bind("max", "", "devicetwin-device-manager")
	viewer, desired, manager := as(t, "vera"), as(t, "dora", "kubetwin:desired-editors"), as(t, "max")

	createTwin(t, ns, "rbac-1", "Rbac-1", `{"mode":"eco"}`)
	keys := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: v1alpha1.KeySecretName("rbac-1")},
		StringData: map[string]string{v1alpha1.ConnectionStringKey: "HostName=h;DeviceId=Rbac-1;SharedAccessKey=x"}}
	g.Expect(k8s.Create(ctx, keys)).To(Succeed())
	key := client.ObjectKey{Namespace: ns, Name: "rbac-1"}
	patch := func(c client.Client, p string) error {
		return c.Patch(ctx, &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "rbac-1"}},
			client.RawPatch(types.MergePatchType, []byte(p)))
	}
	secretOf := func(c client.Client) error {
		return c.Get(ctx, client.ObjectKeyFromObject(keys), &corev1.Secret{})
	}

	// Read twins: read, nothing else.
	g.Expect(viewer.Get(ctx, key, &v1alpha1.DeviceTwin{})).To(Succeed())
	g.Expect(apierrors.IsForbidden(patch(viewer, `{"spec":{"desired":{"mode":"boost"}}}`))).To(BeTrue())
	g.Expect(apierrors.IsForbidden(secretOf(viewer))).To(BeTrue(), "a viewer reads device keys")

	// Set desired: spec.desired only (the policy may take a moment to load).
	g.Expect(patch(desired, `{"spec":{"desired":{"mode":"boost"}}}`)).To(Succeed())
	n := 0
	g.Eventually(func() error { n++; return patch(desired, fmt.Sprintf(`{"spec":{"tags":{"n":%d}}}`, n)) }, wait, 200*time.Millisecond).
		Should(MatchError(ContainSubstring("spec.desired only, not spec.tags")))
	g.Expect(patch(desired, `{"spec":{"status":"disabled"}}`)).To(MatchError(ContainSubstring("not spec.status")))
	g.Expect(patch(desired, `{"spec":{"authentication":{"secretRef":{"name":"mine"}}}}`)).To(MatchError(ContainSubstring("not spec.authentication")))
	g.Expect(patch(desired, `{"spec":{"desired":{"mode":"eco"}}}`)).To(Succeed())
	g.Expect(apierrors.IsForbidden(secretOf(desired))).To(BeTrue(), "a desired editor reads device keys")
	g.Expect(apierrors.IsForbidden(desired.Delete(ctx, &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "rbac-1"}}))).To(BeTrue())

	// Manage devices: twins, their status and their keys; the policy does not apply.
	g.Expect(patch(manager, `{"spec":{"status":"disabled","tags":{"site":"x"}}}`)).To(Succeed())
	g.Expect(secretOf(manager)).To(Succeed())
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "rbac-2"}}
	g.Expect(manager.Create(ctx, tw)).To(Succeed())
	g.Expect(manager.Delete(ctx, tw)).To(Succeed())
	// Only in the namespaces it is bound in.
	g.Expect(apierrors.IsForbidden(manager.Get(ctx, client.ObjectKey{Namespace: "default", Name: "x"}, &corev1.Secret{}))).To(BeTrue())
}
