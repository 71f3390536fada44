package helm

import (
	"bytes"
	"flag"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
)

// externalValues: an external TLS broker with credentials, cert-manager
// webhook certificates, two replicas and node placement.
const externalValues = `
replicas: 2
broker:
  external:
    url: ssl://mosquitto.mqtt.svc:8883
    username: kubetwin
    passwordSecret: {name: mqtt-password}
    caSecret: {name: mqtt-ca}
    clientCertSecret: {name: mqtt-client}
webhook:
  certificates:
    mode: cert-manager
nodeSelector: {kubernetes.io/os: linux}
tolerations: [{key: dedicated, operator: Equal, value: iot, effect: NoSchedule}]
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels: {app.kubernetes.io/name: kubetwin}
`

func TestLint(t *testing.T) {
	for name, args := range map[string][]string{
		"defaults":                         nil,
		"external broker and cert-manager": {"-f", writeValues(t, externalValues)},
		"provided certificates": {"--set", "webhook.certificates.mode=provided",
			"--set", "webhook.certificates.provided.secretName=my-cert", "--set", "webhook.certificates.provided.caBundle=Zm9v"},
		"embedded broker with your TLS certificate and plain MQTT": {"--set", "broker.embedded.tls.secretName=mqtt-tls",
			"--set", "broker.embedded.plain.enabled=true"},
		"plain MQTT only, no device authentication": {"--set", "broker.embedded.tls.enabled=false", "--set", "broker.embedded.plain.enabled=true",
			"--set", "deviceAuth=none"},
		"no service API": {"--set", "serviceAPI.enabled=false"},
		"external broker, service API with your certificate": {"--set", "broker.external.url=tcp://m:1883", "--set", "broker.embedded.tls.secretName=hub-tls",
			"--set", "serviceAPI.service.type=LoadBalancer", "--set", "serviceAPI.hostname=hub.example.com"},
	} {
		t.Run(name, func(t *testing.T) {
			out, err := helm(t, append([]string{"lint", chart, "--strict", "--kube-version", kubeVersion}, args...)...)
			if err != nil || !strings.Contains(out, "0 chart(s) failed") {
				t.Fatalf("helm lint: %v\n%s", err, out)
			}
			for _, line := range strings.Split(out, "\n") {
				if strings.Contains(line, "[WARNING]") || strings.Contains(line, "[ERROR]") {
					t.Errorf("helm lint: %s", line)
				}
			}
		})
	}
}

