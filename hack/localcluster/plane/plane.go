// Package plane starts the local control plane (etcd + kube-apiserver from
// KUBEBUILDER_ASSETS, through controller-runtime's envtest) that the demo
// and the shard tests use, optionally with kubetwin's objects in an etcd of
// their own.
//
// kube-apiserver's --etcd-servers-overrides does not apply to custom
// resources (its help says so: "applies only to resources compiled into this
// server binary"; CRDs get one storage factory without overrides), so a
// dedicated etcd for DeviceTwins takes a second kube-apiserver: the "twin
// store". It serves the kubetwin.io CRDs from its own etcd, and the main
// kube-apiserver delegates the group to it through the aggregation layer (an
// APIService), the way metrics-server is plugged in. Clients and the
// operator keep talking to the main API server only; it authenticates them,
// authorizes them with its RBAC, audits the request and proxies it. The twin
// store trusts the main server's front-proxy client certificate
// (--requestheader-*) and asks the main server's RBAC for every decision
// (--authorization-mode=Webhook), so RBAC stays in one place.
package plane

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// What the twin store is called in the main API server.
const (
	// Group is the API group the twin store serves.
	Group = "kubetwin.io"
	// Version is the group's version the APIService delegates.
	Version = "v1alpha1"
	// StoreNamespace and StoreService name the Service the APIService
	// points at (an ExternalName to the twin store's address); the main
	// server's proxy expects the name <service>.<namespace>.svc in the twin
	// store's certificate.
	StoreNamespace = "kube-system"
	StoreService   = "kubetwin-twin-store"

	frontProxyUser  = "front-proxy-client"
	storeAuthzUser  = "kubetwin-twin-store"
	availableWithin = 60 * time.Second
)

// Options say what to start.
type Options struct {
	// CRDDir holds the kubetwin CRDs to install.
	CRDDir string
	// TwinStore puts the kubetwin.io group (DeviceTwins, DeviceIDClaims,
	// TwinConfigurations) into an etcd of its own, behind a second
	// kube-apiserver that the main one delegates the group to.
	TwinStore bool
	// AuditLogPath, if set, makes the main API server write an audit log
	// there (every request, at the Metadata level), as JSON lines.
	AuditLogPath string
}

// Plane is a running local control plane.
type Plane struct {
	// Main is the API server clients use, and its etcd.
	Main *envtest.Environment
	// Store is the twin store (nil without Options.TwinStore).
	Store *envtest.Environment
	dir   string
}

// Start starts the control plane and waits until it serves DeviceTwins.
// On error, whatever was started is stopped.
func Start(o Options) (*Plane, error) {
	dir, err := os.MkdirTemp("", "kubetwin-plane-")
	if err != nil {
		return nil, err
	}
	p := &Plane{dir: dir, Main: &envtest.Environment{}}
	if err := p.start(o); err != nil {
		return nil, errors.Join(err, p.Stop())
	}
	return p, nil
}

func (p *Plane) start(o Options) error {
	mainArgs := p.Main.ControlPlane.GetAPIServer().Configure()
	if o.AuditLogPath != "" {
		policy := filepath.Join(p.dir, "audit-policy.yaml")
		if err := os.WriteFile(policy, []byte(auditPolicy), 0o600); err != nil {
			return err
		}
		mainArgs.Set("audit-policy-file", policy).Set("audit-log-path", o.AuditLogPath).
			Set("audit-log-format", "json").Set("audit-log-mode", "blocking")
	}
	if !o.TwinStore {
		p.Main.CRDDirectoryPaths = []string{o.CRDDir}
		p.Main.ErrorIfCRDPathMissing = true
		if _, err := p.Main.Start(); err != nil {
			return fmt.Errorf("starting the control plane (KUBEBUILDER_ASSETS=%q): %w", os.Getenv("KUBEBUILDER_ASSETS"), err)
		}
		return nil
	}
	return p.startWithStore(o, mainArgs)
}

