// Package operator wires kubetwin's parts into a controller-runtime
// manager: the bridge between devices and twins, the MQTT bus, the
// DeviceTwin reconciler and the service API. cmd/manager, the envtest suite
// of controllers and the benchmark all assemble the operator with it, so
// that what the tests and the benchmark run is what ships.
package operator

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/go-logr/logr"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/manager"

	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/internal/hubapi"
	"github.com/kubetwin/kubetwin/internal/ratelog"
	"github.com/kubetwin/kubetwin/internal/twinscan"
)

// AwaitReconcile is how long a service API write of tags or desired
// properties waits for the operator's follow-up writes when the reconciler
// runs in the same manager (see hubapi.Options.AwaitReconcile).
const AwaitReconcile = 2 * time.Second

// DefaultClaimsNamespace is where device id claims are kept when no
// namespace is given (--claims-namespace outside a pod).
const DefaultClaimsNamespace = "default"

// BridgeOptions bounds what a device may leave waiting to be stored; zero
// fields take the bridge's defaults.
type BridgeOptions struct {
	// MaxPendingReports is bridge.Options.MaxPendingReports.
	MaxPendingReports int
	// MaxPendingReportBytes is bridge.Options.MaxPendingReportBytes.
	MaxPendingReportBytes int
	// ClaimsNamespace is where the device id claims are
	// (DefaultClaimsNamespace if empty).
	ClaimsNamespace string
	// IdleStateTTL is bridge.Options.IdleStateTTL.
	IdleStateTTL time.Duration
}

// NewBridge returns the bridge between devices and twins; it finds the
// twin that holds a device id in mgr's cache (Resolver).
func NewBridge(mgr ctrl.Manager, o BridgeOptions) *bridge.Bridge {
	return bridge.New(bridge.Options{
		Logger:                ctrl.Log.WithName("bridge"),
		Resolve:               Resolver(mgr, o.ClaimsNamespace).Resolve,
		MaxPendingReports:     o.MaxPendingReports,
		MaxPendingReportBytes: o.MaxPendingReportBytes,
		IdleStateTTL:          o.IdleStateTTL,
	})
}

// Resolver finds the twin that holds a device id in mgr's cache, through
// the claims of claimsNS (DefaultClaimsNamespace if empty).
func Resolver(mgr ctrl.Manager, claimsNS string) deviceid.Resolver {
	return deviceid.Resolver{Reader: mgr.GetClient(), Namespace: cmp.Or(claimsNS, DefaultClaimsNamespace)}
}

// Claims takes and releases device ids in claimsNS (DefaultClaimsNamespace
// if empty) for mgr's webhook and reconciler.
func Claims(mgr ctrl.Manager, claimsNS string) *deviceid.Claims {
	return &deviceid.Claims{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Namespace: cmp.Or(claimsNS, DefaultClaimsNamespace)}
}

// AddBus makes b the bridge's bus and adds it to mgr, which starts and
// stops it (b must be a manager.Runnable, as bus.Embedded and bus.Paho are).
func AddBus(mgr ctrl.Manager, br *bridge.Bridge, b bus.Bus) error {
	r, ok := b.(manager.Runnable)
	if !ok {
		return fmt.Errorf("bus %T is not a manager.Runnable", b)
	}
	br.SetBus(b)
	if err := mgr.Add(r); err != nil {
		return fmt.Errorf("adding the MQTT bus: %w", err)
	}
	return nil
}

// DropStatusManagedFields is CacheTransform's for objects other than
// DeviceTwins: it drops the managedFields entries of the status
// subresource, which nothing in the operator reads; the other entries stay
// (the service API reads the times of a TwinConfiguration's).
func DropStatusManagedFields(obj any) (any, error) {
	o, ok := obj.(metav1.Object)
	if !ok {
		return obj, nil // e.g. a tombstone: its object was transformed when cached
	}
	mf := o.GetManagedFields()
	n := 0
	for _, e := range mf {
		if e.Subresource != "status" {
			n++
		}
	}
	if n == len(mf) {
		return obj, nil
	}
	keep := make([]metav1.ManagedFieldsEntry, 0, n)
	for _, e := range mf {
		if e.Subresource != "status" {
			keep = append(keep, e)
		}
	}
	o.SetManagedFields(keep)
	return obj, nil
}

// ReconcilerOptions configures AddReconciler.
type ReconcilerOptions struct {
	// Workers is the number of parallel reconciles (and status writes in
	// flight); the reconciler's default if zero.
	Workers int
	// Credentials configures device keys; nil without device
	// authentication.
	Credentials *controllers.Credentials
	// ClaimsNamespace is where the device id claims are
	// (DefaultClaimsNamespace if empty).
	ClaimsNamespace string
	// ConfigurationApplies and ConfigurationAppliesPerSecond bound the
	// TwinConfiguration applier (its defaults when zero).
	ConfigurationApplies          int
	ConfigurationAppliesPerSecond float64
}

