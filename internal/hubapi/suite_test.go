package hubapi_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/internal/hubapi"
	"github.com/kubetwin/kubetwin/internal/testutil/selfsigned"
	"github.com/kubetwin/kubetwin/internal/twinscan"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// The suite runs a manager (its cache, with the device id index, and the
// service API server) against a real kube-apiserver and etcd. No
// DeviceTwin reconciler runs: tests write status themselves where they
// need it. A small controller claims each new twin's device id
// (internal/deviceid), as the admission webhook and the reconciler do in
// the operator; a twin whose id another live twin holds stays unclaimed.
var (
	k8s        client.Client // reads and writes the API server directly
	mgr        manager.Manager
	testScheme = runtime.NewScheme()
	baseURL    string
	httpc      *http.Client
	policyKeys map[string][2]string // policy -> primary, secondary key
	resolver   deviceid.Resolver
)

const (
	hubHost      = "hub.kubetwin.test"
	devNS        = "devices"
	otherNS      = "other-devices"
	policyNS     = "kubetwin-system"
	claimsNS     = policyNS
	policySecret = "kubetwin-service-policies"
	testTTL      = 200 * time.Millisecond
)

func TestMain(m *testing.M) { os.Exit(runSuite(m)) }

func runSuite(m *testing.M) int {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		fmt.Fprintln(os.Stderr, "KUBEBUILDER_ASSETS is not set: run the tests with make test (it builds the control plane)")
		return 1
	}
	level := zapcore.Level(2)
	if os.Getenv("KUBETWIN_TEST_VERBOSE") != "" {
		level = -1
	}
	ctrl.SetLogger(zap.New(zap.UseDevMode(true), zap.Level(level)))
	_ = clientgoscheme.AddToScheme(testScheme)
	_ = v1alpha1.AddToScheme(testScheme)

	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	cfg, err := env.Start()
	if err != nil {
		fmt.Fprintf(os.Stderr, "starting envtest: %v\n", err)
		return 1
	}
	defer func() { _ = env.Stop() }()
	if k8s, err = client.New(cfg, client.Options{Scheme: testScheme}); err != nil {
		fmt.Fprintf(os.Stderr, "client: %v\n", err)
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for _, ns := range []string{devNS, otherNS, policyNS} {
		if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			fmt.Fprintf(os.Stderr, "namespace: %v\n", err)
			return 1
		}
	}
	if err := hubapi.EnsurePolicies(ctx, k8s, policyNS, policySecret, hubHost); err != nil {
		fmt.Fprintf(os.Stderr, "policies: %v\n", err)
		return 1
	}
	if err := loadPolicyKeys(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "policies: %v\n", err)
		return 1
	}

	mgr, err = ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 testScheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Cache:                  cache.Options{ByObject: controllers.KeySecretCacheOptions()},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "manager: %v\n", err)
		return 1
	}
	if err := deviceid.IndexTwins(ctx, mgr.GetFieldIndexer()); err != nil {
		fmt.Fprintf(os.Stderr, "index: %v\n", err)
		return 1
	}
	resolver = deviceid.Resolver{Reader: mgr.GetClient(), Namespace: claimsNS}
	if err := addClaimer(mgr); err != nil {
		fmt.Fprintf(os.Stderr, "claimer: %v\n", err)
		return 1
	}
	h, err := newHandler(hubapi.Options{})
	if err != nil {
		fmt.Fprintf(os.Stderr, "handler: %v\n", err)
		return 1
	}
	tlsCfg, pool, err := selfSigned()
	if err != nil {
		fmt.Fprintf(os.Stderr, "certificate: %v\n", err)
		return 1
	}
	srv, err := hubapi.NewServer(hubapi.ServerOptions{Addr: "127.0.0.1:0", TLSConfig: tlsCfg, Handler: h,
		Logger: ctrl.Log.WithName("service-api")})
	if err != nil {
		fmt.Fprintf(os.Stderr, "server: %v\n", err)
		return 1
	}
	if err := mgr.Add(srv); err != nil {
		fmt.Fprintf(os.Stderr, "adding the server: %v\n", err)
		return 1
	}
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	select {
	case <-srv.Ready():
	case err := <-done:
		fmt.Fprintf(os.Stderr, "manager stopped: %v\n", err)
		return 1
	case <-time.After(60 * time.Second):
		fmt.Fprintln(os.Stderr, "the server did not start")
		return 1
	}
	if !mgr.GetCache().WaitForCacheSync(ctx) {
		fmt.Fprintln(os.Stderr, "cache did not sync")
		return 1
	}
	baseURL = "https://" + srv.Addr()
	httpc = &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true,
	}}
	code := m.Run()
	cancel()
	<-done
	return code
}

