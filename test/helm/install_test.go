package helm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

const testFieldOwner = client.FieldOwner("kubetwin-chart-test")

// install server-side applies every object into the API server and fails
// the test on the first one it refuses. It removes the cluster-scoped
// objects at the end of the test (the webhook configurations would
// otherwise intercept the next test's twins).
func install(t *testing.T, objs []*unstructured.Unstructured) {
	t.Helper()
	c := apiServer(t)
	ctx := context.Background()
	for _, o := range objs {
		if err := c.Apply(ctx, client.ApplyConfigurationFromUnstructured(o.DeepCopy()), testFieldOwner, client.ForceOwnership); err != nil {
			t.Fatalf("the API server refused %s %s: %v", o.GetKind(), o.GetName(), err)
		}
		if o.GetNamespace() == "" {
			obj := o.DeepCopy()
			t.Cleanup(func() { _ = c.Delete(context.Background(), obj) })
		}
	}
}

// get reads a typed object from the API server.
func get[T client.Object](t *testing.T, obj T, namespace, name string) T {
	t.Helper()
	if err := apiServer(t).Get(context.Background(), types.NamespacedName{Namespace: namespace, Name: name}, obj); err != nil {
		t.Fatalf("reading %T %s/%s: %v", obj, namespace, name, err)
	}
	return obj
}

