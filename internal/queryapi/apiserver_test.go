package queryapi_test

// The aggregated API through a real kube-apiserver (envtest): the API
// server has a front-proxy certificate and request-header flags, an
// APIService leads it to a query API server in this process, which
// authenticates the API server's certificate and asks it
// SubjectAccessReviews for the requesting user.

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/kubectltwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/queryapi/queryapitest"
	"github.com/kubetwin/kubetwin/internal/queryapi/wire"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/internal/twinscan/twinscantest"
)

type plane struct {
	env   *envtest.Environment
	fp    *queryapitest.FrontProxy
	admin client.Client
}

func startPlane(t testing.TB) *plane {
	t.Helper()
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Fatal("KUBEBUILDER_ASSETS is not set: KUBEBUILDER_ASSETS=$(hack/controlplane.sh) go test ./internal/queryapi")
	}
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	fp, err := queryapitest.Configure(env)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fp.Cleanup() })
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("starting envtest: %v", err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1alpha1.AddToScheme(scheme)
	admin, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	return &plane{env: env, fp: fp, admin: admin}
}

// twinFixture creates a twin as the operator leaves it: labels mirrored,
// status written.
func (p *plane) twinFixture(t *testing.T, ns, name, tags, reported, state string) {
	t.Helper()
	ctx := context.Background()
	tg, err := twin.DecodeRaw([]byte(tags))
	if err != nil {
		t.Fatal(err)
	}
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: twin.MirrorLabels(tg)}}
	tw.Spec.Tags = &apiextensionsv1.JSON{Raw: []byte(tags)}
	if err := p.admin.Create(ctx, tw); err != nil {
		t.Fatal(err)
	}
	tw.Status.DeviceID = name
	tw.Status.ConnectionState = state
	tw.Status.Reported = &apiextensionsv1.JSON{Raw: []byte(reported)}
	tw.Status.ObservedGeneration = tw.Generation
	if err := p.admin.Status().Update(ctx, tw); err != nil {
		t.Fatal(err)
	}
}

func (p *plane) namespace(t *testing.T, ns string) {
	t.Helper()
	if err := p.admin.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}
}

// user adds a user of the API server with the given rules in ns (cluster-
// wide when ns is "").
func (p *plane) user(t *testing.T, name, ns string, rules ...rbacv1.PolicyRule) *rest.Config {
	t.Helper()
	ctx := context.Background()
	u, err := p.env.ControlPlane.AddUser(envtest.User{Name: name}, nil)
	if err != nil {
		t.Fatal(err)
	}
	subj := []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: name}}
	if ns == "" {
		objs := []client.Object{
			&rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name}, Rules: rules},
			&rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name}, Subjects: subj,
				RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: name}},
		}
		for _, o := range objs {
			if err := p.admin.Create(ctx, o); err != nil {
				t.Fatal(err)
			}
		}
	} else {
		objs := []client.Object{
			&rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Rules: rules},
			&rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Subjects: subj,
				RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: name}},
		}
		for _, o := range objs {
			if err := p.admin.Create(ctx, o); err != nil {
				t.Fatal(err)
			}
		}
	}
	return u.Config()
}

var (
	// createQueries is what kube-apiserver itself checks before proxying.
	createQueries = rbacv1.PolicyRule{APIGroups: []string{wire.Group}, Resources: []string{wire.Resource}, Verbs: []string{"create"}}
	// listTwins is what the query API checks.
	listTwins = rbacv1.PolicyRule{APIGroups: []string{v1alpha1.GroupVersion.Group}, Resources: []string{"devicetwins"}, Verbs: []string{"list"}}
)

