// Package queryapitest runs the query.kubetwin.io aggregated API against an
// envtest control plane the way a cluster runs it: kube-apiserver with a
// front-proxy client certificate and request-header flags, an APIService
// whose Service leads to a query API server in the test process, that
// server authenticating kube-apiserver's certificate and asking it
// SubjectAccessReviews, and answering from a controller-runtime cache.
package queryapitest

import (
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/queryapi"
	"github.com/kubetwin/kubetwin/internal/queryapi/wire"
	"github.com/kubetwin/kubetwin/internal/twinscan"
)

// Where the APIService points.
const (
	ServiceNamespace = "kube-system"
	ServiceName      = "kubetwin-query-api"
	APIServiceName   = wire.Version + "." + wire.Group
	frontProxyName   = "front-proxy-client"
)

// APIServiceNameOf is the APIService of group's version.
func APIServiceNameOf(group string) string { return wire.Version + "." + group }

// ServiceNameOf is the Service the APIService of group leads to:
// ServiceName for wire.Group, ServiceName-<namespace> for a shard's.
func ServiceNameOf(group string) string {
	if ns, ok := strings.CutSuffix(group, "."+wire.Group); ok {
		return ServiceName + "-" + ns
	}
	return ServiceName
}

// FrontProxy is the front-proxy configuration of a test API server.
type FrontProxy struct {
	dir    string
	caPEM  []byte
	caKey  *ecdsa.PrivateKey
	caCert *x509.Certificate
}

// Configure gives env's kube-apiserver a front-proxy CA and client
// certificate and the request-header flags (as kubeadm sets them); call
// it before env.Start. Cleanup removes the files.
func Configure(env *envtest.Environment) (*FrontProxy, error) {
	dir, err := os.MkdirTemp("", "kubetwin-front-proxy-")
	if err != nil {
		return nil, err
	}
	fp := &FrontProxy{dir: dir}
	if fp.caKey, fp.caCert, fp.caPEM, err = newCert("front-proxy-ca", nil, nil, nil, 0); err != nil {
		return nil, err
	}
	key, _, certPEM, err := newCert(frontProxyName, fp.caCert, fp.caKey, nil, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return nil, err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{
		"front-proxy-ca.crt":     fp.caPEM,
		"front-proxy-client.crt": certPEM,
		"front-proxy-client.key": pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}),
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			return nil, err
		}
	}
	args := env.ControlPlane.GetAPIServer().Configure()
	args.Set("requestheader-client-ca-file", filepath.Join(dir, "front-proxy-ca.crt")).
		Set("requestheader-allowed-names", frontProxyName).
		Set("requestheader-username-headers", "X-Remote-User").
		Set("requestheader-group-headers", "X-Remote-Group").
		Set("requestheader-extra-headers-prefix", "X-Remote-Extra-").
		Set("proxy-client-cert-file", filepath.Join(dir, "front-proxy-client.crt")).
		Set("proxy-client-key-file", filepath.Join(dir, "front-proxy-client.key"))
	return fp, nil
}

// Cleanup removes the certificate files.
func (fp *FrontProxy) Cleanup() error { return os.RemoveAll(fp.dir) }

// ClientCertificate returns a client certificate from the front-proxy CA
// with common name cn: what kube-apiserver presents when cn is
// "front-proxy-client", an impostor's otherwise.
func (fp *FrontProxy) ClientCertificate(cn string) (tls.Certificate, error) {
	key, cert, _, err := newCert(cn, fp.caCert, fp.caKey, nil, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}, nil
}

// newCert makes a certificate for cn signed by parent (self-signed when
// parent is nil: a CA), for hosts and use (0: a CA), and returns its key,
// the certificate and its PEM.
func newCert(cn string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey, hosts []string, use x509.ExtKeyUsage) (*ecdsa.PrivateKey, *x509.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: cn},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true,
	}
	if parent == nil {
		tmpl.IsCA, tmpl.KeyUsage = true, tmpl.KeyUsage|x509.KeyUsageCertSign
		parent, parentKey = tmpl, key
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{use}
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		return nil, nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, nil, err
	}
	return key, cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

// Running is a query API server registered with the API server.
type Running struct {
	// Addr is where the server listens (127.0.0.1:port).
	Addr   string
	group  string
	cancel context.CancelFunc
	done   chan error
	admin  client.Client
	// stopped makes Stop once only (a test's cleanup may stop it again).
	stopped sync.Once
	stopErr error
}