func createNamespace(t *testing.T, name string) {
	t.Helper()
	err := apiServer(t).Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

// release names the objects of one installed configuration.
type release struct {
	name, namespace, prefix string
}

func (r release) sa() string         { return r.prefix + "-controller-manager" }
func (r release) saUser() string     { return "system:serviceaccount:" + r.namespace + ":" + r.sa() }
func (r release) webhook() string    { return r.prefix + "-webhook-service" }
func (r release) config() string     { return r.prefix + "-admission" }
func (r release) secret() string     { return r.prefix + "-webhook-server-cert" }
func (r release) manager() string    { return r.prefix + "-controller-manager" }
func (r release) mqtt() string       { return r.prefix + "-mqtt" }
func (r release) metrics() string    { return r.prefix + "-metrics-service" }
func (r release) certName() string   { return r.prefix + "-serving-cert" }
func (r release) serviceAPI() string { return r.prefix + "-service-api" }
func (r release) policies() string   { return r.prefix + "-service-policies" }
func (r release) queryAPI() string   { return r.prefix + "-query-api" }

// TestInstallDefaults installs what helm template renders with the default
// values (release kubetwin in kubetwin-system, so the names are those of
// config/default) into the API server and checks every object.
func TestInstallDefaults(t *testing.T) {
	rel := release{name: "kubetwin", namespace: "kubetwin-system", prefix: "kubetwin"}
	objs := render(t, rel.name, rel.namespace)
	wantKinds(t, objs, map[string]int{
		// +1 ClusterRole, ClusterRoleBinding, Role, RoleBinding: the query API's certificate (queryapi_test.go)
		"ServiceAccount": 1, "ClusterRole": 8, "ClusterRoleBinding": 4, "Role": 3, "RoleBinding": 4,
		"Service": 4, "Deployment": 1, "ValidatingWebhookConfiguration": 1, "MutatingWebhookConfiguration": 1,
		"APIService": 1, // the query API (queryapi_test.go)
	})
	createNamespace(t, rel.namespace)
	probe := createProbeTwin(t, rel.namespace)
	install(t, objs)

	d := get(t, &appsv1.Deployment{}, rel.namespace, rel.manager())
	c := checkDeployment(t, rel, d, 1)
	args := c.Args
	svcDNS := rel.mqtt() + "." + rel.namespace + ".svc"
	for _, a := range []string{
		// MQTT over TLS with the operator's own certificate, SAS tokens for the MQTT Service's name.
		"--mqtt-tls-bind-address=:8883",
		"--device-auth=sas",
		"--hub-hostname=" + svcDNS,
		"--mqtt-tls-host=" + strings.Join([]string{rel.mqtt(), rel.mqtt() + "." + rel.namespace, svcDNS, svcDNS + ".cluster.local"}, ","),
		"--mqtt-tls-secret-name=" + rel.prefix + "-mqtt-server-cert",
		"--mqtt-tls-secret-namespace=" + rel.namespace,
		"--mqtt-tls-ca-configmap=" + rel.prefix + "-mqtt-ca",
		"--webhook-secret-name=" + rel.secret(),
		"--webhook-cert-validity=2160h",
		// The service API on one host name with MQTT (the hub's), behind the MQTT Service's 443.
		"--service-api-bind-address=:10443",
		"--service-hostname=" + svcDNS,
		"--service-policies-secret=" + rel.policies(),
		"--service-policies-namespace=" + rel.namespace,
		"--registry-namespace=" + rel.namespace,
		"--claims-namespace=" + rel.namespace, // where the Role grants DeviceIDClaims
	} {
		if !slices.Contains(args, a) {
			t.Errorf("args %v lack %s", args, a)
		}
	}
	for _, a := range args {
		// No plain listener, no certificate files: the operator issues the broker's certificate.
		if strings.HasPrefix(a, "--broker-") || a == "--webhook-manage-certs=false" || strings.HasPrefix(a, "--mqtt-bind-address") ||
			strings.HasPrefix(a, "--mqtt-tls-cert-file") || strings.HasPrefix(a, "--mqtt-tls-key-file") {
			t.Errorf("default args hold %s", a)
		}
	}
	// The container serves MQTT over TLS on 8883, the service API on 10443 and nothing on 1883.
	if containerPort(t, c, intstr.FromString("mqtts")) != 8883 {
		t.Error("no container port mqtts 8883")
	}
	if containerPort(t, c, intstr.FromString("service-api")) != 10443 {
		t.Error("no container port service-api 10443")
	}
	for _, p := range c.Ports {
		if p.Name == "mqtt" || p.ContainerPort == 1883 {
			t.Errorf("the default container exposes plain MQTT: %+v", p)
		}
	}
	for _, v := range d.Spec.Template.Spec.Volumes {
		if v.Name == "mqtt-tls" {
			t.Errorf("default Deployment mounts a user MQTT certificate: %+v", v)
		}
	}
	certs := volume(t, d, "webhook-certs")
	if certs.EmptyDir == nil {
		t.Errorf("webhook-certs is %+v, want an emptyDir the operator writes its certificate to", certs.VolumeSource)
	}

	// Services: the hub's (MQTT over TLS 8883, the service API on 443), webhook 443 -> 9443, metrics 8443.
	checkService(t, rel, rel.mqtt(), d, map[string]int32{"mqtts": 8883, "service-api": 443})
	if p := servicePort(t, rel, rel.mqtt(), "https"); p == nil || p.Port != 443 || p.TargetPort != intstr.FromString("service-api") {
		t.Errorf("MQTT Service port https = %+v, want 443 -> service-api (service SDKs always use 443)", p)
	}
	if err := apiServer(t).Get(context.Background(), types.NamespacedName{Namespace: rel.namespace, Name: rel.serviceAPI()}, &corev1.Service{}); !apierrors.IsNotFound(err) {
		t.Errorf("a separate service API Service with the embedded broker: %v", err)
	}
	checkService(t, rel, rel.webhook(), d, map[string]int32{"webhook-server": 443})
	checkService(t, rel, rel.metrics(), d, map[string]int32{"metrics": 8443})
	checkBrokerRouting(t, rel, c, true)

	checkWebhooks(t, rel, false)
	checkRBACMatchesKustomize(t, rel)
	checkAccess(t, rel, true)
	checkAdmission(t, rel, probe)
}

// TestInstallExternalBrokerCertManager installs the external-broker and
// cert-manager configuration. The cert-manager CRDs are not in the API
// server, so its Issuer and Certificate are checked as rendered; every other
// object is installed and checked.
func TestInstallExternalBrokerCertManager(t *testing.T) {
	rel := release{name: "twins", namespace: "iot", prefix: "twins-kubetwin"}
	objs := render(t, rel.name, rel.namespace, "-f", writeValues(t, externalValues))
	wantKinds(t, objs, map[string]int{
		"ServiceAccount": 1, "ClusterRole": 7, "ClusterRoleBinding": 3, "Role": 2, "RoleBinding": 3,
		"Service": 4, "Deployment": 1, "ValidatingWebhookConfiguration": 1, "MutatingWebhookConfiguration": 1,
		"APIService":  1, // the query API (queryapi_test.go)
		"Certificate": 2, "Issuer": 1,
	})

	var rest []*unstructured.Unstructured
	for _, o := range objs {
		if o.GroupVersionKind().Group != "cert-manager.io" {
			rest = append(rest, o)
		}
	}
	cert := find(t, objs, "Certificate", rel.certName())
	issuer := find(t, objs, "Issuer", rel.prefix+"-selfsigned-issuer")
	checkCertManager(t, rel, cert, issuer)

	createNamespace(t, rel.namespace)
	probe := createProbeTwin(t, rel.namespace)
	install(t, rest)

	d := get(t, &appsv1.Deployment{}, rel.namespace, rel.manager())
	c := checkDeployment(t, rel, d, 2)
	apiDNS := rel.serviceAPI() + "." + rel.namespace + ".svc"
	for _, a := range []string{
		"--broker-url=ssl://mosquitto.mqtt.svc:8883",
		"--broker-client-id=kubetwin-operator",
		"--broker-username=kubetwin",
		"--broker-password-file=/etc/kubetwin/broker-password/password",
		"--broker-ca-file=/etc/kubetwin/broker-ca/ca.crt",
		"--broker-cert-file=/etc/kubetwin/broker-client/tls.crt",
		"--broker-key-file=/etc/kubetwin/broker-client/tls.key",
		"--webhook-manage-certs=false",
		"--device-auth=sas",
		"--hub-hostname=mosquitto.mqtt.svc", // the broker URL's host
		// The service API has a Service and host name of its own; the operator issues its certificate.
		"--service-api-bind-address=:10443",
		"--service-hostname=" + apiDNS,
		"--service-policies-secret=" + rel.policies(),
		"--service-policies-namespace=" + rel.namespace,
		"--registry-namespace=" + rel.namespace,
		"--mqtt-tls-host=" + strings.Join([]string{rel.serviceAPI(), rel.serviceAPI() + "." + rel.namespace, apiDNS, apiDNS + ".cluster.local"}, ","),
		"--mqtt-tls-secret-name=" + rel.prefix + "-mqtt-server-cert",
		"--mqtt-tls-secret-namespace=" + rel.namespace,
		"--mqtt-tls-ca-configmap=" + rel.prefix + "-mqtt-ca",
	} {
		if !slices.Contains(c.Args, a) {
			t.Errorf("args %v lack %s", c.Args, a)
		}
	}
	for _, a := range c.Args {
		// No embedded broker listeners, no certificate files.
		if strings.HasPrefix(a, "--mqtt-tls-bind-address") || strings.HasPrefix(a, "--mqtt-bind-address") ||
			strings.HasPrefix(a, "--mqtt-tls-cert-file") || strings.HasPrefix(a, "--webhook-secret-name") {
			t.Errorf("external/cert-manager args hold %s", a)
		}
	}
	for _, p := range c.Ports {
		if p.Name == "mqtt" || p.Name == "mqtts" {
			t.Errorf("the operator exposes an MQTT port with an external broker")
		}
	}
	if containerPort(t, c, intstr.FromString("service-api")) != 10443 {
		t.Error("no container port service-api 10443")
	}
	// Every file the flags name is mounted from its Secret.
	for vol, secret := range map[string]string{
		"broker-password": "mqtt-password", "broker-ca": "mqtt-ca", "broker-client": "mqtt-client",
		"webhook-certs": cert.Object["spec"].(map[string]any)["secretName"].(string),
	} {
		v := volume(t, d, vol)
		if v.Secret == nil || v.Secret.SecretName != secret {
			t.Errorf("volume %s = %+v, want Secret %s", vol, v.VolumeSource, secret)
		}
		if !mounted(c, vol, true) {
			t.Errorf("volume %s is not mounted read-only", vol)
		}
	}
	// Placement values reach the pod.
	if d.Spec.Template.Spec.NodeSelector["kubernetes.io/os"] != "linux" {
		t.Errorf("nodeSelector = %v", d.Spec.Template.Spec.NodeSelector)
	}
	if tol := d.Spec.Template.Spec.Tolerations; len(tol) != 1 || tol[0].Key != "dedicated" || tol[0].Effect != corev1.TaintEffectNoSchedule {
		t.Errorf("tolerations = %+v", tol)
	}
	if a := d.Spec.Template.Spec.Affinity; a == nil || a.PodAntiAffinity == nil {
		t.Errorf("affinity = %+v", a)
	}

	// No MQTT Service: devices use the external broker. Back ends reach the service API on 443 of its own Service.
	if err := apiServer(t).Get(context.Background(), types.NamespacedName{Namespace: rel.namespace, Name: rel.mqtt()}, &corev1.Service{}); !apierrors.IsNotFound(err) {
		t.Errorf("MQTT Service with an external broker: %v", err)
	}
	checkService(t, rel, rel.serviceAPI(), d, map[string]int32{"service-api": 443})
	if p := servicePort(t, rel, rel.serviceAPI(), "https"); p == nil || p.Port != 443 {
		t.Errorf("service API Service port https = %+v, want 443", p)
	}
	checkService(t, rel, rel.webhook(), d, map[string]int32{"webhook-server": 443})
	checkService(t, rel, rel.metrics(), d, map[string]int32{"metrics": 8443})
	checkBrokerRouting(t, rel, c, false)

	checkWebhooks(t, rel, true)
	checkAccess(t, rel, false)
	checkAdmission(t, rel, probe)
}

func wantKinds(t *testing.T, objs []*unstructured.Unstructured, want map[string]int) {
	t.Helper()
	got := map[string]int{}
	for _, o := range objs {
		got[o.GetKind()]++
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("rendered kinds %v, want %v\n%v", got, want, names(objs))
	}
}

// checkDeployment checks what every configuration shares and returns the
// manager container.
func checkDeployment(t *testing.T, rel release, d *appsv1.Deployment, replicas int32) corev1.Container {
	t.Helper()
	if d.Spec.Replicas == nil || *d.Spec.Replicas != replicas {
		t.Errorf("replicas = %v, want %d", d.Spec.Replicas, replicas)
	}
	ps := d.Spec.Template.Spec
	if ps.ServiceAccountName != rel.sa() {
		t.Errorf("serviceAccountName = %q, want %q", ps.ServiceAccountName, rel.sa())
	}
	get(t, &corev1.ServiceAccount{}, rel.namespace, rel.sa())
	if sc := ps.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot ||
		sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("pod securityContext = %+v, want runAsNonRoot and seccomp RuntimeDefault", sc)
	}
	if len(ps.Containers) != 1 || ps.Containers[0].Name != "manager" {
		t.Fatalf("containers = %+v, want one named manager", ps.Containers)
	}
	c := ps.Containers[0]
	if c.Image != "ghcr.io/kubetwin/kubetwin:v0.1.0" || c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("image %s (%s), want ghcr.io/kubetwin/kubetwin:v0.1.0 (IfNotPresent)", c.Image, c.ImagePullPolicy)
	}
	if !slices.Equal(c.Command, []string{"/manager"}) {
		t.Errorf("command = %v, want /manager (the Dockerfile's binary)", c.Command)
	}
	sc := c.SecurityContext
	switch {
	case sc == nil:
		t.Error("no container securityContext")
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Error("root filesystem is not read-only")
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Error("privilege escalation allowed")
	case sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0:
		t.Errorf("capabilities = %+v, want drop ALL", sc.Capabilities)
	case sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot:
		t.Error("container may run as root")
	}
	for _, a := range []string{
		"--leader-elect", "--health-probe-bind-address=:8081", "--metrics-bind-address=:8443",
		"--webhook-port=9443", "--webhook-cert-dir=/tmp/k8s-webhook-server/serving-certs",
		"--webhook-service-name=" + rel.webhook(), "--webhook-config-name=" + rel.config(),
	} {
		if !slices.Contains(c.Args, a) {
			t.Errorf("args %v lack %s", c.Args, a)
		}
	}
	// Probes on 8081, the port of --health-probe-bind-address.
	for name, p := range map[string]*corev1.Probe{"/healthz": c.LivenessProbe, "/readyz": c.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != name || containerPort(t, c, p.HTTPGet.Port) != 8081 {
			t.Errorf("probe %s = %+v, want an HTTP GET of %s on 8081", name, p, name)
		}
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("resources = %+v, want requests and a memory limit", c.Resources)
	}
	var podNS bool
	for _, e := range c.Env {
		if e.Name == "POD_NAMESPACE" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.namespace" {
			podNS = true
		}
	}
	if !podNS {
		t.Errorf("env %+v lacks POD_NAMESPACE from metadata.namespace", c.Env)
	}
	if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
		return m.Name == "webhook-certs" && m.MountPath == "/tmp/k8s-webhook-server/serving-certs"
	}) {
		t.Errorf("webhook-certs is not mounted at --webhook-cert-dir: %+v", c.VolumeMounts)
	}
	// The selector matches the pod template.
	sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	if err != nil || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
		t.Errorf("selector %v does not match the pod labels %v", d.Spec.Selector, d.Spec.Template.Labels)
	}
	return c
}

