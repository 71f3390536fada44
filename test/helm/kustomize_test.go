package helm

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
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

	// The hub's Service: MQTT over TLS on 8883 and the service API on 443 (the port service SDKs always use), to
	// the container's ports of those names; the operator serves the service API for the hub's host name.
	svc := &corev1.Service{}
	if err := k8sFromUnstructured(find(t, objs, "Service", "kubetwin-mqtt"), svc); err != nil {
		t.Fatal(err)
	}
	d := &appsv1.Deployment{}
	if err := k8sFromUnstructured(find(t, objs, "Deployment", "kubetwin-controller-manager"), d); err != nil {
		t.Fatal(err)
	}
	mc := d.Spec.Template.Spec.Containers[0]
	ports := map[string]int32{}
	for _, p := range svc.Spec.Ports {
		ports[p.Name] = p.Port
		containerPort(t, mc, p.TargetPort)
	}
	if want := map[string]int32{"mqtts": 8883, "https": 443}; !reflect.DeepEqual(ports, want) {
		t.Errorf("Service kubetwin-mqtt ports %v, want %v", ports, want)
	}
	// Only the leader's broker listens: the hub Service selects the label it
	// puts on its own Pod, which it finds from the downward API.
	if svc.Spec.Selector[brokerLabel] != "active" {
		t.Errorf("Service kubetwin-mqtt selects %v, want %s=active", svc.Spec.Selector, brokerLabel)
	}
	if !slices.ContainsFunc(mc.Env, func(e corev1.EnvVar) bool {
		return e.Name == "POD_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.name"
	}) {
		t.Errorf("env %+v lacks POD_NAME from metadata.name", mc.Env)
	}
	if containerPort(t, mc, intstr.FromString("service-api")) != 10443 {
		t.Error("no container port service-api 10443")
	}
	for _, a := range []string{"--service-api-bind-address=:10443", "--service-hostname=kubetwin-mqtt.kubetwin-system.svc",
		"--hub-hostname=kubetwin-mqtt.kubetwin-system.svc", "--service-policies-secret=kubetwin-service-policies"} {
		if !slices.Contains(mc.Args, a) {
			t.Errorf("args %v lack %s", mc.Args, a)
		}
	}
}