// post sends a TwinQuery through kube-apiserver as the user of cfg.
func post(ctx context.Context, cfg *rest.Config, ns, q string) (*wire.TwinQuery, error) {
	c := rest.CopyConfig(cfg)
	c.GroupVersion = &schema.GroupVersion{Group: wire.Group, Version: wire.Version}
	c.APIPath = "/apis"
	c.NegotiatedSerializer = clientgoscheme.Codecs.WithoutConversion()
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, err
	}
	body, _ := json.Marshal(wire.TwinQuery{TypeMeta: metav1.TypeMeta{APIVersion: wire.GroupVersion, Kind: wire.Kind}, Spec: wire.TwinQuerySpec{Query: q}})
	res := rc.Post().NamespaceIfScoped(ns, ns != "").Resource(wire.Resource).SetHeader("Content-Type", "application/json").Body(body).Do(ctx)
	if err := res.Error(); err != nil {
		return nil, err // Error, unlike Raw, decodes the Status
	}
	raw, _ := res.Raw()
	var tq wire.TwinQuery
	if err := json.Unmarshal(raw, &tq); err != nil {
		return nil, fmt.Errorf("%w: %s", err, raw)
	}
	return &tq, nil
}

// TestAggregatedAPI: through kube-apiserver, an allowed user gets the
// answer the listing path computes; a user without list rights gets 403
// from the query API; a request not from kube-apiserver's front proxy is
// refused whatever user its headers name.
func TestAggregatedAPI(t *testing.T) {
	p := startPlane(t)
	ctx := context.Background()
	p.namespace(t, "fleet")
	p.namespace(t, "other")
	p.twinFixture(t, "fleet", "hot-1", `{"plant": "Redmond43"}`, `{"telemetry": {"temperature": 95.5}}`, "Connected")
	p.twinFixture(t, "fleet", "cold-1", `{"plant": "Redmond43"}`, `{"telemetry": {"temperature": 20}}`, "")
	p.twinFixture(t, "fleet", "hot-2", `{"plant": "Seattle01"}`, `{"telemetry": {"temperature": 99}}`, "Connected")
	p.twinFixture(t, "other", "hot-3", `{"plant": "Redmond43"}`, `{"telemetry": {"temperature": 91}}`, "")

	api, err := queryapitest.Serve(ctx, p.env.Config, queryapitest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = api.Stop(ctx, p.env.Config) })

	alice := p.user(t, "alice", "fleet", createQueries, listTwins)
	bob := p.user(t, "bob", "fleet", createQueries) // may call the API, may not list twins
	carol := p.user(t, "carol", "", createQueries, listTwins)

	t.Run("discovery", func(t *testing.T) {
		kube, err := kubernetes.NewForConfig(alice)
		if err != nil {
			t.Fatal(err)
		}
		rl, err := kube.Discovery().ServerResourcesForGroupVersion(wire.GroupVersion)
		if err != nil {
			t.Fatal(err)
		}
		if len(rl.APIResources) != 1 || rl.APIResources[0].Name != wire.Resource || !rl.APIResources[0].Namespaced {
			t.Fatalf("discovery of %s: %+v", wire.GroupVersion, rl.APIResources)
		}
	})

	queries := []string{
		"SELECT * FROM devices WHERE properties.reported.telemetry.temperature > 90",
		"SELECT * FROM devices WHERE tags.plant = 'Redmond43' AND connectionState = 'Connected'",
		"SELECT deviceId, properties.reported.telemetry.temperature AS t FROM devices",
		"SELECT tags.plant AS plant, COUNT() AS n, MAX(properties.reported.telemetry.temperature) AS hottest FROM devices GROUP BY tags.plant",
		"SELECT TOP 1 * FROM devices WHERE properties.reported.telemetry.temperature > 90",
	}
	lc, err := kubectltwin.NewClient(p.env.Config)
	if err != nil {
		t.Fatal(err)
	}
	for _, scope := range []struct {
		name string
		cfg  *rest.Config
		ns   string
	}{{"alice in fleet", alice, "fleet"}, {"carol in all namespaces", carol, ""}} {
		for _, text := range queries {
			t.Run(scope.name+"/"+text, func(t *testing.T) {
				q, err := query.Parse(text)
				if err != nil {
					t.Fatal(err)
				}
				want, err := kubectltwin.Execute(ctx, lc, scope.ns, q, 0)
				if err != nil {
					t.Fatal(err)
				}
				if len(want.Items) == 0 {
					t.Fatal("the listing path answers nothing: the fixtures check nothing")
				}
				got, err := post(ctx, scope.cfg, scope.ns, text)
				if err != nil {
					t.Fatal(err)
				}
				var items []map[string]any
				for _, it := range got.Status.Items {
					d, err := twin.Decode(it)
					if err != nil {
						t.Fatal(err)
					}
					items = append(items, d)
				}
				if !reflect.DeepEqual(items, want.Items) {
					t.Fatalf("the query API answers\n%v\nthe listing path\n%v", items, want.Items)
				}
				if got.Status.ItemType != q.ItemType() {
					t.Fatalf("itemType %q, want %q", got.Status.ItemType, q.ItemType())
				}
				for i, tw := range want.Twins {
					if g := got.Status.Twins[i]; g.Namespace != tw.Namespace || g.Name != tw.Name || g.InSync != tw.InSync {
						t.Fatalf("twin %d is %+v, want %s/%s", i, g, tw.Namespace, tw.Name)
					}
				}
			})
		}
	}

	t.Run("bob may not list the twins: 403", func(t *testing.T) {
		_, err := post(ctx, bob, "fleet", queries[0])
		if !apierrors.IsForbidden(err) {
			t.Fatalf("want 403 Forbidden, got %v", err)
		}
		for _, want := range []string{`User "bob" cannot list resource "devicetwins" in API group "kubetwin.io" in the namespace "fleet"`} {
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("the refusal %q does not say %q", err, want)
			}
		}
	})
	t.Run("alice may not list all namespaces: 403", func(t *testing.T) {
		// kube-apiserver lets her through only if she may create
		// twinqueries cluster-wide: give her that, so that the refusal is
		// the query API's.
		p.user(t, "alice-cluster-create", "", createQueries)
		crb := &rbacv1.ClusterRoleBinding{}
		if err := p.admin.Get(ctx, client.ObjectKey{Name: "alice-cluster-create"}, crb); err != nil {
			t.Fatal(err)
		}
		crb.Subjects[0].Name = "alice"
		if err := p.admin.Update(ctx, crb); err != nil {
			t.Fatal(err)
		}
		var err error
		deadline := time.Now().Add(20 * time.Second)
		for {
			_, err = post(ctx, alice, "", queries[0])
			// kube-apiserver's own refusal (create twinqueries, also "at
			// the cluster scope") lasts until its RBAC cache sees the
			// binding: wait for the query API's (list devicetwins).
			if err != nil && strings.Contains(err.Error(), `cannot list resource "devicetwins"`) || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond) // RBAC caches of kube-apiserver
		}
		if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), `User "alice" cannot list resource "devicetwins" in API group "kubetwin.io" at the cluster scope`) {
			t.Fatalf("want the query API's 403 for the cluster scope, got %v", err)
		}
	})
	t.Run("a user without create twinqueries is refused by kube-apiserver", func(t *testing.T) {
		dave := p.user(t, "dave", "fleet", listTwins)
		if _, err := post(ctx, dave, "fleet", queries[0]); !apierrors.IsForbidden(err) {
			t.Fatalf("want 403 Forbidden, got %v", err)
		}
	})

	t.Run("only kube-apiserver's front proxy may name the user", func(t *testing.T) {
		body, _ := json.Marshal(wire.TwinQuery{Spec: wire.TwinQuerySpec{Query: queries[0]}})
		impostor, err := p.fp.ClientCertificate("impostor")
		if err != nil {
			t.Fatal(err)
		}
		proxy, err := p.fp.ClientCertificate("front-proxy-client")
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			name string
			cert *tls.Certificate
			want int
			user string
		}{
			{"no client certificate", nil, http.StatusUnauthorized, ""},
			{"a certificate of the front-proxy CA with another name", &impostor, http.StatusUnauthorized, ""},
			{"a self-made certificate named front-proxy-client", selfMade(t), http.StatusUnauthorized, ""},
			// The control: the same request with kube-apiserver's identity.
			{"the front proxy's certificate", &proxy, http.StatusCreated, ""},
			{"the front proxy's certificate, naming bob", &proxy, http.StatusForbidden, "bob"},
		} {
			tc := &tls.Config{InsecureSkipVerify: true} //nolint:gosec // the test checks the client side only
			if c.cert != nil {
				tc.Certificates = []tls.Certificate{*c.cert}
			}
			hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tc}}
			req, _ := http.NewRequest(http.MethodPost, "https://"+api.Addr+"/apis/"+wire.GroupVersion+"/namespaces/fleet/"+wire.Resource, bytes.NewReader(body))
			req.Header.Set("X-Remote-User", cmpOr(c.user, "alice"))
			if c.user == "" {
				req.Header.Set("X-Remote-Group", "system:masters") // what an impostor would claim
			}
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			t.Logf("%s: %d %s", c.name, resp.StatusCode, b)
			if resp.StatusCode != c.want {
				t.Errorf("%s: status %d, want %d: %s", c.name, resp.StatusCode, c.want, b)
			}
		}
	})

	// Last: it adds large twins to the namespace the subtests above query.
	t.Run("a large answer comes gzipped through kube-apiserver", func(t *testing.T) {
		p.namespace(t, "large")
		blob := strings.Repeat("abcdefgh", 10<<10) // 80 KiB a twin
		for i := range 3 {
			p.twinFixture(t, "large", fmt.Sprintf("large-%d", i), `{"plant": "Redmond43"}`, `{"blob": "`+blob+`"}`, "")
		}
		erin := p.user(t, "erin", "large", createQueries, listTwins)
		body, _ := json.Marshal(wire.TwinQuery{Spec: wire.TwinQuerySpec{Query: "SELECT * FROM devices"}})
		// ask posts the query as erin with Accept-Encoding set (so that
		// the transport leaves the response as it came) and returns its
		// Content-Encoding and body.
		ask := func(acceptEncoding string) (string, []byte) {
			rt, err := rest.TransportFor(erin)
			if err != nil {
				t.Fatal(err)
			}
			req, _ := http.NewRequest(http.MethodPost, strings.TrimSuffix(erin.Host, "/")+"/apis/"+wire.GroupVersion+"/namespaces/large/"+wire.Resource, bytes.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Accept-Encoding", acceptEncoding)
			resp, err := rt.RoundTrip(req)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = resp.Body.Close() }()
			b, err := io.ReadAll(resp.Body)
			if err != nil || resp.StatusCode != http.StatusCreated {
				t.Fatalf("Accept-Encoding %q: %d %v %.300s", acceptEncoding, resp.StatusCode, err, b)
			}
			return resp.Header.Get("Content-Encoding"), b
		}
		var plain []byte
		deadline := time.Now().Add(20 * time.Second)
		for {
			// The query API's cache sees the twins after its watch does.
			enc, b := ask("identity")
			var tq wire.TwinQuery
			if err := json.Unmarshal(b, &tq); err != nil || enc != "" {
				t.Fatalf("identity: Content-Encoding %q, %v", enc, err)
			}
			if plain = b; len(tq.Status.Items) == 3 || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if len(plain) < 3*len(blob) {
			t.Fatalf("the plain answer is %d bytes: the twins are not all in it", len(plain))
		}
		enc, zipped := ask("gzip")
		if enc != "gzip" || len(zipped)*4 > len(plain) {
			t.Fatalf("Accept-Encoding gzip: Content-Encoding %q, %d bytes for a plain answer of %d", enc, len(zipped), len(plain))
		}
		zr, err := gzip.NewReader(bytes.NewReader(zipped))
		if err != nil {
			t.Fatal(err)
		}
		if got, err := io.ReadAll(zr); err != nil || !bytes.Equal(got, plain) {
			t.Fatalf("the gzipped answer inflates to %d bytes (%v), the plain one is %d", len(got), err, len(plain))
		}
		// And as client-go reads it (kubectl twin query's client).
		got, err := post(ctx, erin, "large", "SELECT * FROM devices")
		if err != nil || len(got.Status.Items) != 3 {
			t.Fatalf("through client-go: %v", err)
		}
	})
}