// addClaimer adds the controller that claims the device id of every twin.
func addClaimer(mgr manager.Manager) error {
	claims := &deviceid.Claims{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Namespace: claimsNS}
	return ctrl.NewControllerManagedBy(mgr).Named("test-claimer").For(&v1alpha1.DeviceTwin{}).
		Complete(reconcile.Func(func(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
			t := &v1alpha1.DeviceTwin{}
			if err := mgr.GetAPIReader().Get(ctx, req.NamespacedName, t); err != nil || !t.DeletionTimestamp.IsZero() {
				return reconcile.Result{}, client.IgnoreNotFound(err)
			}
			var held *deviceid.HeldError
			if err := claims.Claim(ctx, t); err != nil && !errors.As(err, &held) {
				return reconcile.Result{}, err
			}
			return reconcile.Result{}, nil
		}))
}

// newHandler returns a Handler over the suite's manager, with o's fields
// (readers included) where set.
func newHandler(o hubapi.Options) (*hubapi.Handler, error) {
	o.Client = mgr.GetClient()
	if o.Reader == nil {
		// As the operator: queries list the cache's own objects.
		o.Reader = mgr.GetClient()
		o.Twins = twinscan.CacheLister(mgr.GetCache())
		ns := o.Namespace
		if ns == "" {
			ns = devNS
		}
		o.Order = twinscan.CacheOrder(mgr.GetCache(), ns)
	}
	if o.APIReader == nil {
		o.APIReader = mgr.GetAPIReader()
	}
	o.Resolve = resolver.Resolve
	if o.Namespace == "" {
		o.Namespace = devNS
	}
	if o.HubHostname == "" {
		o.HubHostname = hubHost
	}
	if o.PolicySecret.Name == "" {
		o.PolicySecret = types.NamespacedName{Namespace: policyNS, Name: policySecret}
	}
	if o.PolicyTTL == 0 {
		o.PolicyTTL = testTTL
	}
	if o.Logger.GetSink() == nil {
		o.Logger = ctrl.Log.WithName("service-api")
	}
	return hubapi.NewHandler(o)
}

func loadPolicyKeys(ctx context.Context) error {
	s := &corev1.Secret{}
	if err := k8s.Get(ctx, types.NamespacedName{Namespace: policyNS, Name: policySecret}, s); err != nil {
		return err
	}
	policyKeys = map[string][2]string{}
	for _, p := range []string{"iothubowner", "service", "registryRead", "registryReadWrite"} {
		policyKeys[p] = [2]string{string(s.Data[p+".primaryKey"]), string(s.Data[p+".secondaryKey"])}
	}
	return nil
}

// selfSigned returns a server TLS configuration for 127.0.0.1 and the
// pool that trusts it.
func selfSigned() (*tls.Config, *x509.CertPool, error) {
	cert, pool, err := selfsigned.New()
	if err != nil {
		return nil, nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}}, pool, nil
}

// token signs a service token for the hub with a policy's key.
func token(t testing.TB, policy, key string, expiry time.Time) string {
	t.Helper()
	k, err := sas.DecodeKey(key)
	if err != nil {
		t.Fatalf("key of %s: %v", policy, err)
	}
	return sas.Sign(hubHost, k, expiry, policy)
}

// ownerToken is a valid token of the iothubowner policy.
func ownerToken(t testing.TB) string {
	return token(t, "iothubowner", policyKeys["iothubowner"][0], time.Now().Add(time.Hour))
}

// response is a reply as the tests look at it.
type response struct {
	status int
	header http.Header
	body   []byte
	proto  string
}