func containerPort(t *testing.T, c corev1.Container, p intstr.IntOrString) int32 {
	t.Helper()
	if p.Type == intstr.Int {
		return p.IntVal
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort
		}
	}
	t.Errorf("container has no port named %s", p.StrVal)
	return 0
}

func volume(t *testing.T, d *appsv1.Deployment, name string) corev1.Volume {
	t.Helper()
	for _, v := range d.Spec.Template.Spec.Volumes {
		if v.Name == name {
			return v
		}
	}
	t.Fatalf("no volume %s in %+v", name, d.Spec.Template.Spec.Volumes)
	return corev1.Volume{}
}

func mounted(c corev1.Container, vol string, readOnly bool) bool {
	return slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.Name == vol && m.ReadOnly == readOnly })
}

// checkService checks that a Service selects the operator's pods and maps
// each of its ports to the named container port: want maps the container
// port's name to the Service port.
func checkService(t *testing.T, rel release, name string, d *appsv1.Deployment, want map[string]int32) {
	t.Helper()
	s := get(t, &corev1.Service{}, rel.namespace, name)
	for k, v := range s.Spec.Selector {
		if k == brokerLabel && name == rel.mqtt() {
			continue // set by the leader on its own Pod (checkBrokerRouting)
		}
		if d.Spec.Template.Labels[k] != v {
			t.Errorf("Service %s selects %s=%s, which the pods do not have", name, k, v)
		}
	}
	c := d.Spec.Template.Spec.Containers[0]
	if len(s.Spec.Ports) != len(want) {
		t.Errorf("Service %s ports %+v, want %v", name, s.Spec.Ports, want)
	}
	for _, p := range s.Spec.Ports {
		target := p.TargetPort.StrVal
		if port, ok := want[target]; !ok || p.Port != port {
			t.Errorf("Service %s port %d -> %s, want %v", name, p.Port, target, want)
		}
		containerPort(t, c, p.TargetPort)
	}
}

// brokerLabel is the label the leader puts on its own Pod once its
// embedded broker listens (operator.BrokerLabel).
const brokerLabel = "kubetwin.io/broker"

// checkBrokerRouting: with the embedded broker, the hub Service routes only
// to the Pod its leader labels kubetwin.io/broker=active, the pod knows its
// name (downward API) and may patch Pods of its own namespace only; the
// other Services select every replica, which all serve the webhook. With an
// external broker none of that exists.
func checkBrokerRouting(t *testing.T, rel release, c corev1.Container, embedded bool) {
	t.Helper()
	if embedded {
		hub := get(t, &corev1.Service{}, rel.namespace, rel.mqtt())
		if hub.Spec.Selector[brokerLabel] != "active" || hub.Spec.Selector["app.kubernetes.io/name"] == "" {
			t.Errorf("hub Service %s selects %v, want the operator's pods labelled %s=active", rel.mqtt(), hub.Spec.Selector, brokerLabel)
		}
	}
	for _, name := range []string{rel.webhook(), rel.metrics(), rel.serviceAPI()} {
		s := &corev1.Service{}
		if err := apiServer(t).Get(context.Background(), types.NamespacedName{Namespace: rel.namespace, Name: name}, s); err != nil {
			continue
		}
		if _, ok := s.Spec.Selector[brokerLabel]; ok {
			t.Errorf("Service %s selects %s: it would lose every replica but the leader", name, brokerLabel)
		}
	}
	var podName *corev1.EnvVar
	for i := range c.Env {
		if c.Env[i].Name == "POD_NAME" {
			podName = &c.Env[i]
		}
	}
	switch {
	case embedded && (podName == nil || podName.ValueFrom == nil || podName.ValueFrom.FieldRef == nil ||
		podName.ValueFrom.FieldRef.FieldPath != "metadata.name"):
		t.Errorf("env POD_NAME = %+v, want the downward API's metadata.name", podName)
	case !embedded && podName != nil:
		t.Errorf("env POD_NAME with an external broker: %+v", podName)
	}
	for _, q := range []struct {
		verb, ns string
		want     bool
	}{
		{"patch", rel.namespace, embedded},
		{"patch", "default", false},
		{"patch", "devices", false},
		{"get", rel.namespace, false},
		{"update", rel.namespace, false},
		{"delete", rel.namespace, false},
	} {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User:   rel.saUser(),
			Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + rel.namespace, "system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{
				Verb: q.verb, Resource: "pods", Namespace: q.ns, Name: rel.manager() + "-abc12",
			},
		}}
		if err := apiServer(t).Create(context.Background(), sar); err != nil {
			t.Fatal(err)
		}
		if sar.Status.Allowed != q.want {
			t.Errorf("%s may %s pods in %q: %v, want %v (%s)", rel.sa(), q.verb, q.ns, sar.Status.Allowed, q.want, sar.Status.Reason)
		}
	}
}