// TestBadValuesFailEarly: values.schema.json and the chart's own checks
// refuse bad values at helm template/install time, naming the value.
func TestBadValuesFailEarly(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"misspelt key", []string{"--set", "replica=2"}, "replica"},
		{"negative replicas", []string{"--set", "replicas=-1"}, "/replicas"},
		{"replicas as a string", []string{"--set-string", "replicas=two"}, "/replicas"},
		{"broker URL without a scheme", []string{"--set", "broker.external.url=mosquitto:1883"}, "/broker/external/url"},
		{"http broker URL", []string{"--set", "broker.external.url=http://mosquitto"}, "/broker/external/url"},
		{"unknown certificate mode", []string{"--set", "webhook.certificates.mode=letsencrypt"}, "/webhook/certificates/mode"},
		{"unknown failure policy", []string{"--set", "webhook.failurePolicy=Sometimes"}, "/webhook/failurePolicy"},
		{"unknown pull policy", []string{"--set", "image.pullPolicy=Sometimes"}, "/image/pullPolicy"},
		{"bad service type", []string{"--set", "broker.embedded.service.type=External"}, "/broker/embedded/service/type"},
		{"port out of range", []string{"--set", "broker.embedded.tls.port=70000"}, "/broker/embedded/tls/port"},
		{"plain port out of range", []string{"--set", "broker.embedded.plain.port=0"}, "/broker/embedded/plain/port"},
		{"old plain port value", []string{"--set", "broker.embedded.port=1883"}, "port"},
		{"unknown device auth", []string{"--set", "deviceAuth=token"}, "/deviceAuth"},
		{"hub host name with a scheme", []string{"--set", "hubHostname=mqtts://hub.example.com"}, "/hubHostname"},
		{"extra argument that is no flag", []string{"--set", "extraArgs[0]=leader-elect"}, "/extraArgs/0"},
		{"bad duration", []string{"--set", "webhook.certificates.selfManaged.certValidity=90 days"}, "certValidity"},
		{"provided certificates without a Secret", []string{"--set", "webhook.certificates.mode=provided"}, "provided"},
		{"embedded broker without a listener", []string{"--set", "broker.embedded.tls.enabled=false"}, "the embedded broker needs a listener"},
		{"two replicas with the embedded broker without leader election", []string{"--set", "replicas=2", "--set", "leaderElection.enabled=false"},
			"leaderElection.enabled=true"},
		{"two replicas without leader election", []string{"--set", "replicas=2", "--set", "broker.external.url=tcp://m:1883",
			"--set", "leaderElection.enabled=false"}, "leaderElection.enabled=true"},
		{"embedded TLS certificate with an external broker and no service API", []string{"--set", "broker.external.url=tcp://m:1883",
			"--set", "broker.embedded.tls.secretName=x", "--set", "serviceAPI.enabled=false"}, "broker.embedded.tls.secretName is for the embedded broker and the service API"},
		{"service API port as a string", []string{"--set", "serviceAPI.port=x"}, "/serviceAPI/port"},
		{"service API port out of range", []string{"--set", "serviceAPI.port=0"}, "/serviceAPI/port"},
		{"service API switch as a string", []string{"--set-string", "serviceAPI.enabled=yes"}, "/serviceAPI/enabled"},
		{"misspelt service API key", []string{"--set", "serviceAPI.hostName=hub.example.com"}, "hostName"},
		{"service host name with a scheme", []string{"--set", "serviceAPI.hostname=https://hub.example.com"}, "/serviceAPI/hostname"},
		{"bad registry namespace", []string{"--set", "serviceAPI.registryNamespace=Devices"}, "/serviceAPI/registryNamespace"},
		{"bad service API Service type", []string{"--set", "serviceAPI.service.type=External"}, "/serviceAPI/service/type"},
		{"service API node port out of range", []string{"--set", "serviceAPI.service.nodePort=70000"}, "/serviceAPI/service/nodePort"},
		{"hub https node port out of range", []string{"--set", "broker.embedded.service.nodePorts.https=-1"}, "/broker/embedded/service/nodePorts/https"},
		{"registry namespace outside the watched one", []string{"--set", "watchNamespace=devices", "--set", "serviceAPI.registryNamespace=other"},
			"serviceAPI.registryNamespace must be watchNamespace"},
		{"embedded plain listener with an external broker", []string{"--set", "broker.external.url=tcp://m:1883",
			"--set", "broker.embedded.plain.enabled=true"}, "broker.embedded.plain.enabled is for the embedded broker"},
		{"existing service account without a name", []string{"--set", "serviceAccount.create=false"}, "serviceAccount.name is required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"template", "kubetwin", chart, "--kube-version", kubeVersion}, tc.args...)
			out, err := helm(t, args...)
			if err == nil {
				t.Fatalf("helm template %v succeeded, want a failure naming %q", tc.args, tc.want)
			}
			if !strings.Contains(out, tc.want) {
				t.Errorf("helm template %v failed without naming %q:\n%s", tc.args, tc.want, out)
			}
		})
	}
}

