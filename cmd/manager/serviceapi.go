package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"time"

	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/hubapi"
)

// serviceAPIOptions are the flags of the service API: IoT Hub's service
// REST API (twins, queries, the device registry) for back ends using an
// Azure IoT service SDK.
type serviceAPIOptions struct {
	listen                 string
	hostname               string
	policiesSecret         string
	policiesNS, registryNS string
}

func bindServiceAPIFlags(s *serviceAPIOptions) {
	flag.StringVar(&s.listen, "service-api-bind-address", ":10443",
		"Listen address of the service API (IoT Hub's service REST API over HTTPS, with the hub's certificate). "+
			"Service SDKs always connect to port 443 of the hub host name: put a Service on 443 in front of it. Empty: not served.")
	flag.StringVar(&s.hostname, "service-hostname", "",
		"Host name back ends use for the service API: the HostName of the service connection strings and the resource their SAS tokens are signed for; "+
			"it goes into the hub's certificate. Default: --hub-hostname (one name, MQTT on 8883 and the service API on 443, as IoT Hub has).")
	flag.StringVar(&s.policiesSecret, "service-policies-secret", "kubetwin-service-policies",
		"Secret holding the service API's shared access policies (iothubowner, service, registryRead, registryReadWrite and any you add); "+
			"the operator creates it with generated keys and fills in what is missing.")
	flag.StringVar(&s.policiesNS, "service-policies-namespace", "", "Namespace of that Secret (default: $POD_NAMESPACE, else \"default\").")
	flag.StringVar(&s.registryNS, "registry-namespace", "",
		"Namespace where devices created through the service API's device registry get their DeviceTwins "+
			"(default: --namespace if set, else $POD_NAMESPACE, else \"default\").")
}

// serviceHostname is the service API's host name.
func (s serviceAPIOptions) serviceHostname(hub string) string { return firstNonEmpty(s.hostname, hub) }

// policiesNamespace is the namespace of the policies Secret.
func (s serviceAPIOptions) policiesNamespace() string {
	return firstNonEmpty(s.policiesNS, os.Getenv("POD_NAMESPACE"), "default")
}

// registryNamespace is where registry-created twins go.
func (s serviceAPIOptions) registryNamespace(watched string) string {
	return firstNonEmpty(s.registryNS, watched, os.Getenv("POD_NAMESPACE"), "default")
}

func firstNonEmpty(v ...string) string {
	for _, s := range v {
		if s != "" {
			return s
		}
	}
	return ""
}

// awaitReconcile is how long a service API write of tags or desired
// properties waits for the operator's follow-up writes (see
// hubapi.Options.AwaitReconcile).
const awaitReconcile = 2 * time.Second

// checkServiceAPIFlags refuses a registry namespace the operator does not
// watch: it would never see the twins it creates there.
func checkServiceAPIFlags(o options) error {
	if o.service.listen == "" || o.namespace == "" {
		return nil
	}
	if ns := o.service.registryNamespace(o.namespace); ns != o.namespace {
		return fmt.Errorf("--registry-namespace %s is outside the watched --namespace %s: twins created through the registry would never be served", ns, o.namespace)
	}
	return nil
}

// setupServiceAPI serves IoT Hub's service REST API on every replica,
// over HTTPS with the hub's certificate, after making sure the shared
// access policies Secret exists. With the embedded broker (b), the same
// server serves MQTT over WebSockets at /$iothub/websocket, as IoT Hub
// does on port 443.
func setupServiceAPI(ctx context.Context, mgr ctrl.Manager, o options, b bus.Bus) error {
	s := o.service
	if s.listen == "" {
		return nil
	}
	log := ctrl.Log.WithName("setup")
	host := s.serviceHostname(o.hubHostname)
	if host == "" {
		return errors.New("the service API needs a host name: --service-hostname or --hub-hostname")
	}
	policies := types.NamespacedName{Namespace: s.policiesNamespace(), Name: s.policiesSecret}
	// A client without a cache: the manager's caches only key Secrets.
	live, err := client.New(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme()})
	if err != nil {
		return fmt.Errorf("creating the service API's client: %w", err)
	}
	if err := retryStartup(ctx, "creating the shared access policies Secret "+policies.String(), func() error {
		return hubapi.EnsurePolicies(ctx, live, policies.Namespace, policies.Name, host)
	}); err != nil {
		return err
	}
	tlsCfg, err := o.hubTLS.get(ctx, mgr, o)
	if err != nil {
		return err
	}
	h, err := hubapi.NewHandler(hubapi.Options{
		Client:    mgr.GetClient(),
		Reader:    mgr.GetClient(),
		APIReader: mgr.GetAPIReader(),
		Resolve: func(ctx context.Context, id string) (*v1alpha1.DeviceTwin, error) {
			return controllers.ResolveDeviceID(ctx, mgr.GetClient(), id)
		},
		Namespace:      s.registryNamespace(o.namespace),
		HubHostname:    host,
		PolicySecret:   policies,
		AwaitReconcile: awaitReconcile,
		Logger:         ctrl.Log.WithName("service-api"),
	})
	if err != nil {
		return err
	}
	var handler http.Handler = h
	if e, ok := b.(*bus.Embedded); ok {
		mux := http.NewServeMux()
		mux.Handle(bus.WebSocketPath, e.WebSocketHandler())
		mux.Handle("/", h)
		handler = mux
	}
	srv, err := hubapi.NewServer(hubapi.ServerOptions{Addr: s.listen, TLSConfig: tlsCfg, Handler: handler, Logger: ctrl.Log.WithName("service-api")})
	if err != nil {
		return err
	}
	if err := mgr.Add(srv); err != nil {
		return err
	}
	if err := mgr.AddReadyzCheck("service-api", srv.ReadyCheck); err != nil {
		return fmt.Errorf("adding the service API ready check: %w", err)
	}
	log.Info("serving the service API (IoT Hub service REST API)", "address", s.listen, "hostname", host,
		"policies", policies.String(), "registryNamespace", s.registryNamespace(o.namespace))
	return nil
}

// retryStartup runs f until it succeeds, backing off, for about half a
// minute: the API server may not be reachable the moment the pod starts.
func retryStartup(ctx context.Context, what string, f func() error) error {
	log := ctrl.Log.WithName("setup")
	for wait := time.Second; ; wait *= 2 {
		err := f()
		if err == nil {
			return nil
		}
		if wait > 16*time.Second {
			return fmt.Errorf("%s: %w", what, err)
		}
		log.Error(err, what+"; retrying", "retryIn", wait)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
	}
}