// servicePort returns the installed Service's port of a name, or nil.
func servicePort(t *testing.T, rel release, service, port string) *corev1.ServicePort {
	t.Helper()
	s := get(t, &corev1.Service{}, rel.namespace, service)
	for i := range s.Spec.Ports {
		if s.Spec.Ports[i].Name == port {
			return &s.Spec.Ports[i]
		}
	}
	return nil
}

// kustomizeWebhooks reads config/webhook/manifests.yaml.
func kustomizeWebhooks(t *testing.T) (*admissionv1.ValidatingWebhookConfiguration, *admissionv1.MutatingWebhookConfiguration) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "config", "webhook", "manifests.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	v := &admissionv1.ValidatingWebhookConfiguration{}
	m := &admissionv1.MutatingWebhookConfiguration{}
	for _, doc := range strings.Split(string(b), "\n---\n") {
		switch {
		case strings.Contains(doc, "kind: ValidatingWebhookConfiguration"):
			err = yaml.UnmarshalStrict([]byte(doc), v)
		case strings.Contains(doc, "kind: MutatingWebhookConfiguration"):
			err = yaml.UnmarshalStrict([]byte(doc), m)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	return v, m
}

// checkWebhooks compares the installed webhook configurations with
// config/webhook (failure policies, rules, paths, timeouts, the operator's
// exemption), names aside.
func checkWebhooks(t *testing.T, rel release, certManager bool) {
	t.Helper()
	kv, km := kustomizeWebhooks(t)
	v := get(t, &admissionv1.ValidatingWebhookConfiguration{}, "", rel.config())
	m := get(t, &admissionv1.MutatingWebhookConfiguration{}, "", rel.config())
	if len(v.Webhooks) != len(kv.Webhooks) || len(m.Webhooks) != 1 {
		t.Fatalf("webhooks: %d validating, %d mutating; want %d (as config/webhook) and 1", len(v.Webhooks), len(m.Webhooks), len(kv.Webhooks))
	}
	mw := m.Webhooks[0]
	if *mw.FailurePolicy != admissionv1.Ignore {
		t.Errorf("mutating failure policy %s; want Ignore", *mw.FailurePolicy)
	}
	exemption := "request.userInfo.username != '" + rel.saUser() + "'"
	type pair struct {
		got, want any
		what      string
	}
	checks := []pair{
		{mw.Name, km.Webhooks[0].Name, "mutating name"},
		{*mw.FailurePolicy, *km.Webhooks[0].FailurePolicy, "mutating failurePolicy"},
		{mw.Rules, km.Webhooks[0].Rules, "mutating rules"},
		{*mw.TimeoutSeconds, *km.Webhooks[0].TimeoutSeconds, "mutating timeout"},
		{*mw.ReinvocationPolicy, *km.Webhooks[0].ReinvocationPolicy, "mutating reinvocationPolicy"},
		{*mw.ClientConfig.Service.Path, *km.Webhooks[0].ClientConfig.Service.Path, "mutating path"},
		{mw.ClientConfig.Service.Name, rel.webhook(), "mutating service"},
		{mw.ClientConfig.Service.Namespace, rel.namespace, "mutating service namespace"},
		{mw.MatchConditions, []admissionv1.MatchCondition{{Name: "not-the-operator", Expression: exemption}}, "mutating matchConditions"},
	}
	// Every validating webhook of config/webhook, in its order (DeviceTwin,
	// then TwinConfiguration), each refusing when the operator is away.
	for i, vw := range v.Webhooks {
		kw := kv.Webhooks[i]
		if *vw.FailurePolicy != admissionv1.Fail {
			t.Errorf("validating webhook %s: failure policy %s; want Fail", vw.Name, *vw.FailurePolicy)
		}
		checks = append(checks,
			pair{vw.Name, kw.Name, "validating name"},
			pair{*vw.FailurePolicy, *kw.FailurePolicy, vw.Name + " failurePolicy"},
			pair{vw.Rules, kw.Rules, vw.Name + " rules"},
			pair{*vw.TimeoutSeconds, *kw.TimeoutSeconds, vw.Name + " timeout"},
			pair{*vw.SideEffects, *kw.SideEffects, vw.Name + " sideEffects"},
			pair{*vw.ClientConfig.Service.Path, *kw.ClientConfig.Service.Path, vw.Name + " path"},
			pair{vw.ClientConfig.Service.Name, rel.webhook(), vw.Name + " service"},
			pair{vw.ClientConfig.Service.Namespace, rel.namespace, vw.Name + " service namespace"},
			pair{vw.MatchConditions, []admissionv1.MatchCondition{{Name: "not-the-operator", Expression: exemption}}, vw.Name + " matchConditions"},
		)
	}
	for _, p := range checks {
		if !reflect.DeepEqual(p.got, p.want) {
			t.Errorf("%s = %v, want %v", p.what, p.got, p.want)
		}
	}
	// With the chart's default names, the exemption is config/webhook's, word for word.
	if rel.name == "kubetwin" && rel.namespace == "kubetwin-system" {
		for i, vw := range v.Webhooks {
			if !reflect.DeepEqual(vw.MatchConditions, kv.Webhooks[i].MatchConditions) {
				t.Errorf("%s matchConditions %v differ from config/webhook's %v", vw.Name, vw.MatchConditions, kv.Webhooks[i].MatchConditions)
			}
		}
	}
	inject := rel.namespace + "/" + rel.certName()
	for _, o := range []client.Object{v, m} {
		got, has := o.GetAnnotations()["cert-manager.io/inject-ca-from"]
		if certManager && got != inject {
			t.Errorf("%T inject-ca-from = %q, want %q", o, got, inject)
		}
		if !certManager && has {
			t.Errorf("%T has inject-ca-from without cert-manager", o)
		}
	}
	for _, vw := range v.Webhooks {
		if len(vw.ClientConfig.CABundle) != 0 {
			t.Errorf("the chart sets a caBundle on %s; the operator or cert-manager injects it", vw.Name)
		}
	}
	if len(mw.ClientConfig.CABundle) != 0 {
		t.Error("the chart sets a caBundle on the mutating webhook; the operator or cert-manager injects it")
	}
}

func checkCertManager(t *testing.T, rel release, cert, issuer *unstructured.Unstructured) {
	t.Helper()
	if cert.GetAPIVersion() != "cert-manager.io/v1" || issuer.GetAPIVersion() != "cert-manager.io/v1" {
		t.Errorf("apiVersions %s, %s; want cert-manager.io/v1", cert.GetAPIVersion(), issuer.GetAPIVersion())
	}
	if cert.GetNamespace() != rel.namespace || issuer.GetNamespace() != rel.namespace {
		t.Errorf("namespaces %s, %s; want %s", cert.GetNamespace(), issuer.GetNamespace(), rel.namespace)
	}
	if _, ok, _ := unstructured.NestedMap(issuer.Object, "spec", "selfSigned"); !ok {
		t.Errorf("Issuer spec = %v, want selfSigned", issuer.Object["spec"])
	}
	dns, _, _ := unstructured.NestedStringSlice(cert.Object, "spec", "dnsNames")
	svc := rel.webhook() + "." + rel.namespace + ".svc"
	if !slices.Contains(dns, svc) {
		t.Errorf("dnsNames %v lack %s (the name the API server calls)", dns, svc)
	}
	ref, _, _ := unstructured.NestedStringMap(cert.Object, "spec", "issuerRef")
	if ref["name"] != issuer.GetName() || ref["kind"] != "Issuer" || ref["group"] != "cert-manager.io" {
		t.Errorf("issuerRef %v, want the Issuer %s", ref, issuer.GetName())
	}
	secret, _, _ := unstructured.NestedString(cert.Object, "spec", "secretName")
	if secret == "" {
		t.Error("Certificate has no secretName")
	}
	usages, _, _ := unstructured.NestedStringSlice(cert.Object, "spec", "usages")
	if !slices.Contains(usages, "server auth") {
		t.Errorf("usages %v lack server auth", usages)
	}
	for _, d := range []string{"duration", "renewBefore"} {
		s, _, _ := unstructured.NestedString(cert.Object, "spec", d)
		if _, err := time.ParseDuration(s); err != nil {
			t.Errorf("%s %q: %v", d, s, err)
		}
	}
}

// normalizedRules sorts rules and their lists so that equal rule sets compare equal.
func normalizedRules(rules []rbacv1.PolicyRule) []string {
	var out []string
	for _, r := range rules {
		for _, l := range [][]string{r.APIGroups, r.Resources, r.ResourceNames, r.Verbs, r.NonResourceURLs} {
			sort.Strings(l)
		}
		b, _ := yaml.Marshal(r)
		out = append(out, string(b))
	}
	sort.Strings(out)
	return out
}

// checkRBACMatchesKustomize: the chart grants what config/rbac grants, the
// generated role (role.yaml) and the leader election role included.
func checkRBACMatchesKustomize(t *testing.T, rel release) {
	t.Helper()
	kCluster, kNamespaced := generatedRoles(t)
	leader := kustomizeRole(t, "leader_election_role.yaml")

	cr := get(t, &rbacv1.ClusterRole{}, "", rel.prefix+"-manager")
	r := get(t, &rbacv1.Role{}, rel.namespace, rel.prefix+"-manager")
	le := get(t, &rbacv1.Role{}, rel.namespace, rel.prefix+"-leader-election")
	for _, c := range []struct {
		what      string
		got, want []rbacv1.PolicyRule
	}{
		{"ClusterRole " + cr.Name, cr.Rules, kCluster},
		{"Role " + r.Name, r.Rules, kNamespaced},
		{"Role " + le.Name, le.Rules, leader},
	} {
		if g, w := normalizedRules(c.got), normalizedRules(c.want); !reflect.DeepEqual(g, w) {
			t.Errorf("%s rules differ from config/rbac:\n got %v\nwant %v", c.what, g, w)
		}
	}
	for _, rb := range []struct{ kind, ns, name string }{
		{"ClusterRoleBinding", "", rel.prefix + "-manager"},
		{"RoleBinding", rel.namespace, rel.prefix + "-manager"},
		{"RoleBinding", rel.namespace, rel.prefix + "-leader-election"},
	} {
		var subjects []rbacv1.Subject
		if rb.kind == "ClusterRoleBinding" {
			subjects = get(t, &rbacv1.ClusterRoleBinding{}, "", rb.name).Subjects
		} else {
			subjects = get(t, &rbacv1.RoleBinding{}, rb.ns, rb.name).Subjects
		}
		want := []rbacv1.Subject{{Kind: "ServiceAccount", Name: rel.sa(), Namespace: rel.namespace}}
		if !reflect.DeepEqual(subjects, want) {
			t.Errorf("%s %s subjects %+v, want %+v", rb.kind, rb.name, subjects, want)
		}
	}
}

// generatedRoles returns the rules of config/rbac/role.yaml, generated from
// the +kubebuilder:rbac markers: its ClusterRole and its Role.
func generatedRoles(t *testing.T) (cluster, namespaced []rbacv1.PolicyRule) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "config", "rbac", "role.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, doc := range strings.Split(string(b), "\n---\n") {
		var r struct {
			Kind  string              `json:"kind"`
			Rules []rbacv1.PolicyRule `json:"rules"`
		}
		if err := yaml.Unmarshal([]byte(doc), &r); err != nil {
			t.Fatal(err)
		}
		switch r.Kind {
		case "ClusterRole":
			cluster = r.Rules
		case "Role":
			namespaced = r.Rules
		}
	}
	return cluster, namespaced
}