// selfMade is a client certificate named front-proxy-client from a CA the
// API server does not know.
func selfMade(t *testing.T) *tls.Certificate {
	fp, err := queryapitest.Configure(&envtest.Environment{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fp.Cleanup() })
	c, err := fp.ClientCertificate("front-proxy-client")
	if err != nil {
		t.Fatal(err)
	}
	return &c
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// BenchmarkFleetThroughAPIServer times queries over a fleet of
// $KUBETWIN_QUERYAPI_FLEET twins (default 10,000) in envtest, the two ways
// kubectl-twin answers them: listing every twin through kube-apiserver
// (pages of 500, evaluated in the client) and one request to the query
// API through kube-apiserver's proxy. Creating the fleet takes minutes.
//
//	KUBEBUILDER_ASSETS=$(hack/controlplane.sh) go test ./internal/queryapi -run XXX -bench FleetThroughAPIServer -benchtime 3x
func BenchmarkFleetThroughAPIServer(b *testing.B) {
	n := 10000
	if v := os.Getenv("KUBETWIN_QUERYAPI_FLEET"); v != "" {
		if _, err := fmt.Sscan(v, &n); err != nil {
			b.Fatalf("KUBETWIN_QUERYAPI_FLEET=%q: %v", v, err)
		}
	}
	p := startPlane(b)
	ctx := context.Background()
	if err := p.admin.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "scale"}}); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	work := make(chan int)
	errs := make(chan error, 16)
	for range 16 {
		go func() {
			for i := range work {
				tw := benchTwin(i)
				st := tw.Status
				err := p.admin.Create(ctx, tw)
				if err == nil {
					tw.Status = st
					err = p.admin.Status().Update(ctx, tw)
				}
				if err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for i := range n {
		work <- i
	}
	close(work)
	for range 16 {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
	b.Logf("created %d twins in %v", n, time.Since(start).Round(time.Second))
	api, err := queryapitest.Serve(ctx, p.env.Config, queryapitest.Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = api.Stop(ctx, p.env.Config) })
	lc, err := kubectltwin.NewClient(p.env.Config)
	if err != nil {
		b.Fatal(err)
	}
	ac, err := kubectltwin.NewQueryAPI(p.env.Config, wire.Group)
	if err != nil {
		b.Fatal(err)
	}
	for _, text := range []string{
		"SELECT * FROM devices WHERE properties.reported.telemetry.temperature > 99",
		"SELECT COUNT() AS n FROM devices WHERE properties.reported.telemetry.temperature > 90",
		"SELECT * FROM devices WHERE tags.location.plant = 'Plant-07'",
	} {
		q, err := query.Parse(text)
		if err != nil {
			b.Fatal(err)
		}
		for _, via := range []string{kubectltwin.ViaList, kubectltwin.ViaAPI} {
			b.Run(via+"/"+text, func(b *testing.B) {
				var items int
				for b.Loop() {
					var ans *kubectltwin.Answer
					if via == kubectltwin.ViaList {
						ans, err = kubectltwin.Execute(ctx, lc, "scale", q, kubectltwin.DefaultChunkSize)
					} else {
						ans, err = ac.Execute(ctx, "scale", q)
					}
					if err != nil {
						b.Fatal(err)
					}
					items = len(ans.Items)
				}
				b.ReportMetric(float64(items), "items")
				b.ReportMetric(float64(n), "twins")
			})
		}
	}
}

// benchTwin is twin i of the bench fleet (twinscantest.FleetTwin),
// ready to create; its status is written after.
func benchTwin(i int) *v1alpha1.DeviceTwin {
	src := twinscantest.FleetTwin(i)
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: src.Namespace, Name: src.Name, Labels: src.Labels}}
	tw.Spec = src.Spec
	tw.Status = src.Status
	tw.Status.ObservedGeneration = 1
	return tw
}
