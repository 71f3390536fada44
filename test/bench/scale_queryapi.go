package main

// bench-scale serves the query API (query.kubetwin.io) as the chart
// installs it: from the operator's manager and cache, registered with
// kube-apiserver by an APIService, kube-apiserver authenticating to it
// with its front-proxy certificate. `kubectl twin query --via api` then
// goes through kube-apiserver's proxy to the operator, as in a cluster.

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"fmt"
	"net"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kubetwin/kubetwin/internal/queryapi"
	"github.com/kubetwin/kubetwin/internal/queryapi/queryapitest"
	"github.com/kubetwin/kubetwin/internal/testutil/selfsigned"
	"github.com/kubetwin/kubetwin/internal/twinscan"
)

// scaleQueryAPI is the query API of every operator bench-scale starts:
// one address and certificate, so the APIService registered once still
// leads to the restarted operator.
type scaleQueryAPI struct {
	addr   string
	cert   tls.Certificate
	caPEM  []byte
	fp     *queryapitest.FrontProxy
	served bool // registered with kube-apiserver
}

// newScaleQueryAPI picks a free local port and makes the serving
// certificate, for the name kube-apiserver verifies (the Service's).
func newScaleQueryAPI() (*scaleQueryAPI, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		return nil, err
	}
	cert, _, err := selfsigned.New(queryapitest.ServiceName + "." + queryapitest.ServiceNamespace + ".svc")
	if err != nil {
		return nil, fmt.Errorf("query API certificate: %w", err)
	}
	return &scaleQueryAPI{addr: addr, cert: cert, caPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Leaf.Raw})}, nil
}

// configure gives kube-apiserver its front-proxy certificate and the
// request-header flags (before it starts).
func (q *scaleQueryAPI) configure(env *envtest.Environment) error {
	fp, err := queryapitest.Configure(env)
	if err != nil {
		return fmt.Errorf("front proxy: %w", err)
	}
	q.fp = fp
	return nil
}

// cleanup removes the front-proxy files.
func (q *scaleQueryAPI) cleanup() {
	if q.fp != nil {
		_ = q.fp.Cleanup()
	}
}

// addTo adds the query API server to an operator's manager, answering
// from its cache, as cmd/manager's setupQueryAPI does (every namespace).
func (q *scaleQueryAPI) addTo(mgr ctrl.Manager) error {
	kube, err := kubernetes.NewForConfig(mgr.GetConfig())
	if err != nil {
		return err
	}
	d, err := queryapi.NewDelegating(kube)
	if err != nil {
		return fmt.Errorf("query API authentication: %w", err)
	}
	log := ctrl.Log.WithName("query-api")
	return mgr.Add(&queryapi.Server{
		Addr: q.addr, TLSConfig: &tls.Config{Certificates: []tls.Certificate{q.cert}, MinVersion: tls.VersionTLS12},
		Delegating: d, Log: log,
		Handler: queryapi.NewHandler(queryapi.Options{
			Twins: twinscan.CacheLister(mgr.GetCache()), Authenticator: d, Authorizer: d,
			MaxConcurrentQueries: queryapi.DefaultMaxConcurrentQueries, MaxResponseBytes: queryapi.DefaultMaxResponseBytes, Log: log,
		}),
	})
}

// register creates the Service and APIService (caBundle: the serving
// certificate) and waits until kube-apiserver serves the group; once.
func (q *scaleQueryAPI) register(ctx context.Context, admin *rest.Config) error {
	if q.served {
		return nil
	}
	progress("scale: registering the query API (%s) with kube-apiserver", q.addr)
	if err := queryapitest.Register(ctx, admin, q.addr, q.caPEM); err != nil {
		return fmt.Errorf("registering the query API: %w", err)
	}
	q.served = true
	return nil
}