// kustomizeRole returns the rules of the first Role in a file of config/rbac.
func kustomizeRole(t *testing.T, file string) []rbacv1.PolicyRule {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "config", "rbac", file))
	if err != nil {
		t.Fatal(err)
	}
	for _, doc := range strings.Split(string(b), "\n---\n") {
		var r struct {
			Kind  string              `json:"kind"`
			Rules []rbacv1.PolicyRule `json:"rules"`
		}
		if err := yaml.Unmarshal([]byte(doc), &r); err != nil {
			t.Fatalf("config/rbac/%s: %v", file, err)
		}
		if r.Kind == "Role" {
			return r.Rules
		}
	}
	t.Fatalf("config/rbac/%s holds no Role", file)
	return nil
}

// checkAccess asks the API server's authorizer what the operator's service
// account may do, through the installed roles and bindings.
func checkAccess(t *testing.T, rel release, selfManaged bool) {
	t.Helper()
	type q struct {
		verb, group, resource, sub, ns, name string
		want                                 bool
	}
	qs := []q{
		{"watch", "kubetwin.io", "devicetwins", "", "", "", true},
		{"patch", "kubetwin.io", "devicetwins", "status", "devices", "", true},
		{"update", "kubetwin.io", "devicetwins", "finalizers", "devices", "", true},
		// The service API's device registry creates and deletes twins.
		{"create", "kubetwin.io", "devicetwins", "", "devices", "", true},
		{"delete", "kubetwin.io", "devicetwins", "", "devices", "", true},
		{"deletecollection", "kubetwin.io", "devicetwins", "", "devices", "", false},
		{"create", "events.k8s.io", "events", "", "devices", "", true},
		{"create", "coordination.k8s.io", "leases", "", rel.namespace, "", true},
		{"create", "coordination.k8s.io", "leases", "", "default", "", false},
		{"create", "authentication.k8s.io", "tokenreviews", "", "", "", true},
		{"create", "authorization.k8s.io", "subjectaccessreviews", "", "", "", true},
		// Device key Secrets: every twin's namespace (RBAC cannot limit
		// Secrets by label; the operator's cache holds only labelled ones).
		{"get", "", "secrets", "", "devices", "", true},
		{"create", "", "secrets", "", "devices", "", true},
		{"delete", "", "secrets", "", "devices", "", false},
		{"update", "admissionregistration.k8s.io", "validatingwebhookconfigurations", "", "", "someone-elses", false},
		// The service API's policies Secret, which the operator creates and keeps.
		{"create", "", "secrets", "", rel.namespace, "", true},
		{"get", "", "secrets", "", rel.namespace, rel.policies(), true},
		{"update", "", "secrets", "", rel.namespace, rel.policies(), true},
		// Device id claims: in the operator's own namespace only, in every mode.
		{"create", "kubetwin.io", "deviceidclaims", "", rel.namespace, "", true},
		{"delete", "kubetwin.io", "deviceidclaims", "", rel.namespace, "id-x", true},
		{"list", "kubetwin.io", "deviceidclaims", "", "", "", false},
		{"create", "kubetwin.io", "deviceidclaims", "", "devices", "", false},
		// The certificate manager's rights, only when it runs.
		{"update", "", "secrets", "", rel.namespace, rel.secret(), true},
		{"update", "admissionregistration.k8s.io", "validatingwebhookconfigurations", "", "", rel.config(), selfManaged},
		{"update", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "", "", rel.config(), selfManaged},
	}
	for _, q := range qs {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User:   rel.saUser(),
			Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + rel.namespace, "system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{
				Verb: q.verb, Group: q.group, Resource: q.resource, Subresource: q.sub, Namespace: q.ns, Name: q.name,
			},
		}}
		if err := apiServer(t).Create(context.Background(), sar); err != nil {
			t.Fatal(err)
		}
		if sar.Status.Allowed != q.want {
			t.Errorf("%s may %s %s/%s %s in %q named %q: %v, want %v (%s)", rel.sa(), q.verb, q.group, q.resource, q.sub,
				q.ns, q.name, sar.Status.Allowed, q.want, sar.Status.Reason)
		}
	}
}

