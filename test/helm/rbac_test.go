package helm

import (
	"context"
	"slices"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// access is one question to the API server's authorizer.
type access struct {
	verb, group, resource, sub, ns, name string
}

func (a access) String() string {
	r := a.resource
	if a.group != "" {
		r = a.group + "/" + r
	}
	if a.sub != "" {
		r += "/" + a.sub
	}
	s := a.verb + " " + r
	if a.name != "" {
		s += " " + a.name
	}
	if a.ns == "" {
		return s + " (cluster-wide)"
	}
	return s + " in " + a.ns
}

// saGroups are the groups the API server gives a ServiceAccount's tokens.
func (r release) saGroups() []string {
	return []string{"system:serviceaccounts", "system:serviceaccounts:" + r.namespace, "system:authenticated"}
}

// allowed asks the authorizer (a SubjectAccessReview, what `kubectl auth
// can-i --as` asks) whether the release's ServiceAccount may do a.
func allowed(t *testing.T, rel release, a access) bool {
	t.Helper()
	sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
		User: rel.saUser(), Groups: rel.saGroups(),
		ResourceAttributes: &authorizationv1.ResourceAttributes{
			Verb: a.verb, Group: a.group, Resource: a.resource, Subresource: a.sub, Namespace: a.ns, Name: a.name,
		},
	}}
	if err := apiServer(t).Create(context.Background(), sar); err != nil {
		t.Fatal(err)
	}
	return sar.Status.Allowed
}

