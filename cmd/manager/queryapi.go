package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/certwatcher"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/internal/certs"
	"github.com/kubetwin/kubetwin/internal/queryapi"
	"github.com/kubetwin/kubetwin/internal/queryapi/wire"
	"github.com/kubetwin/kubetwin/internal/twinscan"
)

// queryAPIOptions are the flags of the query.kubetwin.io aggregated API.
type queryAPIOptions struct {
	listen               string
	certDir              string
	serviceName          string
	serviceNS            string
	secretName           string
	apiServiceName       optionalString
	hosts                stringList
	maxConcurrentQueries int
	maxResponseBytes     int
}

// queryAPIFlags are bound at start-up, apart from the options struct, so
// that main.go needs only the setup call.
var queryAPIFlags queryAPIOptions

func init() { bindQueryAPIFlags(flag.CommandLine, &queryAPIFlags) }

func bindQueryAPIFlags(fs *flag.FlagSet, q *queryAPIOptions) {
	fs.StringVar(&q.listen, "query-api-bind-address", "",
		"Listen address (HTTPS) of the query.kubetwin.io aggregated API: IoT Hub queries answered from the operator's cache, "+
			"for kube-apiserver to proxy to (an APIService). Empty: not served.")
	fs.StringVar(&q.certDir, "query-api-cert-dir", "",
		"Folder of the query API's serving certificate (tls.crt, tls.key; re-read when they change), from another tool (cert-manager) "+
			"that also keeps the APIService's caBundle. Empty: the operator issues and rotates the certificate itself (CA and certificate "+
			"in the --query-api-secret-name Secret) and keeps the caBundle of --query-api-apiservice-name current; without a Service "+
			"namespace (--query-api-service-namespace, $POD_NAMESPACE) it serves a self-signed certificate kept in memory, which the "+
			"APIService must then not verify (insecureSkipTLSVerify).")
	fs.StringVar(&q.serviceName, "query-api-service-name", "kubetwin-query-api",
		"Service the APIService leads to; its DNS names go into the operator-issued certificate.")
	fs.StringVar(&q.serviceNS, "query-api-service-namespace", "",
		"Namespace of that Service and of the certificate Secret (default: $POD_NAMESPACE).")
	fs.StringVar(&q.secretName, "query-api-secret-name", "kubetwin-query-api-server-cert",
		"Secret that holds the query API's CA and serving certificate when the operator issues them.")
	fs.Var(&q.apiServiceName, "query-api-apiservice-name",
		"APIService whose caBundle the operator keeps holding the CA of its certificate (get and patch on it, by name). Empty: none. "+
			"Default: "+queryAPIServiceName+", or with --namespace that namespace's own, v1alpha1.<namespace>."+wire.Group+
			" (the operator serves both groups; a shard registers its own, so that shards do not contend for one APIService).")
	fs.Var(&q.hosts, "query-api-host", "Extra DNS name or IP address for the query API's certificate (repeatable or comma-separated).")
	fs.IntVar(&q.maxConcurrentQueries, "query-api-max-concurrent-queries", queryapi.DefaultMaxConcurrentQueries,
		"Queries the query API answers at once; another gets 429 Too Many Requests with Retry-After: 1.")
	fs.IntVar(&q.maxResponseBytes, "query-api-max-response-bytes", queryapi.DefaultMaxResponseBytes,
		"Most bytes of items in one query API answer: a larger SELECT * or projection without GROUP BY or aggregates "+
			"comes in parts when asked for in parts (as kubectl twin query does); any other larger answer is refused "+
			"with 422 ResponseTooLarge (kubectl twin query then lists the twins itself).")
}

// queryAPIServiceName is the APIService of query.kubetwin.io/v1alpha1.
const queryAPIServiceName = wire.Version + "." + wire.Group

// apiService is the APIService whose caBundle the operator keeps: the
// flag's, else that of the shard group of namespace (the operator's
// --namespace), else that of wire.Group.
func (q queryAPIOptions) apiService(namespace string) string {
	switch {
	case q.apiServiceName.set:
		return q.apiServiceName.value
	case namespace != "":
		return wire.Version + "." + wire.ShardGroup(namespace)
	}
	return queryAPIServiceName
}

// optionalString is a string flag that knows whether it was given.
type optionalString struct {
	value string
	set   bool
}

func (o *optionalString) String() string { return o.value }

func (o *optionalString) Set(v string) error {
	o.value, o.set = v, true
	return nil
}

func checkQueryAPIFlags(q queryAPIOptions) error {
	switch {
	case q.listen == "":
		return nil
	case q.maxConcurrentQueries < 1:
		return fmt.Errorf("--query-api-max-concurrent-queries must be at least 1, got %d", q.maxConcurrentQueries)
	case q.maxResponseBytes < 1:
		return fmt.Errorf("--query-api-max-response-bytes must be at least 1, got %d", q.maxResponseBytes)
	case q.certDir != "":
		return nil
	}
	for _, f := range []struct{ flag, value string }{
		{"--query-api-service-name", q.serviceName}, {"--query-api-secret-name", q.secretName},
	} {
		if errs := validation.IsDNS1123Subdomain(f.value); len(errs) > 0 {
			return fmt.Errorf("%s %q is not a valid name: %s", f.flag, f.value, strings.Join(errs, "; "))
		}
	}
	if v := q.apiServiceName.value; v != "" {
		if errs := validation.IsDNS1123Subdomain(v); len(errs) > 0 {
			return fmt.Errorf("--query-api-apiservice-name %q is not a valid name: %s", v, strings.Join(errs, "; "))
		}
	}
	return nil
}

