package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/kubernetes"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/certwatcher"

	"github.com/kubetwin/kubetwin/internal/queryapi"
)

// queryAPIOptions are the flags of the query.kubetwin.io aggregated API.
type queryAPIOptions struct {
	listen               string
	certDir              string
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
		"Folder of the query API's serving certificate (tls.crt, tls.key; re-read when they change). "+
			"Empty: a self-signed certificate made at start-up, kept in memory (the APIService must then skip TLS verification).")
	fs.Var(&q.hosts, "query-api-host", "DNS name or IP address for the self-signed certificate (repeatable or comma-separated).")
	fs.IntVar(&q.maxConcurrentQueries, "query-api-max-concurrent-queries", queryapi.DefaultMaxConcurrentQueries,
		"Queries the query API answers at once; another gets 429 Too Many Requests with Retry-After: 1.")
	fs.IntVar(&q.maxResponseBytes, "query-api-max-response-bytes", queryapi.DefaultMaxResponseBytes,
		"Most bytes of items in one query API answer; a larger answer is refused with 422 ResponseTooLarge "+
			"(kubectl twin query then lists the twins itself).")
}

func checkQueryAPIFlags(q queryAPIOptions) error {
	switch {
	case q.listen == "":
		return nil
	case q.maxConcurrentQueries < 1:
		return fmt.Errorf("--query-api-max-concurrent-queries must be at least 1, got %d", q.maxConcurrentQueries)
	case q.maxResponseBytes < 1:
		return fmt.Errorf("--query-api-max-response-bytes must be at least 1, got %d", q.maxResponseBytes)
	}
	return nil
}

// setupQueryAPI serves the query API on every replica, from the manager's
// cache, when --query-api-bind-address is set.
func setupQueryAPI(mgr ctrl.Manager, o options) error {
	q := queryAPIFlags
	if err := checkQueryAPIFlags(q); err != nil {
		return err
	}
	if q.listen == "" {
		return nil
	}
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if q.certDir != "" {
		w, err := certwatcher.New(filepath.Join(q.certDir, "tls.crt"), filepath.Join(q.certDir, "tls.key"))
		if err != nil {
			return fmt.Errorf("query API serving certificate in --query-api-cert-dir %s: %w", q.certDir, err)
		}
		if err := mgr.Add(w); err != nil {
			return err
		}
		tlsCfg.GetCertificate = w.GetCertificate
	} else {
		hosts := append([]string{"localhost"}, q.hosts...)
		if ns := os.Getenv("POD_NAMESPACE"); ns != "" {
			hosts = append(hosts, "kubetwin-query-api."+ns+".svc")
		}
		c, err := queryapi.SelfSignedCertificate(hosts, 365*24*time.Hour)
		if err != nil {
			return fmt.Errorf("query API self-signed certificate: %w", err)
		}
		tlsCfg.Certificates = []tls.Certificate{*c}
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
			Twins: queryapi.CacheLister(mgr.GetCache()), Namespace: o.namespace, Authenticator: d, Authorizer: d,
			MaxConcurrentQueries: q.maxConcurrentQueries, MaxResponseBytes: q.maxResponseBytes, Log: log,
		}),
	}
	log.Info("query API configured", "address", q.listen, "certDir", q.certDir, "namespace", o.namespace,
		"maxConcurrentQueries", q.maxConcurrentQueries, "maxResponseBytes", q.maxResponseBytes)
	return mgr.Add(srv)
}