// createProbeTwin creates a DeviceTwin before the webhooks exist, for
// checkAdmission.
func createProbeTwin(t *testing.T, ns string) *v1alpha1.DeviceTwin {
	t.Helper()
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Name: "probe", Namespace: ns}}
	if err := apiServer(t).Create(context.Background(), tw); err != nil {
		t.Fatalf("creating a twin before the webhooks are installed: %v", err)
	}
	return tw
}

// checkAdmission proves the installed webhook configuration is live and
// wired to the chart's Service: a user's twin write reaches the validating
// webhook (which fails, as no operator runs: failurePolicy Fail), while the
// operator's own label write is exempt through the matchCondition and
// allowed by its RBAC.
func checkAdmission(t *testing.T, rel release, probe *v1alpha1.DeviceTwin) {
	t.Helper()
	c := apiServer(t)
	ctx := context.Background()
	patch := client.RawPatch(types.MergePatchType, []byte(`{"spec":{"desired":{"telemetry":{"interval":5}}}}`))
	err := c.Patch(ctx, probe.DeepCopy(), patch)
	wantCall := `failed calling webhook "validate.devicetwins.kubetwin.io"`
	if err == nil || !strings.Contains(err.Error(), wantCall) || !strings.Contains(err.Error(), rel.webhook()) {
		t.Errorf("a user's twin change while no operator runs: %v; want it refused by %s through Service %s", err, wantCall, rel.webhook())
	}

	cfg := *restConfig
	cfg.Impersonate.UserName = rel.saUser()
	cfg.Impersonate.Groups = []string{"system:serviceaccounts", "system:serviceaccounts:" + rel.namespace, "system:authenticated"}
	asOperator, err := client.New(&cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	labelPatch := client.RawPatch(types.MergePatchType, []byte(`{"metadata":{"labels":{"location.plant":"Redmond43"}}}`))
	if err := asOperator.Patch(ctx, probe.DeepCopy(), labelPatch); err != nil {
		t.Errorf("the operator's label write (exempt from its webhooks): %v", err)
	}
}

// TestHelmInstallUpgradeUninstall runs the helm binary against the API
// server: install (CRDs already there are left alone), an upgrade that keeps
// the caBundle the operator injected, and uninstall.
func TestHelmInstallUpgradeUninstall(t *testing.T) {
	c := apiServer(t)
	ctx := context.Background()
	rel := release{name: "kt", namespace: "helm-install", prefix: "kt-kubetwin"}
	out, err := helm(t, "install", rel.name, chart, "--namespace", rel.namespace, "--create-namespace", "--timeout", "60s")
	if err != nil {
		t.Fatalf("helm install: %v\n%s", err, out)
	}
	t.Cleanup(func() { _, _ = helm(t, "uninstall", rel.name, "--namespace", rel.namespace) })
	if !strings.Contains(out, "NOTES:") || !strings.Contains(out, "kt-kubetwin-mqtt.helm-install.svc:8883") ||
		!strings.Contains(out, "kt-kubetwin-mqtt-ca") || strings.Contains(out, ":1883") {
		t.Errorf("helm install printed no notes naming the MQTT Service:\n%s", out)
	}
	if !strings.Contains(out, "kubectl twin service-connection-string -n helm-install --secret kt-kubetwin-service-policies") ||
		!strings.Contains(out, "NODE_EXTRA_CA_CERTS") {
		t.Errorf("helm install printed no notes on the service API's connection string and CA:\n%s", out)
	}
	t.Logf("helm install:\n%s", out)

	manifest, err := helm(t, "get", "manifest", rel.name, "--namespace", rel.namespace)
	if err != nil {
		t.Fatalf("helm get manifest: %v\n%s", err, manifest)
	}
	objs := decodeObjects(t, manifest)
	if len(objs) < 15 {
		t.Fatalf("helm installed %d objects: %v", len(objs), names(objs))
	}
	for _, o := range objs {
		live := &unstructured.Unstructured{}
		live.SetGroupVersionKind(o.GroupVersionKind())
		if err := c.Get(ctx, client.ObjectKeyFromObject(o), live); err != nil {
			t.Errorf("%s %s not in the API server after helm install: %v", o.GetKind(), o.GetName(), err)
		}
	}

	// The operator injects the caBundle; an upgrade must not take it away.
	v := get(t, &admissionv1.ValidatingWebhookConfiguration{}, "", rel.config())
	v.Webhooks[0].ClientConfig.CABundle = []byte("-----BEGIN CERTIFICATE-----\ninjected\n-----END CERTIFICATE-----\n")
	if err := c.Update(ctx, v); err != nil {
		t.Fatal(err)
	}
	out, err = helm(t, "upgrade", rel.name, chart, "--namespace", rel.namespace, "--reuse-values", "--set", "logLevel=debug", "--timeout", "60s")
	if err != nil {
		t.Fatalf("helm upgrade: %v\n%s", err, out)
	}
	d := get(t, &appsv1.Deployment{}, rel.namespace, rel.manager())
	if !slices.Contains(d.Spec.Template.Spec.Containers[0].Args, "--zap-log-level=debug") {
		t.Errorf("upgrade did not change the args: %v", d.Spec.Template.Spec.Containers[0].Args)
	}
	v = get(t, &admissionv1.ValidatingWebhookConfiguration{}, "", rel.config())
	if len(v.Webhooks[0].ClientConfig.CABundle) == 0 {
		t.Error("helm upgrade removed the caBundle the operator injected")
	}

	out, err = helm(t, "uninstall", rel.name, "--namespace", rel.namespace, "--timeout", "60s")
	if err != nil {
		t.Fatalf("helm uninstall: %v\n%s", err, out)
	}
	err = c.Get(ctx, types.NamespacedName{Name: rel.config()}, &admissionv1.ValidatingWebhookConfiguration{})
	if !apierrors.IsNotFound(err) {
		t.Errorf("webhook configuration after uninstall: %v", err)
	}
	// Helm never deletes CRDs from crds/ (and so never the twins).
	if err := c.Get(ctx, types.NamespacedName{Name: "devicetwins.kubetwin.io"}, &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
	}}); err != nil {
		t.Errorf("CRD after uninstall: %v", err)
	}
}