// Options of Serve.
type Options struct {
	// Namespace the "operator" watches ("" for all).
	Namespace string
	// Group is the API group to register the server's APIService for
	// (wire.Group if empty); the server also serves
	// wire.ShardGroup(Namespace) when Namespace is set.
	Group string
	// MaxConcurrentQueries and MaxResponseBytes, 0 for the defaults.
	MaxConcurrentQueries, MaxResponseBytes int
	Log                                    logr.Logger
	// GetCertificate, when set, serves the operator's certificate instead
	// of a test one, and the APIService is registered without a caBundle
	// (insecureSkipTLSVerify), as before the operator kept it.
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
}

// Serve starts a query API server for the cluster of admin (a system:masters
// configuration) answering from a DeviceTwin cache, registers it with an
// APIService and waits until kube-apiserver reports it Available.
func Serve(ctx context.Context, admin *rest.Config, o Options) (*Running, error) {
	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1alpha1.AddToScheme(scheme)
	c, err := client.New(admin, client.Options{Scheme: scheme})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	group := cmp.Or(o.Group, wire.Group)
	r := &Running{cancel: cancel, done: make(chan error, 1), admin: c, group: group}
	ok := false
	defer func() {
		if !ok {
			cancel()
		}
	}()

	co := cache.Options{Scheme: scheme}
	if o.Namespace != "" {
		co.DefaultNamespaces = map[string]cache.Config{o.Namespace: {}}
	}
	twins, err := cache.New(admin, co)
	if err != nil {
		return nil, err
	}
	if _, err := twins.GetInformer(ctx, &v1alpha1.DeviceTwin{}); err != nil {
		return nil, err
	}
	go func() { _ = twins.Start(ctx) }()
	if !twins.WaitForCacheSync(ctx) {
		return nil, errors.New("the DeviceTwin cache did not sync")
	}

	kube, err := kubernetes.NewForConfig(admin)
	if err != nil {
		return nil, err
	}
	d, err := queryapi.NewDelegating(kube)
	if err != nil {
		return nil, err
	}
	host := ServiceNameOf(group) + "." + ServiceNamespace + ".svc"
	_, servingCert, servingPEM, err := newServing(host)
	if err != nil {
		return nil, err
	}
	tlsCfg := &tls.Config{Certificates: []tls.Certificate{servingCert}}
	if o.GetCertificate != nil {
		tlsCfg, servingPEM = &tls.Config{GetCertificate: o.GetCertificate}, nil
	}
	srv := &queryapi.Server{
		Addr:      "127.0.0.1:0",
		TLSConfig: tlsCfg,
		Handler: queryapi.NewHandler(queryapi.Options{
			Twins: twinscan.CacheLister(twins), Namespace: o.Namespace, Authenticator: d, Authorizer: d,
			MaxConcurrentQueries: o.MaxConcurrentQueries, MaxResponseBytes: o.MaxResponseBytes, Log: o.Log,
		}),
		Delegating: d, Log: o.Log,
	}
	go func() { r.done <- srv.Start(ctx) }()
	deadline := time.Now().Add(30 * time.Second)
	for srv.ListenAddr() == nil {
		select {
		case err := <-r.done:
			return nil, fmt.Errorf("the query API server stopped: %w", err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, errors.New("the query API server did not listen within 30s")
		}
	}
	r.Addr = srv.ListenAddr().String()
	if err := RegisterGroup(ctx, admin, group, r.Addr, servingPEM); err != nil {
		return nil, err
	}
	ok = true
	return r, nil
}

// newServing makes the serving certificate for host (and 127.0.0.1),
// self-signed, returned with its PEM for the APIService's caBundle.
func newServing(host string) (*ecdsa.PrivateKey, tls.Certificate, []byte, error) {
	key, cert, certPEM, err := newCert(host, nil, nil, []string{host, "127.0.0.1"}, 0)
	if err != nil {
		return nil, tls.Certificate{}, nil, err
	}
	return key, tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}, certPEM, nil
}

// Register is RegisterGroup of wire.Group.
func Register(ctx context.Context, admin *rest.Config, addr string, caBundle []byte) error {
	return RegisterGroup(ctx, admin, wire.Group, addr, caBundle)
}