// call sends a request to the suite's server. hdr may set Authorization
// ("" sends none); without it the request carries an iothubowner token.
// body is sent as is when it is a string or []byte, else as JSON.
func call(t testing.TB, method, path string, hdr map[string]string, body any) response {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(data)
	}
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	req, err := http.NewRequest(method, baseURL+path+sep+"api-version=2021-04-12", rd)
	if err != nil {
		t.Fatal(err)
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json; charset=utf-8")
	}
	req.Header.Set("Authorization", ownerToken(t))
	req.Header.Set("Request-Id", "test-request")
	for k, v := range hdr {
		if k == "Authorization" && v == "" {
			req.Header.Del(k)
			continue
		}
		req.Header.Set(k, v)
	}
	resp, err := httpc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: data, proto: resp.Proto}
}

// object decodes a JSON object reply (numbers as json.Number).
func (r response) object(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	dec := json.NewDecoder(bytes.NewReader(r.body))
	dec.UseNumber()
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("reply is not a JSON object: %v: %s", err, r.body)
	}
	return m
}

// array decodes a JSON array reply.
func (r response) array(t testing.TB) []map[string]any {
	t.Helper()
	var a []map[string]any
	dec := json.NewDecoder(bytes.NewReader(r.body))
	dec.UseNumber()
	if err := dec.Decode(&a); err != nil {
		t.Fatalf("reply is not a JSON array of objects: %v: %s", err, r.body)
	}
	return a
}

// expect checks the status code and, for JSON replies, the content type.
func (r response) expect(t testing.TB, status int) response {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d; body %s", r.status, status, r.body)
	}
	if len(r.body) > 0 {
		if ct := r.header.Get("Content-Type"); ct != "application/json; charset=utf-8" {
			t.Fatalf("Content-Type %q", ct)
		}
	}
	return r
}

// expectError checks an IoT Hub error reply the way the Node SDK's
// parseErrorBody reads it: the code is what follows "ErrorCode:" up to
// ';', the message what follows up to the next ';'.
func (r response) expectError(t testing.TB, status int, code, message string) {
	t.Helper()
	r.expect(t, status)
	var body map[string]string
	if err := json.Unmarshal(r.body, &body); err != nil {
		t.Fatalf("error body is not {\"Message\": ..., \"ExceptionMessage\": ...}: %v: %s", err, r.body)
	}
	if len(body) != 2 || !strings.HasPrefix(body["ExceptionMessage"], "Tracking ID:") ||
		!strings.Contains(body["ExceptionMessage"], "-TimeStamp:") {
		t.Fatalf("error body %s: want exactly Message and ExceptionMessage (Tracking ID:...-TimeStamp:...)", r.body)
	}
	parts := strings.Split(body["Message"], ";")
	gotCode := strings.Split(parts[0], ":")
	if len(parts) != 2 || len(gotCode) != 2 || gotCode[0] != "ErrorCode" {
		t.Fatalf("Message %q is not ErrorCode:<code>;<message> with no other ';'", body["Message"])
	}
	if gotCode[1] != code {
		t.Errorf("error code %q, want %q (message %q)", gotCode[1], code, parts[1])
	}
	if message != "" && parts[1] != message {
		t.Errorf("error message\n got %q\nwant %q", parts[1], message)
	}
}

// errorMessage returns the message part of an error reply.
func (r response) errorMessage(t testing.TB) string {
	t.Helper()
	var body map[string]string
	if err := json.Unmarshal(r.body, &body); err != nil {
		t.Fatalf("error body: %v: %s", err, r.body)
	}
	_, msg, _ := strings.Cut(body["Message"], ";")
	return msg
}