// TestEmbeddedBrokerTLS: with broker.embedded.tls.secretName the TLS
// listener serves your Secret's certificate, and with
// broker.embedded.plain.enabled the MQTT Service also serves plain MQTT on
// 1883. Checked with a server-side dry run (every object validated by the
// API server, nothing stored).
func TestEmbeddedBrokerTLS(t *testing.T) {
	rel := release{name: "kubetwin", namespace: "tls-dry-run", prefix: "kubetwin"}
	objs := render(t, rel.name, rel.namespace, "--set", "broker.embedded.plain.enabled=true",
		"--set", "broker.embedded.tls.secretName=mqtt-tls", "--set", "broker.embedded.service.type=LoadBalancer",
		"--set", "broker.embedded.service.nodePorts.mqtt=31883", "--set", "broker.embedded.service.nodePorts.https=30443",
		"--set", "broker.embedded.service.externalTrafficPolicy=Local", "--set", "hubHostname=mqtt.example.com")
	dryRunApply(t, rel, objs)

	svc := &corev1.Service{}
	if err := k8sFromUnstructured(find(t, objs, "Service", rel.mqtt()), svc); err != nil {
		t.Fatal(err)
	}
	want := []corev1.ServicePort{
		{Name: "mqtts", Port: 8883, TargetPort: intstr.FromString("mqtts"), Protocol: corev1.ProtocolTCP},
		{Name: "mqtt", Port: 1883, TargetPort: intstr.FromString("mqtt"), Protocol: corev1.ProtocolTCP, NodePort: 31883},
		{Name: "https", Port: 443, TargetPort: intstr.FromString("service-api"), Protocol: corev1.ProtocolTCP, NodePort: 30443},
	}
	if !reflect.DeepEqual(svc.Spec.Ports, want) || svc.Spec.Type != corev1.ServiceTypeLoadBalancer ||
		svc.Spec.ExternalTrafficPolicy != corev1.ServiceExternalTrafficPolicyLocal {
		t.Errorf("MQTT Service %+v, want LoadBalancer (Local) with ports %+v", svc.Spec, want)
	}
	d := &appsv1.Deployment{}
	if err := k8sFromUnstructured(find(t, objs, "Deployment", rel.manager()), d); err != nil {
		t.Fatal(err)
	}
	mc := d.Spec.Template.Spec.Containers[0]
	if containerPort(t, mc, intstr.FromString("mqtts")) != 8883 || containerPort(t, mc, intstr.FromString("mqtt")) != 1883 {
		t.Error("no container ports mqtts 8883 and mqtt 1883")
	}
	if v := volume(t, d, "mqtt-tls"); v.Secret == nil || v.Secret.SecretName != "mqtt-tls" || !mounted(mc, "mqtt-tls", true) {
		t.Errorf("mqtt-tls volume %+v", v)
	}
	// The service API serves the same certificate, for the same host name.
	for _, a := range []string{"--mqtt-tls-bind-address=:8883", "--mqtt-tls-cert-file=/etc/kubetwin/mqtt-tls/tls.crt",
		"--mqtt-tls-key-file=/etc/kubetwin/mqtt-tls/tls.key", "--mqtt-bind-address=:1883", "--hub-hostname=mqtt.example.com",
		"--service-hostname=mqtt.example.com", "--service-api-bind-address=:10443"} {
		if !slices.Contains(mc.Args, a) {
			t.Errorf("args %v lack %s", mc.Args, a)
		}
	}
	for _, a := range mc.Args {
		if strings.HasPrefix(a, "--mqtt-tls-secret-") || strings.HasPrefix(a, "--mqtt-tls-ca-configmap") || strings.HasPrefix(a, "--mqtt-tls-host") {
			t.Errorf("args with your certificate hold %s", a)
		}
	}
	// Your certificate: the operator publishes no CA, so the Role has no ConfigMap rights.
	for _, o := range objs {
		if o.GetKind() == "Role" && o.GetName() == rel.prefix+"-manager" {
			r := &rbacv1.Role{}
			if err := k8sFromUnstructured(o, r); err != nil {
				t.Fatal(err)
			}
			for _, rule := range r.Rules {
				if slices.Contains(rule.Resources, "configmaps") {
					t.Errorf("Role %s grants %+v with your MQTT certificate", r.Name, rule)
				}
			}
		}
	}
}

// TestEmbeddedBrokerPlainOnly: with the TLS listener off and the plain one
// on, the operator gets an empty --mqtt-tls-bind-address (its default is
// :8883) and the Service serves 1883 and the service API's 443. The service
// API still needs the hub's certificate: the operator issues it (and may
// publish its CA) unless the service API is off too.
func TestEmbeddedBrokerPlainOnly(t *testing.T) {
	for _, api := range []bool{true, false} {
		t.Run(fmt.Sprintf("serviceAPI.enabled=%v", api), func(t *testing.T) {
			rel := release{name: "kubetwin", namespace: "plain-dry-run", prefix: "kubetwin"}
			objs := render(t, rel.name, rel.namespace, "--set", "broker.embedded.tls.enabled=false",
				"--set", "broker.embedded.plain.enabled=true", "--set", "deviceAuth=none", "--set", fmt.Sprintf("serviceAPI.enabled=%v", api))
			dryRunApply(t, rel, objs)

			svc := &corev1.Service{}
			if err := k8sFromUnstructured(find(t, objs, "Service", rel.mqtt()), svc); err != nil {
				t.Fatal(err)
			}
			want := []corev1.ServicePort{{Name: "mqtt", Port: 1883, TargetPort: intstr.FromString("mqtt"), Protocol: corev1.ProtocolTCP}}
			if api {
				want = append(want, corev1.ServicePort{Name: "https", Port: 443, TargetPort: intstr.FromString("service-api"), Protocol: corev1.ProtocolTCP})
			}
			if !reflect.DeepEqual(svc.Spec.Ports, want) {
				t.Errorf("MQTT Service ports %+v, want %+v", svc.Spec.Ports, want)
			}
			args := deploymentArgs(t, objs)
			for _, a := range []string{"--mqtt-tls-bind-address=", "--mqtt-bind-address=:1883", "--device-auth=none"} {
				if !slices.Contains(args, a) {
					t.Errorf("args %v lack %s", args, a)
				}
			}
			issued := slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--mqtt-tls-secret-name=") }) &&
				slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--mqtt-tls-host=") })
			if issued != api {
				t.Errorf("args %v: operator-issued hub certificate %v, want %v (needed by the service API only)", args, issued, api)
			}
			if !api {
				for _, a := range args {
					if strings.HasPrefix(a, "--mqtt-tls-") && a != "--mqtt-tls-bind-address=" {
						t.Errorf("plain-only args without the service API hold %s", a)
					}
				}
			}
			if got := roleGrantsConfigMaps(t, rel, objs); got != api {
				t.Errorf("Role %s-manager grants ConfigMap rights (the hub CA's): %v, want %v", rel.prefix, got, api)
			}
		})
	}
}

