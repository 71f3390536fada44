package helm

import (
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// TestQueryAPIChart: the query API's APIService leads to a Service whose
// port reaches the container port the operator serves it on; the operator
// may read the front-proxy CA and ask SubjectAccessReviews; view, edit and
// admin may create twinqueries. TLS: kube-apiserver verifies the server in
// every configuration, never insecureSkipTLSVerify: by default the
// operator issues the certificate and patches the caBundle (RBAC: that
// APIService by name, its own Secret by name); with cert-manager its own
// Certificate, the CA injected, the operator reading the Secret; with
// queryAPI.tls your Secret and caBundle. Off: none of it.
func TestQueryAPIChart(t *testing.T) {
	rel := release{name: "kubetwin", namespace: "kubetwin-system", prefix: "kubetwin"}
	svcName := rel.queryAPI()

	for _, c := range []struct {
		name        string
		args        []string
		certManager bool
		yours       bool
	}{
		{"operator-issued", nil, false, false},
		{"cert-manager", []string{"--set", "webhook.certificates.mode=cert-manager"}, true, false},
		{"your Secret", []string{"--set", "queryAPI.tls.secretName=my-query-cert", "--set", "queryAPI.tls.caBundle=Zm9v"}, false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			objs := render(t, rel.name, rel.namespace, c.args...)
			as := find(t, objs, "APIService", "v1alpha1.query.kubetwin.io")
			spec, _, _ := unstructured.NestedMap(as.Object, "spec")
			svcRef, _, _ := unstructured.NestedMap(spec, "service")
			if spec["group"] != "query.kubetwin.io" || spec["version"] != "v1alpha1" ||
				svcRef["name"] != svcName || svcRef["namespace"] != rel.namespace || fmt.Sprint(svcRef["port"]) != "443" {
				t.Fatalf("APIService spec %v", spec)
			}
			svc := &corev1.Service{}
			if err := k8sFromUnstructured(find(t, objs, "Service", svcName), svc); err != nil {
				t.Fatal(err)
			}
			if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 443 || svc.Spec.Ports[0].TargetPort.StrVal != "query-api" {
				t.Fatalf("Service ports %+v", svc.Spec.Ports)
			}
			d := &appsv1.Deployment{}
			if err := k8sFromUnstructured(find(t, objs, "Deployment", rel.manager()), d); err != nil {
				t.Fatal(err)
			}
			mc := d.Spec.Template.Spec.Containers[0]
			port := containerPort(t, mc, svc.Spec.Ports[0].TargetPort)
			wantArgs := []string{"--query-api-bind-address=:" + itoa(port), "--query-api-max-concurrent-queries=4",
				"--query-api-max-response-bytes=33554432"}
			if !c.certManager && !c.yours {
				wantArgs = append(wantArgs, "--query-api-apiservice-name=v1alpha1.query.kubetwin.io")
			}
			for _, a := range wantArgs {
				if !slices.Contains(mc.Args, a) {
					t.Errorf("args %v lack %s", mc.Args, a)
				}
			}
			if !slices.ContainsFunc(d.Spec.Template.Spec.Containers[0].Env, func(e corev1.EnvVar) bool { return e.Name == "POD_NAMESPACE" }) {
				t.Error("no POD_NAMESPACE")
			}

			if _, ok := spec["insecureSkipTLSVerify"]; ok {
				t.Fatalf("APIService spec has insecureSkipTLSVerify: %v", spec)
			}
			caBundle, _, _ := unstructured.NestedString(spec, "caBundle")
			inject := as.GetAnnotations()["cert-manager.io/inject-ca-from"]
			certDir := slices.Contains(mc.Args, "--query-api-cert-dir=/etc/kubetwin/query-api")
			managedArgs := []string{"--query-api-service-name=" + svcName, "--query-api-secret-name=" + svcName + "-server-cert"}
			checkQueryAPIRBAC(t, rel, objs, !c.certManager && !c.yours)
			switch {
			case c.yours:
				if caBundle != "Zm9v" || inject != "" || !certDir || slices.ContainsFunc(managedArgs, func(a string) bool { return slices.Contains(mc.Args, a) }) {
					t.Fatalf("your Secret: caBundle %q, inject %q, cert dir %v, args %v", caBundle, inject, certDir, mc.Args)
				}
			case c.certManager:
				cert := find(t, objs, "Certificate", svcName)
				dns, _, _ := unstructured.NestedStringSlice(cert.Object, "spec", "dnsNames")
				secret, _, _ := unstructured.NestedString(cert.Object, "spec", "secretName")
				if caBundle != "" || inject != rel.namespace+"/"+svcName || !certDir || !slices.Contains(dns, svcName+"."+rel.namespace+".svc") {
					t.Fatalf("cert-manager: caBundle %q, inject %q, cert dir %v, dnsNames %v", caBundle, inject, certDir, dns)
				}
				if !slices.ContainsFunc(d.Spec.Template.Spec.Volumes, func(v corev1.Volume) bool {
					return v.Secret != nil && v.Secret.SecretName == secret
				}) {
					t.Fatalf("no volume from the Certificate's Secret %s", secret)
				}
			default:
				// The operator patches caBundle: the chart must not set it
				// (Helm would then reset it on upgrade).
				if caBundle != "" || inject != "" || certDir {
					t.Fatalf("operator-issued: caBundle %q, inject %q, cert dir %v", caBundle, inject, certDir)
				}
				for _, a := range managedArgs {
					if !slices.Contains(mc.Args, a) {
						t.Errorf("args %v lack %s", mc.Args, a)
					}
				}
			}

			crb := &rbacv1.ClusterRoleBinding{}
			if err := k8sFromUnstructured(find(t, objs, "ClusterRoleBinding", rel.prefix+"-query-api-auth-delegator"), crb); err != nil {
				t.Fatal(err)
			}
			rb := &rbacv1.RoleBinding{}
			if err := k8sFromUnstructured(find(t, objs, "RoleBinding", rel.prefix+"-query-api-auth-reader"), rb); err != nil {
				t.Fatal(err)
			}
			for _, b := range []struct {
				role    rbacv1.RoleRef
				subject []rbacv1.Subject
				want    string
			}{{crb.RoleRef, crb.Subjects, "ClusterRole/system:auth-delegator"}, {rb.RoleRef, rb.Subjects, "Role/extension-apiserver-authentication-reader"}} {
				if b.role.Kind+"/"+b.role.Name != b.want || len(b.subject) != 1 || b.subject[0].Name != rel.sa() || b.subject[0].Namespace != rel.namespace {
					t.Errorf("binding %+v %+v, want %s for %s", b.role, b.subject, b.want, rel.sa())
				}
			}
			if rb.Namespace != "kube-system" {
				t.Errorf("the reader RoleBinding is in %q", rb.Namespace)
			}
			cr := &rbacv1.ClusterRole{}
			if err := k8sFromUnstructured(find(t, objs, "ClusterRole", rel.prefix+"-twinqueries-view"), cr); err != nil {
				t.Fatal(err)
			}
			for _, l := range []string{"view", "edit", "admin"} {
				if cr.Labels["rbac.authorization.k8s.io/aggregate-to-"+l] != "true" {
					t.Errorf("ClusterRole labels %v lack aggregate-to-%s", cr.Labels, l)
				}
			}
			if len(cr.Rules) != 1 || !slices.Equal(cr.Rules[0].APIGroups, []string{"query.kubetwin.io"}) ||
				!slices.Equal(cr.Rules[0].Resources, []string{"twinqueries"}) || !slices.Equal(cr.Rules[0].Verbs, []string{"create"}) {
				t.Errorf("ClusterRole rules %+v", cr.Rules)
			}
		})
	}

	t.Run("shard (watchNamespace)", func(t *testing.T) {
		objs := render(t, rel.name, rel.namespace, "--set", "watchNamespace=fleet-07")
		const group = "fleet-07.query.kubetwin.io"
		as := find(t, objs, "APIService", "v1alpha1."+group)
		if g, _, _ := unstructured.NestedString(as.Object, "spec", "group"); g != group {
			t.Errorf("APIService group %q, want %s", g, group)
		}
		if a := "--query-api-apiservice-name=v1alpha1." + group; !slices.Contains(deploymentArgs(t, objs), a) {
			t.Errorf("args %v lack %s", deploymentArgs(t, objs), a)
		}
		cr := &rbacv1.ClusterRole{}
		if err := k8sFromUnstructured(find(t, objs, "ClusterRole", rel.prefix+"-twinqueries-view"), cr); err != nil {
			t.Fatal(err)
		}
		if len(cr.Rules) != 1 || !slices.Equal(cr.Rules[0].APIGroups, []string{group}) {
			t.Errorf("twinqueries ClusterRole rules %+v, want the shard's group", cr.Rules)
		}
		ca := &rbacv1.ClusterRole{}
		if err := k8sFromUnstructured(find(t, objs, "ClusterRole", rel.prefix+"-query-api-ca"), ca); err != nil {
			t.Fatal(err)
		}
		if len(ca.Rules) != 1 || !slices.Equal(ca.Rules[0].ResourceNames, []string{"v1alpha1." + group}) {
			t.Errorf("caBundle ClusterRole rules %+v, want the shard's APIService", ca.Rules)
		}
	})

	// Two shards' releases: nothing cluster-scoped that one renders is
	// the other's, so both install side by side.
	t.Run("two shards", func(t *testing.T) {
		seen := map[string]string{}
		for _, sh := range []struct{ release, ns, watch string }{{"shard-a", "shard-a-system", "fleet-a"}, {"shard-b", "shard-b-system", "fleet-b"}} {
			for _, o := range render(t, sh.release, sh.ns, "--set", "watchNamespace="+sh.watch) {
				if o.GetNamespace() != "" || o.GetKind() == "CustomResourceDefinition" {
					continue // namespaced; the CRDs are shared (helm skips existing ones)
				}
				k := o.GetKind() + "/" + o.GetName()
				if other, ok := seen[k]; ok && other != sh.release {
					t.Errorf("%s rendered by both %s and %s", k, other, sh.release)
				}
				seen[k] = sh.release
			}
		}
		if _, ok := seen["APIService/v1alpha1.fleet-a.query.kubetwin.io"]; !ok {
			t.Errorf("no shard APIService among %v", seen)
		}
	})

	t.Run("off", func(t *testing.T) {
		objs := render(t, rel.name, rel.namespace, "--set", "queryAPI.enabled=false")
		for _, o := range objs {
			if o.GetKind() == "APIService" || strings.Contains(o.GetName(), "query-api") || strings.Contains(o.GetName(), "twinqueries") {
				t.Errorf("%s/%s rendered with queryAPI.enabled=false", o.GetKind(), o.GetName())
			}
		}
		for _, a := range deploymentArgs(t, objs) {
			if strings.HasPrefix(a, "--query-api") {
				t.Errorf("arg %s with queryAPI.enabled=false", a)
			}
		}
	})
}