// rulesIn returns every rule that applies to the release's ServiceAccount
// in namespace ns (from Roles there and from ClusterRoles), as the API
// server lists them for the ServiceAccount itself (SelfSubjectRulesReview,
// impersonating it).
func rulesIn(t *testing.T, rel release, ns string) []authorizationv1.ResourceRule {
	t.Helper()
	cfg := *restConfig
	cfg.Impersonate.UserName = rel.saUser()
	cfg.Impersonate.Groups = rel.saGroups()
	asSA, err := client.New(&cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	rr := &authorizationv1.SelfSubjectRulesReview{Spec: authorizationv1.SelfSubjectRulesReviewSpec{Namespace: ns}}
	if err := asSA.Create(context.Background(), rr); err != nil {
		t.Fatal(err)
	}
	if rr.Status.Incomplete {
		t.Fatalf("rules of %s in %s are incomplete: %s", rel.sa(), ns, rr.Status.EvaluationError)
	}
	return rr.Status.ResourceRules
}

// TestInstallWatchNamespaceLeastPrivilege installs the chart with
// watchNamespace and asks the API server's authorizer, as the operator's
// ServiceAccount, what it may do: in any other namespace nothing but the
// cluster-scoped rights it cannot do without (its own webhook
// configurations by name, the metrics' token and access reviews); in the
// watched namespace the twins and their key Secrets; in its own namespace
// only its own objects, Secrets by name.
func TestInstallWatchNamespaceLeastPrivilege(t *testing.T) {
	rel := release{name: "scoped", namespace: "scoped-system", prefix: "scoped-kubetwin"}
	watch, tenant := "scoped-devices", "scoped-tenant"
	objs := render(t, rel.name, rel.namespace, "--set", "watchNamespace="+watch)
	for _, ns := range []string{rel.namespace, watch, tenant} {
		createNamespace(t, ns)
	}
	install(t, objs)

	// Everything that applies outside the two namespaces: only these
	// cluster-scoped rights (the self reviews and the public trust bundles
	// are every authenticated account's, from the API server's bootstrap
	// roles).
	outside := map[string][]string{
		"certificates.k8s.io/clustertrustbundles":                      {"get", "list", "watch"},
		"authorization.k8s.io/selfsubjectaccessreviews":                {"create"},
		"authorization.k8s.io/selfsubjectrulesreviews":                 {"create"},
		"authentication.k8s.io/selfsubjectreviews":                     {"create"},
		"authentication.k8s.io/tokenreviews":                           {"create"}, // --metrics-secure
		"authorization.k8s.io/subjectaccessreviews":                    {"create"}, // --metrics-secure
		"admissionregistration.k8s.io/validatingwebhookconfigurations": {"get", "update"},
		"admissionregistration.k8s.io/mutatingwebhookconfigurations":   {"get", "update"},
		"apiregistration.k8s.io/apiservices":                           {"get", "patch"}, // the query API's caBundle, by name
	}
	for _, ns := range []string{tenant, "default", "kube-system"} {
		for _, r := range rulesIn(t, rel, ns) {
			for _, g := range r.APIGroups {
				for _, res := range r.Resources {
					key := strings.TrimPrefix(g+"/"+res, "/")
					ok := outside[key] != nil
					for _, v := range r.Verbs {
						ok = ok && slices.Contains(outside[key], v)
					}
					if strings.HasSuffix(res, "webhookconfigurations") && !slices.Equal(r.ResourceNames, []string{rel.config()}) {
						ok = false
					}
					if res == "apiservices" && !slices.Equal(r.ResourceNames, []string{"v1alpha1." + watch + ".query.kubetwin.io"}) { // its shard's
						ok = false
					}
					if ns == "kube-system" && key == "configmaps" && slices.Equal(r.ResourceNames, []string{"extension-apiserver-authentication"}) {
						// The query API reads the front-proxy CA (extension-apiserver-authentication-reader).
						ok = !slices.ContainsFunc(r.Verbs, func(v string) bool { return v != "get" && v != "list" && v != "watch" })
					}
					if !ok {
						t.Errorf("in namespace %s the operator may %v %s (names %v)", ns, r.Verbs, key, r.ResourceNames)
					}
				}
			}
		}
	}
	// The same lists in the watched namespace do hold its twins and Secrets,
	// so the check above cannot pass for want of rules.
	var twins, secrets bool
	for _, r := range rulesIn(t, rel, watch) {
		twins = twins || slices.Contains(r.APIGroups, "kubetwin.io") && slices.Contains(r.Resources, "devicetwins")
		secrets = secrets || slices.Contains(r.APIGroups, "") && slices.Contains(r.Resources, "secrets")
	}
	if !twins || !secrets {
		t.Errorf("rules in the watched namespace %s: twins %v, Secrets %v; want both", watch, twins, secrets)
	}

	helmRecord := "sh.helm.release.v1." + rel.name + ".v1" // holds the release's values
	for _, c := range []struct {
		a    access
		want bool
	}{
		// Nothing of any other namespace, nor cluster-wide.
		{access{"get", "", "secrets", "", tenant, "x"}, false},
		{access{"list", "", "secrets", "", tenant, ""}, false},
		{access{"create", "", "secrets", "", "default", ""}, false},
		{access{"list", "", "secrets", "", "", ""}, false},
		{access{"watch", "", "secrets", "", "", ""}, false},
		{access{"get", "kubetwin.io", "devicetwins", "", tenant, "x"}, false},
		{access{"list", "kubetwin.io", "devicetwins", "", "", ""}, false},
		{access{"create", "kubetwin.io", "devicetwins", "", tenant, ""}, false},
		{access{"patch", "kubetwin.io", "devicetwins", "status", tenant, "x"}, false},
		{access{"update", "kubetwin.io", "devicetwins", "finalizers", tenant, "x"}, false},
		{access{"list", "kubetwin.io", "deviceidclaims", "", "", ""}, false},
		{access{"create", "kubetwin.io", "deviceidclaims", "", watch, ""}, false},
		{access{"create", "events.k8s.io", "events", "", tenant, ""}, false},
		{access{"get", "", "configmaps", "", tenant, rel.prefix + "-mqtt-ca"}, false},
		{access{"create", "coordination.k8s.io", "leases", "", tenant, ""}, false},
		{access{"patch", "", "pods", "", tenant, "x"}, false},
		{access{"update", "admissionregistration.k8s.io", "validatingwebhookconfigurations", "", "", "someone-elses"}, false},
		// The watched namespace: twins, their status and finalizers, key Secrets (no delete), events.
		{access{"list", "kubetwin.io", "devicetwins", "", watch, ""}, true},
		{access{"watch", "kubetwin.io", "devicetwins", "", watch, ""}, true},
		{access{"create", "kubetwin.io", "devicetwins", "", watch, ""}, true},
		{access{"delete", "kubetwin.io", "devicetwins", "", watch, "x"}, true},
		{access{"patch", "kubetwin.io", "devicetwins", "status", watch, "x"}, true},
		{access{"update", "kubetwin.io", "devicetwins", "finalizers", watch, "x"}, true},
		{access{"list", "", "secrets", "", watch, ""}, true},
		{access{"watch", "", "secrets", "", watch, ""}, true},
		{access{"create", "", "secrets", "", watch, ""}, true},
		{access{"update", "", "secrets", "", watch, "x-device-key"}, true},
		{access{"delete", "", "secrets", "", watch, "x-device-key"}, false},
		{access{"create", "events.k8s.io", "events", "", watch, ""}, true},
		// The release namespace: its own Secrets by name only, the hub CA's
		// ConfigMap, claims, leader election, its Pod's label.
		{access{"get", "", "secrets", "", rel.namespace, helmRecord}, false},
		{access{"list", "", "secrets", "", rel.namespace, ""}, false},
		{access{"create", "", "secrets", "", rel.namespace, ""}, true},
		{access{"get", "", "secrets", "", rel.namespace, rel.secret()}, true},
		{access{"update", "", "secrets", "", rel.namespace, rel.prefix + "-mqtt-server-cert"}, true},
		{access{"get", "", "secrets", "", rel.namespace, rel.policies()}, true},
		{access{"update", "", "secrets", "", rel.namespace, rel.policies()}, true},
		{access{"delete", "", "secrets", "", rel.namespace, rel.policies()}, false},
		{access{"update", "", "configmaps", "", rel.namespace, rel.prefix + "-mqtt-ca"}, true},
		{access{"get", "", "configmaps", "", rel.namespace, "other"}, false},
		{access{"get", "kubetwin.io", "deviceidclaims", "", rel.namespace, "id-x"}, true},
		{access{"list", "kubetwin.io", "deviceidclaims", "", rel.namespace, ""}, true},
		{access{"watch", "kubetwin.io", "deviceidclaims", "", rel.namespace, ""}, true},
		{access{"create", "kubetwin.io", "deviceidclaims", "", rel.namespace, ""}, true},
		{access{"update", "kubetwin.io", "deviceidclaims", "", rel.namespace, "id-x"}, true},
		{access{"delete", "kubetwin.io", "deviceidclaims", "", rel.namespace, "id-x"}, true},
		{access{"get", "kubetwin.io", "devicetwins", "", rel.namespace, "x"}, false},
		{access{"update", "coordination.k8s.io", "leases", "", rel.namespace, "kubetwin.kubetwin.io"}, true},
		{access{"patch", "", "pods", "", rel.namespace, rel.manager() + "-abc12"}, true},
		// Cluster-scoped: its own webhook configurations, by name; the metrics' reviews.
		{access{"update", "admissionregistration.k8s.io", "validatingwebhookconfigurations", "", "", rel.config()}, true},
		{access{"update", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "", "", rel.config()}, true},
		{access{"create", "authentication.k8s.io", "tokenreviews", "", "", ""}, true},
	} {
		if got := allowed(t, rel, c.a); got != c.want {
			t.Errorf("%s may %s: %v, want %v", rel.sa(), c.a, got, c.want)
		}
	}

	// The scoped roles grant the generated rules (config/rbac/role.yaml):
	// the ClusterRole's twin rules as a Role in the watched namespace, and
	// only the webhook configurations cluster-wide.
	kCluster, _ := generatedRoles(t)
	var wantTwins, wantCluster []rbacv1.PolicyRule
	for _, r := range kCluster {
		if slices.Contains(r.APIGroups, "admissionregistration.k8s.io") {
			r.ResourceNames = []string{rel.config()}
			wantCluster = append(wantCluster, r)
		} else {
			wantTwins = append(wantTwins, r)
		}
	}
	cr := get(t, &rbacv1.ClusterRole{}, "", rel.prefix+"-manager")
	twinsRole := get(t, &rbacv1.Role{}, watch, rel.prefix+"-manager-twins")
	for _, c := range []struct {
		what      string
		got, want []rbacv1.PolicyRule
	}{
		{"ClusterRole " + cr.Name, cr.Rules, wantCluster},
		{"Role " + watch + "/" + twinsRole.Name, twinsRole.Rules, wantTwins},
	} {
		if g, w := normalizedRules(c.got), normalizedRules(c.want); !slices.Equal(g, w) {
			t.Errorf("%s rules differ from config/rbac/role.yaml:\n got %v\nwant %v", c.what, g, w)
		}
	}

	// The webhooks see only the watched namespace's twins: this operator
	// claims no device id for another namespace's.
	v := get(t, &admissionv1.ValidatingWebhookConfiguration{}, "", rel.config())
	m := get(t, &admissionv1.MutatingWebhookConfiguration{}, "", rel.config())
	want := &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": watch}}
	for _, sel := range []*metav1.LabelSelector{v.Webhooks[0].NamespaceSelector, m.Webhooks[0].NamespaceSelector} {
		if sel == nil || len(sel.MatchExpressions) != 0 || len(sel.MatchLabels) != 1 ||
			sel.MatchLabels["kubernetes.io/metadata.name"] != watch {
			t.Errorf("webhook namespaceSelector %+v, want %+v", sel, want)
		}
	}
}