// RegisterGroup points kube-apiserver at a query API server of group listening on addr
// (an IP address and port, e.g. an operator started with
// --query-api-bind-address=127.0.0.1:8444): it creates the Service
// (ExternalName: kube-apiserver's proxy dials the address it holds) and
// the APIService, with caBundle (nil: insecureSkipTLSVerify, for the
// operator's self-signed certificate), and waits until kube-apiserver
// reports it Available and serves its discovery. admin is a
// system:masters configuration.
func RegisterGroup(ctx context.Context, admin *rest.Config, group, addr string, caBundle []byte) error {
	c, err := client.New(admin, client.Options{})
	if err != nil {
		return err
	}
	host, portText, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	port, err := strconv.Atoi(portText)
	if err != nil {
		return fmt.Errorf("port of %s: %w", addr, err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ServiceNamespace, Name: ServiceNameOf(group)},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: host},
	}
	if err := c.Create(ctx, svc); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating Service %s/%s: %w", ServiceNamespace, svc.Name, err)
	}
	spec := map[string]any{
		"group": group, "version": wire.Version,
		"groupPriorityMinimum": int64(1000), "versionPriority": int64(100),
		"service": map[string]any{"namespace": ServiceNamespace, "name": svc.Name, "port": int64(port)},
	}
	if caBundle != nil {
		spec["caBundle"] = caBundle
	} else {
		spec["insecureSkipTLSVerify"] = true
	}
	as := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "apiregistration.k8s.io/v1",
		"kind":       "APIService",
		"metadata":   map[string]any{"name": APIServiceNameOf(group)},
		"spec":       spec,
	}}
	if err := c.Create(ctx, as); err != nil {
		return fmt.Errorf("creating APIService %s: %w", APIServiceNameOf(group), err)
	}
	if err := waitAvailable(ctx, c, group); err != nil {
		return err
	}
	// Available can come before kube-apiserver routes the group: wait
	// until its discovery answers through it.
	return waitServed(ctx, admin, group, true)
}

func waitAvailable(ctx context.Context, c client.Client, group string) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		ok, msg, err := available(ctx, c, group)
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("APIService %s did not become Available within 60s: %s (read error: %v)", APIServiceNameOf(group), msg, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func available(ctx context.Context, c client.Client, group string) (bool, string, error) {
	got := &unstructured.Unstructured{}
	got.SetGroupVersionKind(schema.GroupVersionKind{Group: "apiregistration.k8s.io", Version: "v1", Kind: "APIService"})
	if err := c.Get(ctx, client.ObjectKey{Name: APIServiceNameOf(group)}, got); err != nil {
		return false, "not read", err
	}
	conds, _, _ := unstructured.NestedSlice(got.Object, "status", "conditions")
	for _, cd := range conds {
		m, _ := cd.(map[string]any)
		if m["type"] == "Available" {
			return m["status"] == "True", fmt.Sprintf("%v: %v", m["reason"], m["message"]), nil
		}
	}
	return false, "no Available condition yet", nil
}

// Stop unregisters the server (UnregisterGroup) and stops it; again, it
// returns what the first Stop did.
func (r *Running) Stop(ctx context.Context, admin *rest.Config) error {
	r.stopped.Do(func() {
		err := UnregisterGroup(ctx, admin, r.group)
		r.cancel()
		r.stopErr = errors.Join(err, <-r.done)
	})
	return r.stopErr
}

// Unregister is UnregisterGroup of wire.Group.
func Unregister(ctx context.Context, admin *rest.Config) error {
	return UnregisterGroup(ctx, admin, wire.Group)
}

// UnregisterGroup deletes group's APIService and Service and waits until
// kube-apiserver no longer serves the group (a 404 for its discovery).
func UnregisterGroup(ctx context.Context, admin *rest.Config, group string) error {
	c, err := client.New(admin, client.Options{})
	if err != nil {
		return err
	}
	as := &unstructured.Unstructured{}
	as.SetGroupVersionKind(schema.GroupVersionKind{Group: "apiregistration.k8s.io", Version: "v1", Kind: "APIService"})
	as.SetName(APIServiceNameOf(group))
	return errors.Join(client.IgnoreNotFound(c.Delete(ctx, as)),
		client.IgnoreNotFound(c.Delete(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ServiceNamespace, Name: ServiceNameOf(group)}})),
		waitServed(ctx, admin, group, false))
}

// waitServed waits until kube-apiserver serves group's discovery
// (served) or answers 404 for it (!served).
func waitServed(ctx context.Context, admin *rest.Config, group string, served bool) error {
	kube, err := kubernetes.NewForConfig(admin)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		err = kube.Discovery().RESTClient().Get().AbsPath("/apis/" + wire.GroupVersionOf(group)).Do(ctx).Error()
		if served && err == nil || !served && apierrors.IsNotFound(err) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kube-apiserver's discovery of %s after 30s (want served: %v): %v", wire.GroupVersionOf(group), served, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