func itoa(n int32) string { return strconv.Itoa(int(n)) }

// checkQueryAPIRBAC: when the operator issues the query API's certificate
// (managed) it may get and patch the APIService v1alpha1.query.kubetwin.io
// and no other, and create its Secret and get and update it by name; no
// rendered role grants apiservices otherwise, or on any other name.
func checkQueryAPIRBAC(t *testing.T, rel release, objs []*unstructured.Unstructured, managed bool) {
	t.Helper()
	var caRoles, certRoles int
	for _, o := range objs {
		if o.GetKind() != "ClusterRole" && o.GetKind() != "Role" {
			continue
		}
		var rules []rbacv1.PolicyRule
		if o.GetKind() == "ClusterRole" {
			cr := &rbacv1.ClusterRole{}
			if err := k8sFromUnstructured(o, cr); err != nil {
				t.Fatal(err)
			}
			rules = cr.Rules
		} else {
			r := &rbacv1.Role{}
			if err := k8sFromUnstructured(o, r); err != nil {
				t.Fatal(err)
			}
			rules = r.Rules
		}
		for _, r := range rules {
			if slices.Contains(r.Resources, "apiservices") || slices.Contains(r.Resources, "*") && !slices.Contains(r.APIGroups, "kubetwin.io") {
				if !managed || !slices.Equal(r.APIGroups, []string{"apiregistration.k8s.io"}) || !slices.Equal(r.Resources, []string{"apiservices"}) ||
					!slices.Equal(r.ResourceNames, []string{"v1alpha1.query.kubetwin.io"}) || !slices.Equal(r.Verbs, []string{"get", "patch"}) {
					t.Errorf("%s %s grants %+v (managed certificate: %v)", o.GetKind(), o.GetName(), r, managed)
				}
			}
		}
		switch o.GetName() {
		case rel.prefix + "-query-api-ca":
			caRoles++
			if len(rules) != 1 {
				t.Errorf("ClusterRole %s rules %+v, want only the APIService's", o.GetName(), rules)
			}
		case rel.prefix + "-query-api-certs":
			certRoles++
			want := []rbacv1.PolicyRule{
				{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create"}},
				{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{rel.queryAPI() + "-server-cert"}, Verbs: []string{"get", "update"}},
			}
			if o.GetNamespace() != rel.namespace || !reflect.DeepEqual(rules, want) {
				t.Errorf("Role %s/%s rules %+v, want %+v", o.GetNamespace(), o.GetName(), rules, want)
			}
		}
	}
	if want := map[bool]int{true: 1, false: 0}[managed]; caRoles != want || certRoles != want {
		t.Errorf("query API certificate roles: %d ClusterRole, %d Role; want %d each", caRoles, certRoles, want)
	}
	if !managed {
		return
	}
	for _, b := range []struct{ kind, role string }{{"ClusterRoleBinding", "ClusterRole"}, {"RoleBinding", "Role"}} {
		name := rel.prefix + map[string]string{"ClusterRole": "-query-api-ca", "Role": "-query-api-certs"}[b.role]
		rb := &rbacv1.RoleBinding{}
		if err := k8sFromUnstructured(find(t, objs, b.kind, name), rb); err != nil {
			t.Fatal(err)
		}
		if rb.RoleRef.Kind != b.role || rb.RoleRef.Name != name || len(rb.Subjects) != 1 || rb.Subjects[0].Name != rel.sa() || rb.Subjects[0].Namespace != rel.namespace {
			t.Errorf("%s %s: %+v %+v, want %s %s for %s", b.kind, name, rb.RoleRef, rb.Subjects, b.role, name, rel.sa())
		}
	}
}
