package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/hubapi"
	"github.com/kubetwin/kubetwin/internal/operator"
	"github.com/kubetwin/kubetwin/internal/ratelog"
)

// serviceAPIOptions are the flags of the service API: IoT Hub's service
// REST API (twins, queries, the device registry) for back ends using an
// Azure IoT service SDK.
type serviceAPIOptions struct {
	listen                 string
	hostname               string
	policiesSecret         string
	policiesNS, registryNS string

	maxConcurrentQueries int
	maxQueryPageBytes    int
	policyReadTimeout    time.Duration
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
		"The one namespace the service API serves: every policy reads and writes only the DeviceTwins there (a device elsewhere is DeviceNotFound), "+
			"GET /devices and queries list only there, and devices created through the registry get their DeviceTwins there "+
			"(default: --namespace if set, else $POD_NAMESPACE, else \"default\").")
	flag.IntVar(&s.maxConcurrentQueries, "service-api-max-concurrent-queries", hubapi.DefaultMaxConcurrentQueries,
		"Queries (POST /devices/query) one replica answers at once; another gets HTTP 429 ThrottlingException with Retry-After: 1.")
	flag.IntVar(&s.maxQueryPageBytes, "service-api-max-query-page-bytes", hubapi.DefaultMaxQueryPageBytes,
		"Most bytes of twins in one query page: a page ends early, with a continuation token, rather than grow past it (it always holds one twin).")
	flag.DurationVar(&s.policyReadTimeout, "service-api-policy-read-timeout", hubapi.DefaultPolicyReadTimeout,
		"Time limit of one read of the shared access policies Secret; requests are served with the last good copy meanwhile, "+
			"and wait for the read only when there is none (then 503 ServiceUnavailable when it fails).")
}

// serviceHostname is the service API's host name.
func (s serviceAPIOptions) serviceHostname(hub string) string { return cmp.Or(s.hostname, hub) }

// policiesNamespace is the namespace of the policies Secret.
func (s serviceAPIOptions) policiesNamespace() string {
	return cmp.Or(s.policiesNS, os.Getenv("POD_NAMESPACE"), "default")
}

// registryNamespace is the namespace the service API serves.
func (s serviceAPIOptions) registryNamespace(watched string) string {
	return cmp.Or(s.registryNS, watched, os.Getenv("POD_NAMESPACE"), "default")
}

// serviceTokenLifetime is hubapi.Options.MaxTokenLifetime for
// --max-sas-token-lifetime, whose 0 means no bound (hubapi's: negative).
func serviceTokenLifetime(flag time.Duration) time.Duration {
	if flag == 0 {
		return -1
	}
	return flag
}

// checkServiceAPIFlags refuses a registry namespace the operator does not
// watch: it would never see the twins it creates there.
func checkServiceAPIFlags(o options) error {
	if o.service.listen == "" {
		return nil
	}
	switch s := o.service; {
	case s.maxConcurrentQueries < 1:
		return fmt.Errorf("--service-api-max-concurrent-queries must be at least 1, got %d", s.maxConcurrentQueries)
	case s.maxQueryPageBytes < 1:
		return fmt.Errorf("--service-api-max-query-page-bytes must be at least 1, got %d", s.maxQueryPageBytes)
	case s.policyReadTimeout <= 0:
		return fmt.Errorf("--service-api-policy-read-timeout must be positive, got %v", s.policyReadTimeout)
	}
	if o.namespace == "" {
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
	host := s.serviceHostname(o.hubHostname)
	if host == "" {
		return errors.New("the service API needs a host name: --service-hostname or --hub-hostname")
	}
	tlsCfg, err := o.hubTLS.get(ctx, mgr, o)
	if err != nil {
		return err
	}
	so := operator.ServiceAPIOptions{
		Addr:           s.listen,
		TLSConfig:      tlsCfg,
		Hostname:       host,
		Namespace:      s.registryNamespace(o.namespace),
		Policies:       types.NamespacedName{Namespace: s.policiesNamespace(), Name: s.policiesSecret},
		AwaitReconcile: operator.AwaitReconcile,

		MaxConcurrentQueries: s.maxConcurrentQueries,
		MaxQueryPageBytes:    s.maxQueryPageBytes,
		PolicyReadTimeout:    s.policyReadTimeout,
		MaxTokenLifetime:     serviceTokenLifetime(o.maxTokenLifetime),
		LogLimiter:           ratelog.New(o.mqtt.logRateLimit),
	}
	so.Broker, _ = b.(*bus.Embedded)
	so.ClaimsNamespace = o.claimsNamespace()
	if _, err := operator.AddServiceAPI(ctx, mgr, so); err != nil {
		return err
	}
	ctrl.Log.WithName("setup").Info("serving the service API (IoT Hub service REST API)", "address", s.listen, "hostname", host,
		"policies", so.Policies.String(), "registryNamespace", so.Namespace, "mqttOverWebSockets", so.Broker != nil)
	return nil
}