// TestEmbeddedBrokerReplicas: several replicas with the embedded broker
// render; the hub Service selects only the Pod the leader labels (its
// broker listens), the webhook Service every replica, and the right to
// label is patch on Pods of the release namespace, in a Role.
func TestEmbeddedBrokerReplicas(t *testing.T) {
	objs := render(t, "kubetwin", "kubetwin-system", "--set", "replicas=3")
	var d appsv1.Deployment
	if err := k8sFromUnstructured(find(t, objs, "Deployment", "kubetwin-controller-manager"), &d); err != nil {
		t.Fatal(err)
	}
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 3 {
		t.Errorf("replicas = %v, want 3", d.Spec.Replicas)
	}
	selects := func(name string) map[string]string {
		var s corev1.Service
		if err := k8sFromUnstructured(find(t, objs, "Service", name), &s); err != nil {
			t.Fatal(err)
		}
		return s.Spec.Selector
	}
	hub := selects("kubetwin-mqtt")
	for k, v := range d.Spec.Selector.MatchLabels {
		if hub[k] != v {
			t.Errorf("hub Service selector %v lacks the pods' %s=%s", hub, k, v)
		}
	}
	if hub[brokerLabel] != "active" {
		t.Errorf("hub Service selector %v, want %s=active: it would send devices to replicas without a broker", hub, brokerLabel)
	}
	if _, ok := selects("kubetwin-webhook-service")[brokerLabel]; ok {
		t.Error("the webhook Service selects the broker label: only the leader would serve the webhook")
	}
	found := false
	for _, o := range objs {
		var r rbacv1.Role // ClusterRoles have the same rules field
		if err := k8sFromUnstructured(o, &r); err != nil || (o.GetKind() != "Role" && o.GetKind() != "ClusterRole") {
			continue
		}
		for _, rule := range r.Rules {
			if !slices.Contains(rule.Resources, "pods") {
				continue
			}
			if o.GetKind() != "Role" || o.GetNamespace() != "kubetwin-system" || !slices.Equal(rule.Verbs, []string{"patch"}) {
				t.Errorf("%s %s/%s grants %v on pods, want only patch in a Role of the release namespace", o.GetKind(),
					o.GetNamespace(), o.GetName(), rule.Verbs)
			}
			found = true
		}
	}
	if !found {
		t.Error("no Role lets the leader label its own Pod (patch pods)")
	}
}

// TestOldKubernetesRefused: matchConditions (the operator's exemption from
// its own webhooks) need Kubernetes 1.30.
func TestOldKubernetesRefused(t *testing.T) {
	out, err := helm(t, "template", "kubetwin", chart, "--kube-version", "1.29.0")
	if err == nil || !strings.Contains(out, "kubeVersion") {
		t.Fatalf("helm template for 1.29 = %v, want a kubeVersion failure\n%s", err, out)
	}
}

// TestChartCRDsInSync: the chart's crds/ folder holds exactly the generated
// CRDs of config/crd/bases.
func TestChartCRDsInSync(t *testing.T) {
	gen, err := filepath.Glob(filepath.Join(root, "config", "crd", "bases", "*.yaml"))
	if err != nil || len(gen) == 0 {
		t.Fatalf("no generated CRDs in config/crd/bases (%v)", err)
	}
	inChart, _ := filepath.Glob(filepath.Join(chart, "crds", "*.yaml"))
	if len(inChart) != len(gen) {
		t.Errorf("charts/kubetwin/crds has %d files, config/crd/bases %d: run hack/sync-chart-crds.sh", len(inChart), len(gen))
	}
	for _, g := range gen {
		want, _ := os.ReadFile(g)
		got, err := os.ReadFile(filepath.Join(chart, "crds", filepath.Base(g)))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("charts/kubetwin/crds/%s differs from config/crd/bases: run hack/sync-chart-crds.sh", filepath.Base(g))
		}
	}
}