// roleGrantsConfigMaps tells whether the rendered Role <prefix>-manager
// grants rights on ConfigMaps (where the operator publishes the hub's CA).
func roleGrantsConfigMaps(t *testing.T, rel release, objs []*unstructured.Unstructured) bool {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == "Role" && o.GetName() == rel.prefix+"-manager" {
			r := &rbacv1.Role{}
			if err := k8sFromUnstructured(o, r); err != nil {
				t.Fatal(err)
			}
			for _, rule := range r.Rules {
				if slices.Contains(rule.Resources, "configmaps") {
					return true
				}
			}
		}
	}
	return false
}

// TestServiceAPIDisabled: with serviceAPI.enabled=false nothing serves or
// exposes the service API (--service-api-bind-address= turns off the
// operator's default :10443), with the embedded and an external broker.
func TestServiceAPIDisabled(t *testing.T) {
	for name, args := range map[string][]string{
		"embedded broker": nil,
		"external broker": {"--set", "broker.external.url=tcp://mosquitto.mqtt:1883"},
	} {
		t.Run(name, func(t *testing.T) {
			rel := release{name: "kubetwin", namespace: "no-service-api", prefix: "kubetwin"}
			objs := render(t, rel.name, rel.namespace, append(args, "--set", "serviceAPI.enabled=false")...)
			dryRunApply(t, rel, objs)
			external := len(args) > 0

			for _, o := range objs {
				if o.GetKind() != "Service" {
					continue
				}
				if o.GetName() == rel.serviceAPI() {
					t.Errorf("Service %s without the service API", o.GetName())
				}
				svc := &corev1.Service{}
				if err := k8sFromUnstructured(o, svc); err != nil {
					t.Fatal(err)
				}
				for _, p := range svc.Spec.Ports {
					if p.TargetPort.StrVal == "service-api" || (p.Port == 443 && o.GetName() != rel.webhook() && o.GetName() != rel.queryAPI()) {
						t.Errorf("Service %s port %+v without the service API", svc.Name, p)
					}
				}
			}
			d := &appsv1.Deployment{}
			if err := k8sFromUnstructured(find(t, objs, "Deployment", rel.manager()), d); err != nil {
				t.Fatal(err)
			}
			mc := d.Spec.Template.Spec.Containers[0]
			for _, p := range mc.Ports {
				if p.Name == "service-api" || p.ContainerPort == 10443 {
					t.Errorf("container port %+v without the service API", p)
				}
			}
			if !slices.Contains(mc.Args, "--service-api-bind-address=") {
				t.Errorf("args %v lack --service-api-bind-address= (the operator's default serves :10443)", mc.Args)
			}
			for _, a := range mc.Args {
				if strings.HasPrefix(a, "--service-") && a != "--service-api-bind-address=" || strings.HasPrefix(a, "--registry-namespace") {
					t.Errorf("args without the service API hold %s", a)
				}
				// An external broker and no service API: nothing serves the hub's certificate.
				if external && strings.HasPrefix(a, "--mqtt-tls-") {
					t.Errorf("external broker args without the service API hold %s", a)
				}
			}
			if external && roleGrantsConfigMaps(t, rel, objs) {
				t.Error("the operator may publish a hub CA that nothing uses")
			}
		})
	}
}

// TestServiceAPIExternalBrokerYourCertificate: with an external broker the
// service API gets the Service <fullname>-service-api (type, annotations and
// node port from serviceAPI.service), serves your certificate when
// broker.embedded.tls.secretName is set, and takes its host name and registry
// namespace from the values.
func TestServiceAPIExternalBrokerYourCertificate(t *testing.T) {
	rel := release{name: "kubetwin", namespace: "service-api-dry-run", prefix: "kubetwin"}
	objs := render(t, rel.name, rel.namespace, "-f", writeValues(t, `
watchNamespace: devices
broker:
  external: {url: "tcp://mosquitto.mqtt:1883"}
  embedded:
    tls: {secretName: hub-tls}
serviceAPI:
  port: 11443
  hostname: hub.example.com
  registryNamespace: devices
  service:
    type: LoadBalancer
    annotations: {service.beta.kubernetes.io/aws-load-balancer-type: nlb}
    nodePort: 30443
`))
	dryRunApply(t, rel, objs)

	svc := &corev1.Service{}
	if err := k8sFromUnstructured(find(t, objs, "Service", rel.serviceAPI()), svc); err != nil {
		t.Fatal(err)
	}
	want := []corev1.ServicePort{{Name: "https", Port: 443, TargetPort: intstr.FromString("service-api"), Protocol: corev1.ProtocolTCP, NodePort: 30443}}
	if !reflect.DeepEqual(svc.Spec.Ports, want) || svc.Spec.Type != corev1.ServiceTypeLoadBalancer ||
		svc.Annotations["service.beta.kubernetes.io/aws-load-balancer-type"] != "nlb" {
		t.Errorf("service API Service %+v %v, want LoadBalancer with its annotation and ports %+v", svc.Spec, svc.Annotations, want)
	}
	d := &appsv1.Deployment{}
	if err := k8sFromUnstructured(find(t, objs, "Deployment", rel.manager()), d); err != nil {
		t.Fatal(err)
	}
	mc := d.Spec.Template.Spec.Containers[0]
	if containerPort(t, mc, intstr.FromString("service-api")) != 11443 {
		t.Error("no container port service-api 11443")
	}
	if v := volume(t, d, "mqtt-tls"); v.Secret == nil || v.Secret.SecretName != "hub-tls" || !mounted(mc, "mqtt-tls", true) {
		t.Errorf("mqtt-tls volume %+v", v)
	}
	for _, a := range []string{"--service-api-bind-address=:11443", "--service-hostname=hub.example.com",
		"--registry-namespace=devices", "--service-policies-namespace=" + rel.namespace,
		"--mqtt-tls-cert-file=/etc/kubetwin/mqtt-tls/tls.crt", "--mqtt-tls-key-file=/etc/kubetwin/mqtt-tls/tls.key"} {
		if !slices.Contains(mc.Args, a) {
			t.Errorf("args %v lack %s", mc.Args, a)
		}
	}
	for _, a := range mc.Args {
		if strings.HasPrefix(a, "--mqtt-tls-secret-") || strings.HasPrefix(a, "--mqtt-tls-host") || strings.HasPrefix(a, "--mqtt-tls-bind-address") {
			t.Errorf("args with your certificate and an external broker hold %s", a)
		}
	}
	if roleGrantsConfigMaps(t, rel, objs) {
		t.Error("the operator may publish a CA for your certificate")
	}
}

// dryRunApply has the API server validate every rendered object.
func dryRunApply(t *testing.T, rel release, objs []*unstructured.Unstructured) {
	t.Helper()
	c := apiServer(t)
	createNamespace(t, rel.namespace)
	for _, o := range objs {
		// The watched namespace must exist for its Role (helm install does not create it).
		if ns := o.GetNamespace(); ns != "" && ns != rel.namespace {
			createNamespace(t, ns)
		}
		if err := c.Apply(context.Background(), client.ApplyConfigurationFromUnstructured(o.DeepCopy()), testFieldOwner,
			client.ForceOwnership, client.DryRunAll); err != nil {
			t.Errorf("the API server refused %s %s: %v", o.GetKind(), o.GetName(), err)
		}
	}
}

func k8sFromUnstructured(u *unstructured.Unstructured, into any) error {
	return k8sruntime.DefaultUnstructuredConverter.FromUnstructured(u.Object, into)
}