// AddReconciler sets up the DeviceTwin reconciler with mgr, working with
// br, the reconciler that removes stale device id claims and the
// TwinConfiguration controller (with its applier).
func AddReconciler(ctx context.Context, mgr ctrl.Manager, br *bridge.Bridge, o ReconcilerOptions) error {
	claims := Claims(mgr, o.ClaimsNamespace)
	r := &controllers.DeviceTwinReconciler{
		Client:                  mgr.GetClient(),
		Bridge:                  br,
		Recorder:                mgr.GetEventRecorder("kubetwin"),
		MaxConcurrentReconciles: o.Workers,
		Credentials:             o.Credentials,
		Claims:                  claims,
	}
	if err := r.SetupWithManager(ctx, mgr); err != nil {
		return fmt.Errorf("setting up the DeviceTwin controller: %w", err)
	}
	gc := &controllers.DeviceIDClaimReconciler{Client: mgr.GetClient(), Claims: claims}
	if err := gc.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("setting up the DeviceIDClaim controller: %w", err)
	}
	tc := &controllers.TwinConfigurationReconciler{Client: mgr.GetClient(),
		MaxAppliesInFlight: o.ConfigurationApplies, AppliesPerSecond: o.ConfigurationAppliesPerSecond}
	if err := tc.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("setting up the TwinConfiguration controller: %w", err)
	}
	return nil
}

// ServiceAPIOptions configures AddServiceAPI.
type ServiceAPIOptions struct {
	// Addr is the listen address, e.g. ":10443" or "127.0.0.1:0".
	Addr string
	// TLSConfig is the server's TLS configuration (the hub's certificate).
	TLSConfig *tls.Config
	// Hostname is the service host name: the resource of service tokens
	// and the HostName of service connection strings.
	Hostname string
	// Namespace is the one namespace the service API serves (and where
	// devices created through the registry go).
	Namespace string
	// ClaimsNamespace is where the device id claims are
	// (DefaultClaimsNamespace if empty).
	ClaimsNamespace string
	// Policies is the shared access policies Secret; it is created, or
	// completed, before the server is added.
	Policies types.NamespacedName
	// Broker, if set, also serves MQTT over WebSockets at
	// bus.WebSocketPath on the same server.
	Broker *bus.Embedded
	// AwaitReconcile is hubapi.Options.AwaitReconcile: AwaitReconcile when
	// the reconciler runs in mgr.
	AwaitReconcile time.Duration
	// MaxConcurrentQueries, MaxQueryPageBytes and PolicyReadTimeout are
	// hubapi.Options' (its defaults when zero).
	MaxConcurrentQueries int
	MaxQueryPageBytes    int
	PolicyReadTimeout    time.Duration
	// MaxTokenLifetime and LogLimiter are hubapi.Options'.
	MaxTokenLifetime time.Duration
	LogLimiter       *ratelog.Limiter
}

// AddServiceAPI makes sure the policies Secret exists and adds the service
// API's HTTPS server to mgr, with a readiness check. The server runs on
// every replica, leader or not.
func AddServiceAPI(ctx context.Context, mgr ctrl.Manager, o ServiceAPIOptions) (*hubapi.Server, error) {
	if o.Hostname == "" {
		return nil, errors.New("the service API needs a host name")
	}
	// A client without a cache: the manager's caches only key Secrets.
	live, err := client.New(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme()})
	if err != nil {
		return nil, fmt.Errorf("creating the service API's client: %w", err)
	}
	if err := RetryStartup(ctx, "creating the shared access policies Secret "+o.Policies.String(), func() error {
		return hubapi.EnsurePolicies(ctx, live, o.Policies.Namespace, o.Policies.Name, o.Hostname)
	}); err != nil {
		return nil, err
	}
	log := ctrl.Log.WithName("service-api")
	h, err := hubapi.NewHandler(hubapi.Options{
		Client:         mgr.GetClient(),
		Reader:         mgr.GetClient(),
		Twins:          twinscan.CacheLister(mgr.GetCache()),
		Order:          twinscan.CacheOrder(mgr.GetCache(), o.Namespace),
		APIReader:      mgr.GetAPIReader(),
		Resolve:        Resolver(mgr, o.ClaimsNamespace).Resolve,
		Namespace:      o.Namespace,
		HubHostname:    o.Hostname,
		PolicySecret:   o.Policies,
		AwaitReconcile: o.AwaitReconcile,
		Logger:         log,

		MaxConcurrentQueries: o.MaxConcurrentQueries,
		MaxQueryPageBytes:    o.MaxQueryPageBytes,
		PolicyReadTimeout:    o.PolicyReadTimeout,
		MaxTokenLifetime:     o.MaxTokenLifetime,
		LogLimiter:           o.LogLimiter,
	})
	if err != nil {
		return nil, err
	}
	var handler http.Handler = h
	if o.Broker != nil {
		mux := http.NewServeMux()
		mux.Handle(bus.WebSocketPath, o.Broker.WebSocketHandler())
		mux.Handle("/", h)
		handler = mux
	}
	srv, err := hubapi.NewServer(hubapi.ServerOptions{Addr: o.Addr, TLSConfig: o.TLSConfig, Handler: handler, Logger: log})
	if err != nil {
		return nil, err
	}
	if err := mgr.Add(srv); err != nil {
		return nil, err
	}
	if err := mgr.AddReadyzCheck("service-api", srv.ReadyCheck); err != nil {
		return nil, fmt.Errorf("adding the service API ready check: %w", err)
	}
	return srv, nil
}

// RetryStartup runs f until it succeeds, backing off from 1 s, for about
// half a minute: the API server may not be reachable the moment the pod
// starts.
func RetryStartup(ctx context.Context, what string, f func() error) error {
	return retry(ctx, ctrl.Log.WithName("setup"), what, time.Second, f)
}

func retry(ctx context.Context, log logr.Logger, what string, first time.Duration, f func() error) error {
	for wait := first; ; wait *= 2 {
		err := f()
		if err == nil {
			return nil
		}
		if wait > 16*first {
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