// managerFlags returns the flags cmd/manager defines: those in its source
// (flag.XxxVar calls with a literal name) and the zap logging flags.
func managerFlags(t *testing.T) map[string]bool {
	t.Helper()
	flags := map[string]bool{}
	fset := token.NewFileSet()
	pkgDir := filepath.Join(root, "cmd", "manager")
	files, _ := filepath.Glob(filepath.Join(pkgDir, "*.go"))
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(file, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			if x, ok := sel.X.(*ast.Ident); !ok || (x.Name != "flag" && x.Name != "fs") { // fs: a *flag.FlagSet parameter
				return true
			}
			idx := 0 // flag.String("name", ...)
			if strings.HasSuffix(sel.Sel.Name, "Var") {
				idx = 1 // flag.StringVar(&v, "name", ...), flag.Var(v, "name", ...)
			}
			if len(call.Args) > idx {
				if lit, ok := call.Args[idx].(*ast.BasicLit); ok && lit.Kind == token.STRING {
					if name, err := strconv.Unquote(lit.Value); err == nil {
						flags[name] = true
					}
				}
			}
			return true
		})
	}
	if len(flags) < 10 {
		t.Fatalf("found only %d flags in cmd/manager; has the flag parsing changed?", len(flags))
	}
	fs := flag.NewFlagSet("zap", flag.ContinueOnError)
	(&zap.Options{}).BindFlags(fs)
	fs.VisitAll(func(f *flag.Flag) { flags[f.Name] = true })
	return flags
}

// deploymentArgs returns the operator container's arguments.
func deploymentArgs(t *testing.T, objs []*unstructured.Unstructured) []string {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() != "Deployment" {
			continue
		}
		containers, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
		for _, c := range containers {
			cm := c.(map[string]any)
			if cm["name"] == "manager" {
				args, _, _ := unstructured.NestedStringSlice(cm, "args")
				return args
			}
		}
	}
	t.Fatal("no manager container in the rendered Deployment")
	return nil
}

// TestChartFlagsExist: every flag the chart passes to the operator exists in
// cmd/manager, in every configuration (a misspelt flag would crash the pod).
func TestChartFlagsExist(t *testing.T) {
	flags := managerFlags(t)
	configs := map[string][]string{
		"defaults":                         nil,
		"external broker and cert-manager": {"-f", writeValues(t, externalValues)},
		"provided certificates": {"--set", "webhook.certificates.mode=provided",
			"--set", "webhook.certificates.provided.secretName=my-cert", "--set", "webhook.certificates.provided.caBundle=Zm9v"},
		"no webhook, no metrics, one namespace, insecure metrics": {"--set", "webhook.enabled=false", "--set", "metrics.secure=false",
			"--set", "watchNamespace=devices", "--set", "broker.external.url=tcp://m:1883", "--set", "broker.external.insecureSkipVerify=true"},
		"metrics off": {"--set", "metrics.enabled=false", "--set", "leaderElection.enabled=false"},
		"embedded broker with your TLS certificate": {"--set", "broker.embedded.tls.secretName=mqtt-tls"},
		"embedded broker with plain MQTT and extra hosts": {"--set", "broker.embedded.plain.enabled=true",
			"--set", "broker.embedded.tls.hosts={mqtt.example.com,10.0.0.1}", "--set", "hubHostname=mqtt.example.com"},
		"plain MQTT only, no device authentication": {"--set", "broker.embedded.tls.enabled=false", "--set", "broker.embedded.plain.enabled=true",
			"--set", "deviceAuth=none"},
		"no service API": {"--set", "serviceAPI.enabled=false"},
		"external broker, service API with your certificate": {"--set", "broker.external.url=tcp://m:1883", "--set", "broker.embedded.tls.secretName=hub-tls",
			"--set", "serviceAPI.hostname=hub.example.com", "--set", "serviceAPI.registryNamespace=devices"},
	}
	for name, args := range configs {
		t.Run(name, func(t *testing.T) {
			for _, a := range deploymentArgs(t, render(t, "kubetwin", "kubetwin-system", args...)) {
				f := strings.TrimLeft(strings.SplitN(a, "=", 2)[0], "-")
				if flags[f] {
					continue
				}
				t.Errorf("the chart passes --%s, which cmd/manager does not define", f)
			}
		})
	}
}