// serviceNamespace is the query API Service's namespace: the flag, else
// the pod's namespace from the downward API, else "" (not in a cluster).
func (q queryAPIOptions) serviceNamespace() string {
	return cmp.Or(q.serviceNS, os.Getenv("POD_NAMESPACE"))
}

// queryAPICertOptions are the certificate manager's options for the query
// API's Service in namespace ns: the names kube-apiserver checks the
// certificate against (<service>.<namespace>.svc) and the Secret there,
// for the APIService of an operator that watches watchNS ("" for all).
func queryAPICertOptions(q queryAPIOptions, ns, watchNS string) certs.CertOptions {
	svc := q.serviceName + "." + ns + ".svc"
	return certs.CertOptions{
		Purpose:         "query-api",
		SecretNamespace: ns,
		SecretName:      q.secretName,
		Hosts:           append([]string{svc, svc + ".cluster.local"}, q.hosts...),
		APIServiceName:  q.apiService(watchNS),
		Logger:          ctrl.Log.WithName("query-api-certs"),
	}
}

// setupQueryAPI serves the query API on every replica, from the manager's
// cache, when --query-api-bind-address is set.
func setupQueryAPI(ctx context.Context, mgr ctrl.Manager, o options) error {
	q := queryAPIFlags
	if err := checkQueryAPIFlags(q); err != nil {
		return err
	}
	if q.listen == "" {
		return nil
	}
	tlsCfg, certSource, err := queryAPITLS(ctx, mgr, q, o.namespace)
	if err != nil {
		return err
	}
	kube, err := kubernetes.NewForConfig(mgr.GetConfig())
	if err != nil {
		return err
	}
	d, err := queryapi.NewDelegating(kube)
	if err != nil {
		return err
	}
	log := ctrl.Log.WithName("query-api")
	srv := &queryapi.Server{
		Addr: q.listen, TLSConfig: tlsCfg, Delegating: d, Log: log,
		Handler: queryapi.NewHandler(queryapi.Options{
			Twins: twinscan.CacheLister(mgr.GetCache()), Namespace: o.namespace, Authenticator: d, Authorizer: d,
			MaxConcurrentQueries: q.maxConcurrentQueries, MaxResponseBytes: q.maxResponseBytes, Log: log,
		}),
	}
	log.Info("query API configured", "address", q.listen, "certificate", certSource, "namespace", o.namespace, "groups", srv.Handler.Groups(),
		"maxConcurrentQueries", q.maxConcurrentQueries, "maxResponseBytes", q.maxResponseBytes)
	return mgr.Add(srv)
}

// queryAPITLS returns the query API's TLS configuration and where its
// certificate comes from: files from another tool (--query-api-cert-dir);
// else the operator's own CA and certificate, rotated, with the
// APIService's caBundle kept current, so kube-apiserver verifies the
// server; else (no Service namespace: the operator runs outside a
// cluster) a self-signed certificate in memory.
func queryAPITLS(ctx context.Context, mgr ctrl.Manager, q queryAPIOptions, watchNS string) (*tls.Config, string, error) {
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if q.certDir != "" {
		w, err := certwatcher.New(filepath.Join(q.certDir, "tls.crt"), filepath.Join(q.certDir, "tls.key"))
		if err != nil {
			return nil, "", fmt.Errorf("query API serving certificate in --query-api-cert-dir %s: %w", q.certDir, err)
		}
		if err := mgr.Add(w); err != nil {
			return nil, "", err
		}
		tlsCfg.GetCertificate = w.GetCertificate
		return tlsCfg, "files in " + q.certDir, nil
	}
	ns := q.serviceNamespace()
	if ns == "" {
		c, err := certs.SelfSigned(append([]string{"localhost"}, q.hosts...), 365*24*time.Hour)
		if err != nil {
			return nil, "", fmt.Errorf("query API self-signed certificate: %w", err)
		}
		tlsCfg.Certificates = []tls.Certificate{*c}
		return tlsCfg, "self-signed in memory (no Service namespace: the APIService cannot verify it)", nil
	}
	co := queryAPICertOptions(q, ns, watchNS)
	var err error
	// A client without a cache: the manager's would watch every Secret.
	if co.Client, err = client.New(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme()}); err != nil {
		return nil, "", fmt.Errorf("creating the certificate client: %w", err)
	}
	cm, err := certs.NewCertManager(co)
	if err != nil {
		return nil, "", err
	}
	if err := syncCertificate(ctx, cm, "the query API serving certificate"); err != nil {
		return nil, "", err
	}
	if err := mgr.Add(cm); err != nil {
		return nil, "", err
	}
	tlsCfg.GetCertificate = cm.GetCertificate
	return tlsCfg, "operator-issued, Secret " + ns + "/" + q.secretName + ", APIService " + co.APIServiceName, nil
}