// auditPolicy logs every request's metadata (who, verb, object), none of
// its body.
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
`

// frontProxyArgs are the request-header authentication flags: which client
// certificate may assert a user, and in which headers.
func frontProxyArgs(caFile string) map[string]string {
	return map[string]string{
		"requestheader-client-ca-file":       caFile,
		"requestheader-allowed-names":        frontProxyUser,
		"requestheader-username-headers":     "X-Remote-User",
		"requestheader-uid-headers":          "X-Remote-Uid",
		"requestheader-group-headers":        "X-Remote-Group",
		"requestheader-extra-headers-prefix": "X-Remote-Extra-",
	}
}

// startWithStore starts the main API server (no kubetwin CRDs, a
// front-proxy client certificate), then the twin store with the CRDs, and
// delegates the group to it.
func (p *Plane) startWithStore(o Options, mainArgs *envtest.Arguments) error {
	fpCert, fpKey, err := selfSigned(frontProxyUser, x509ExtClient)
	if err != nil {
		return err
	}
	storeName := StoreService + "." + StoreNamespace + ".svc"
	stCert, stKey, err := selfSigned(storeName, x509ExtServer, storeName, "localhost", "127.0.0.1")
	if err != nil {
		return err
	}
	files := map[string][]byte{"front-proxy.crt": fpCert, "front-proxy.key": fpKey, "store.crt": stCert, "store.key": stKey}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(p.dir, name), b, 0o600); err != nil {
			return err
		}
	}
	fpCA := filepath.Join(p.dir, "front-proxy.crt")
	mainArgs.Set("proxy-client-cert-file", fpCA).Set("proxy-client-key-file", filepath.Join(p.dir, "front-proxy.key"))
	for k, v := range frontProxyArgs(fpCA) {
		mainArgs.Set(k, v)
	}
	if _, err := p.Main.Start(); err != nil {
		return fmt.Errorf("starting the main API server (KUBEBUILDER_ASSETS=%q): %w", os.Getenv("KUBEBUILDER_ASSETS"), err)
	}
	authz, err := p.storeAuthorizerConfig()
	if err != nil {
		return err
	}

	p.Store = &envtest.Environment{CRDDirectoryPaths: []string{o.CRDDir}, ErrorIfCRDPathMissing: true}
	sa := p.Store.ControlPlane.GetAPIServer().Configure()
	for k, v := range frontProxyArgs(fpCA) {
		sa.Set(k, v)
	}
	sa.Set("authorization-mode", "Webhook").
		Set("authorization-webhook-config-file", authz).
		Set("authorization-webhook-version", "v1").
		// The certificate the main server's proxy checks (it asks for
		// <service>.<namespace>.svc); envtest's own serves everything else.
		Set("tls-sni-cert-key", filepath.Join(p.dir, "store.crt")+","+filepath.Join(p.dir, "store.key")).
		// Namespaces live in the main API server; the store has none of
		// them, so it must not refuse objects in namespaces it lacks.
		Set("disable-admission-plugins", "ServiceAccount", "NamespaceLifecycle")
	if _, err := p.Store.Start(); err != nil {
		return fmt.Errorf("starting the twin store's API server: %w", err)
	}
	return p.delegate(stCert)
}

// storeAuthorizerConfig gives the twin store a user of the main API server
// that may ask it SubjectAccessReviews (system:auth-delegator), and returns
// the authorization webhook configuration (a kubeconfig whose server is the
// SubjectAccessReview endpoint) that makes the store use it.
func (p *Plane) storeAuthorizerConfig() (string, error) {
	u, err := p.Main.ControlPlane.AddUser(envtest.User{Name: storeAuthzUser}, nil)
	if err != nil {
		return "", fmt.Errorf("adding the twin store's user: %w", err)
	}
	c, err := client.New(p.Main.Config, client.Options{})
	if err != nil {
		return "", err
	}
	crb := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: storeAuthzUser + ":auth-delegator"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "system:auth-delegator"},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: storeAuthzUser}},
	}
	if err := c.Create(context.Background(), crb); err != nil {
		return "", fmt.Errorf("granting the twin store's user SubjectAccessReviews: %w", err)
	}
	kc, err := u.KubeConfig()
	if err != nil {
		return "", err
	}
	cfg, err := clientcmd.Load(kc)
	if err != nil {
		return "", err
	}
	for _, cl := range cfg.Clusters {
		cl.Server = p.Main.Config.Host + "/apis/authorization.k8s.io/v1/subjectaccessreviews"
	}
	path := filepath.Join(p.dir, "store-authz.kubeconfig")
	return path, clientcmd.WriteToFile(*cfg, path)
}

// delegate points the main API server's kubetwin.io group at the twin
// store and waits until DeviceTwins are served through it.
func (p *Plane) delegate(caBundle []byte) error {
	ctx := context.Background()
	c, err := client.New(p.Main.Config, client.Options{})
	if err != nil {
		return err
	}
	ss := p.Store.ControlPlane.APIServer.SecureServing
	port, err := strconv.Atoi(ss.Port)
	if err != nil {
		return fmt.Errorf("twin store port %q: %w", ss.Port, err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: StoreNamespace, Name: StoreService},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: ss.Address},
	}
	if err := c.Create(ctx, svc); err != nil {
		return fmt.Errorf("creating Service %s/%s: %w", StoreNamespace, StoreService, err)
	}
	as := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "apiregistration.k8s.io/v1",
		"kind":       "APIService",
		"metadata":   map[string]any{"name": Version + "." + Group},
		"spec": map[string]any{
			"group": Group, "version": Version,
			"groupPriorityMinimum": int64(1000), "versionPriority": int64(100),
			"caBundle": caBundle,
			"service":  map[string]any{"namespace": StoreNamespace, "name": StoreService, "port": int64(port)},
		},
	}}
	if err := c.Create(ctx, as); err != nil {
		return fmt.Errorf("creating APIService %s: %w", as.GetName(), err)
	}
	deadline := time.Now().Add(availableWithin)
	for {
		got := &unstructured.Unstructured{}
		got.SetGroupVersionKind(schema.GroupVersionKind{Group: "apiregistration.k8s.io", Version: "v1", Kind: "APIService"})
		err := c.Get(ctx, client.ObjectKey{Name: as.GetName()}, got)
		msg := "not read"
		if err == nil {
			ok, m := available(got)
			if ok {
				return nil
			}
			msg = m
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("APIService %s did not become Available within %s: %s (read error: %v)", as.GetName(), availableWithin, msg, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// available reads an APIService's Available condition.
func available(as *unstructured.Unstructured) (bool, string) {
	conds, _, _ := unstructured.NestedSlice(as.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == "Available" {
			return m["status"] == "True", fmt.Sprintf("%v: %v", m["reason"], m["message"])
		}
	}
	return false, "no Available condition yet"
}

// AddAdmin adds a user in system:masters to the main API server and
// returns its kubeconfig and REST configuration.
func (p *Plane) AddAdmin(name string) ([]byte, *rest.Config, error) {
	u, err := p.Main.ControlPlane.AddUser(envtest.User{Name: name, Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("adding user %s: %w", name, err)
	}
	kc, err := u.KubeConfig()
	if err != nil {
		return nil, nil, err
	}
	return kc, u.Config(), nil
}

// EtcdURL is the main etcd's client URL.
func (p *Plane) EtcdURL() *url.URL { return p.Main.ControlPlane.Etcd.URL }

// StoreEtcdURL is the twin store's etcd client URL (nil without one).
func (p *Plane) StoreEtcdURL() *url.URL {
	if p.Store == nil {
		return nil
	}
	return p.Store.ControlPlane.Etcd.URL
}

// Stop stops what runs, the twin store first (the main server calls it).
func (p *Plane) Stop() error {
	var errs []error
	if p.Store != nil && p.Store.ControlPlane.APIServer != nil {
		errs = append(errs, p.Store.Stop())
	}
	if p.Main.ControlPlane.APIServer != nil {
		errs = append(errs, p.Main.Stop())
	}
	errs = append(errs, os.RemoveAll(p.dir))
	return errors.Join(errs...)
}