// reset deletes every DeviceTwin and every Secret of the device
// namespaces and every device id claim, and waits until the cache has
// seen it, so that a test starts from an empty fleet (and the suite can
// run with -count=n).
func reset(t testing.TB) {
	t.Helper()
	ctx := context.Background()
	for _, ns := range []string{devNS, otherNS} {
		if err := k8s.DeleteAllOf(ctx, &v1alpha1.DeviceTwin{}, client.InNamespace(ns)); err != nil {
			t.Fatalf("deleting twins: %v", err)
		}
		if err := k8s.DeleteAllOf(ctx, &corev1.Secret{}, client.InNamespace(ns)); err != nil {
			t.Fatalf("deleting Secrets: %v", err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var list v1alpha1.DeviceTwinList
		if err := mgr.GetClient().List(ctx, &list); err != nil {
			t.Fatal(err)
		}
		var claims v1alpha1.DeviceIDClaimList
		if err := mgr.GetClient().List(ctx, &claims, client.InNamespace(claimsNS)); err != nil {
			t.Fatal(err)
		}
		if len(list.Items) == 0 && len(claims.Items) == 0 {
			return
		}
		if len(list.Items) == 0 {
			// Once the twins are gone, as often as the claimer may have
			// claimed for a twin being deleted.
			if err := k8s.DeleteAllOf(ctx, &v1alpha1.DeviceIDClaim{}, client.InNamespace(claimsNS)); err != nil {
				t.Fatalf("deleting claims: %v", err)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cache still holds %d twins and %d claims", len(list.Items), len(claims.Items))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// newTwin creates a DeviceTwin in ns and waits until the cache holds it
// and, unless another twin holds its device id, resolves the id to it.
// Tags and desired are JSON texts ("" for none).
func newTwin(t testing.TB, ns, name, deviceID, tags, desired string) *v1alpha1.DeviceTwin {
	t.Helper()
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: v1alpha1.DeviceTwinSpec{DeviceID: deviceID}}
	if tags != "" {
		tw.Spec.Tags = &apiextensionsv1.JSON{Raw: []byte(tags)}
	}
	if desired != "" {
		tw.Spec.Desired = &apiextensionsv1.JSON{Raw: []byte(desired)}
	}
	if err := k8s.Create(context.Background(), tw); err != nil {
		t.Fatalf("creating twin %s: %v", name, err)
	}
	waitCached(t, tw)
	return tw
}

// waitHolder waits until tw's device id resolves to tw, or to another live
// twin that holds it.
func waitHolder(t testing.TB, tw *v1alpha1.DeviceTwin) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, err := resolver.Resolve(context.Background(), tw.EffectiveDeviceID())
		if err == nil && got != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("device id %q of twin %s resolves to no twin: %v", tw.EffectiveDeviceID(), tw.Name, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitCached waits until the cache holds tw at its resourceVersion and
// resolves its device id (to tw, or to another twin that holds it).
func waitCached(t testing.TB, tw *v1alpha1.DeviceTwin) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := &v1alpha1.DeviceTwin{}
		err := mgr.GetClient().Get(context.Background(), client.ObjectKeyFromObject(tw), got)
		if err == nil && got.ResourceVersion == tw.ResourceVersion {
			waitHolder(t, tw)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cache did not catch up with twin %s", tw.Name)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// getTwinObject reads a twin from the API server.
func getTwinObject(t testing.TB, ns, name string) *v1alpha1.DeviceTwin {
	t.Helper()
	tw := &v1alpha1.DeviceTwin{}
	if err := k8s.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: name}, tw); err != nil {
		t.Fatalf("reading twin %s/%s: %v", ns, name, err)
	}
	return tw
}

// jsonEqual compares a JSON field with the JSON text want.
func jsonEqual(t testing.TB, what string, got *apiextensionsv1.JSON, want string) {
	t.Helper()
	var g, w any
	if got == nil {
		g = nil
	} else if err := json.Unmarshal(got.Raw, &g); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("%s: bad want: %v", what, err)
	}
	gb, _ := json.Marshal(g)
	wb, _ := json.Marshal(w)
	if !bytes.Equal(gb, wb) {
		t.Errorf("%s = %s, want %s", what, gb, wb)
	}
}

// valueEqual compares a decoded JSON value with the JSON text want.
func valueEqual(t testing.TB, what string, got any, want string) {
	t.Helper()
	var w any
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("%s: bad want: %v", what, err)
	}
	gb, _ := json.Marshal(got)
	wb, _ := json.Marshal(w)
	if !bytes.Equal(gb, wb) {
		t.Errorf("%s = %s, want %s", what, gb, wb)
	}
}
