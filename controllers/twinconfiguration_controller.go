package controllers

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// Defaults of the configuration appliers' bounds.
const (
	// DefaultMaxConfigurationApplies is how many configuration applies
	// may be in flight at once (--max-configuration-applies).
	DefaultMaxConfigurationApplies = 4
	// DefaultConfigurationAppliesPerSecond is the steady rate of
	// configuration applies (--configuration-applies-per-second).
	DefaultConfigurationAppliesPerSecond = 50
	// DefaultConfigurationStatusInterval coalesces twin events into at most
	// about one status pass per configuration per interval.
	DefaultConfigurationStatusInterval = time.Second
)

var (
	configApplies = prometheus.NewCounterVec(prometheus.CounterOpts{
		Subsystem: "kubetwin_configuration", Name: "applies_total",
		Help: "Server-side applies of configuration content to twins, by result (ok, conflict, error).",
	}, []string{"result"})
	configAppliesInFlight = prometheus.NewGauge(prometheus.GaugeOpts{
		Subsystem: "kubetwin_configuration", Name: "applies_in_flight",
		Help: "Configuration applies being sent to the API server.",
	})
	configApplyThrottled = prometheus.NewCounter(prometheus.CounterOpts{
		Subsystem: "kubetwin_configuration", Name: "applies_throttled_total",
		Help: "Configuration applies that waited for --configuration-applies-per-second.",
	})
)

func init() {
	metrics.Registry.MustRegister(configApplies, configAppliesInFlight, configApplyThrottled)
}

// TwinConfigurationReconciler keeps each TwinConfiguration's status and
// finalizer and runs its staged rollout; its applier (a second controller,
// one reconcile per twin) gives the twins their content. The two share
// the compiled configurations, a cache of query answers per twin version
// and the rollouts' admissions.
type TwinConfigurationReconciler struct {
	client.Client
	// MaxAppliesInFlight bounds the applier's parallel applies
	// (DefaultMaxConfigurationApplies if zero).
	MaxAppliesInFlight int
	// AppliesPerSecond bounds the applier's rate
	// (DefaultConfigurationAppliesPerSecond if zero).
	AppliesPerSecond float64
	// StatusInterval coalesces twin events into status passes
	// (DefaultConfigurationStatusInterval if zero).
	StatusInterval time.Duration
	// Now is the clock (tests may replace it).
	Now func() time.Time

	compiled compiledCache
	evals    evalCache
	limiter  *rate.Limiter
	wake     chan event.GenericEvent

	mu       sync.Mutex
	admitted map[types.UID]*admission // staged rollouts: twins let in, per configuration
	// admissions counts changes of admitted, which change plans.
	admissions int64
	woken      map[types.UID]string // what a configuration's twins were last woken for
}

// admission holds the twins a rollout let in for one generation.
type admission struct {
	generation int64
	names      map[string]bool
}

var _ reconcile.Reconciler = (*TwinConfigurationReconciler)(nil)

// +kubebuilder:rbac:groups=kubetwin.io,resources=twinconfigurations,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=kubetwin.io,resources=twinconfigurations/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=kubetwin.io,resources=twinconfigurations/finalizers,verbs=update

// Reconcile surveys one configuration's twins, lets its rollout go on,
// wakes the twins its changes concern and patches its status if it changed.
func (r *TwinConfigurationReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	c := &v1alpha1.TwinConfiguration{}
	if err := r.Get(ctx, req.NamespacedName, c); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !c.DeletionTimestamp.IsZero() {
		return r.finalize(ctx, c)
	}
	if !controllerutil.ContainsFinalizer(c, ConfigurationFinalizer) {
		base := c.DeepCopy()
		controllerutil.AddFinalizer(c, ConfigurationFinalizer)
		err := r.Patch(ctx, c, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{}))
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	cfgs, err := r.configurations(ctx, c.Namespace)
	if err != nil {
		return ctrl.Result{}, err
	}
	self := r.compiled.get(c)
	twins := &v1alpha1.DeviceTwinList{}
	if err := r.List(ctx, twins, client.InNamespace(c.Namespace)); err != nil {
		return ctrl.Result{}, err
	}
	s := r.survey(self, cfgs, twins.Items)
	wake := r.rollout(self, &s)
	if r.changed(self) {
		wake = append(wake, s.concerned...)
	}
	if err := r.wakeTwins(ctx, wake); err != nil {
		return ctrl.Result{}, err
	}
	st := configStatus(c, self, s, metav1.NewTime(r.now()))
	if equality.Semantic.DeepEqual(c.Status, st) {
		return ctrl.Result{}, nil
	}
	base := c.DeepCopy()
	c.Status = st
	if err := r.Status().Patch(ctx, c, client.MergeFrom(base), client.FieldOwner(StatusManager)); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	return ctrl.Result{}, nil
}

func (r *TwinConfigurationReconciler) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// configurations returns the namespace's configurations, compiled.
func (r *TwinConfigurationReconciler) configurations(ctx context.Context, ns string) ([]*compiled, error) {
	list := &v1alpha1.TwinConfigurationList{}
	if err := r.List(ctx, list, client.InNamespace(ns)); err != nil {
		return nil, err
	}
	out := make([]*compiled, len(list.Items))
	for i := range list.Items {
		out[i] = r.compiled.get(&list.Items[i])
	}
	return out, nil
}

// changed reports whether self's twins have not yet been woken for its
// current generation (or deletion), and records that they are.
func (r *TwinConfigurationReconciler) changed(self *compiled) bool {
	key := strconv.FormatInt(self.generation, 10) + "/" + strconv.FormatBool(self.deleting)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.woken == nil {
		r.woken = map[types.UID]string{}
	}
	if r.woken[self.uid] == key {
		return false
	}
	r.woken[self.uid] = key
	return true
}

// wakeTwins has the applier plan twins again.
func (r *TwinConfigurationReconciler) wakeTwins(ctx context.Context, twins []*v1alpha1.DeviceTwin) error {
	for _, t := range twins {
		select {
		case r.wake <- event.GenericEvent{Object: t}:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// finalize takes a deleted configuration's content back from every twin
// (its applies omit everything), then lets it go.
func (r *TwinConfigurationReconciler) finalize(ctx context.Context, c *v1alpha1.TwinConfiguration) (ctrl.Result, error) {
	if !controllerutil.ContainsFinalizer(c, ConfigurationFinalizer) {
		r.forget(c.UID)
		return ctrl.Result{}, nil
	}
	r.compiled.get(c) // compiled as deleting: it targets nothing now
	twins := &v1alpha1.DeviceTwinList{}
	if err := r.List(ctx, twins, client.InNamespace(c.Namespace)); err != nil {
		return ctrl.Result{}, err
	}
	manager := ConfigurationManagerPrefix + c.Name
	var holders []*v1alpha1.DeviceTwin
	for i := range twins.Items {
		t := &twins.Items[i]
		if t.DeletionTimestamp.IsZero() && !r.evals.managed(t)[manager].empty() {
			holders = append(holders, t)
		}
	}
	if len(holders) > 0 {
		ctrl.LoggerFrom(ctx).V(1).Info("releasing configuration from twins", "twins", len(holders))
		// Their updates wake this configuration again; the requeue is a
		// backstop.
		return ctrl.Result{RequeueAfter: 10 * r.statusInterval()}, r.wakeTwins(ctx, holders)
	}
	base := c.DeepCopy()
	controllerutil.RemoveFinalizer(c, ConfigurationFinalizer)
	if err := r.Patch(ctx, c, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); client.IgnoreNotFound(err) != nil {
		return ctrl.Result{}, fmt.Errorf("removing finalizer: %w", err)
	}
	r.forget(c.UID)
	return ctrl.Result{}, nil
}

func (r *TwinConfigurationReconciler) forget(uid types.UID) {
	r.compiled.forget(uid)
	r.mu.Lock()
	delete(r.admitted, uid)
	delete(r.woken, uid)
	r.mu.Unlock()
}

func (r *TwinConfigurationReconciler) statusInterval() time.Duration {
	if r.StatusInterval > 0 {
		return r.StatusInterval
	}
	return DefaultConfigurationStatusInterval
}

// SetupWithManager registers the configuration controller and its
// applier with mgr.
//
// The applier is a controller of its own with its own workers
// (MaxAppliesInFlight) and rate (AppliesPerSecond), so a configuration
// over 10,000 twins queues 10,000 small reconciles there and never takes a
// worker of the DeviceTwin reconciler, which keeps storing device reports;
// both share the manager's client and so its client-side QPS bound.
func (r *TwinConfigurationReconciler) SetupWithManager(mgr ctrl.Manager) error {
	inFlight := r.MaxAppliesInFlight
	if inFlight <= 0 {
		inFlight = DefaultMaxConfigurationApplies
	}
	perSecond := r.AppliesPerSecond
	if perSecond <= 0 {
		perSecond = DefaultConfigurationAppliesPerSecond
	}
	r.limiter = rate.NewLimiter(rate.Limit(perSecond), max(1, inFlight))
	r.wake = make(chan event.GenericEvent, 1024)

	specChanged := predicate.Funcs{UpdateFunc: func(e event.UpdateEvent) bool {
		return e.ObjectOld.GetGeneration() != e.ObjectNew.GetGeneration() ||
			!e.ObjectNew.GetDeletionTimestamp().IsZero() ||
			len(e.ObjectOld.GetFinalizers()) != len(e.ObjectNew.GetFinalizers())
	}}
	if err := ctrl.NewControllerManagedBy(mgr).
		For(&v1alpha1.TwinConfiguration{}, builder.WithPredicates(specChanged)).
		Watches(&v1alpha1.DeviceTwin{}, r.twinsToConfigurations()).
		WithOptions(controller.Options{MaxConcurrentReconciles: 2}).
		Named("twinconfiguration").
		Complete(QuietOnShutdown(r)); err != nil {
		return err
	}
	return ctrl.NewControllerManagedBy(mgr).
		Named("twinconfiguration-apply").
		Watches(&v1alpha1.DeviceTwin{}, r.twinsToApplier()).
		WatchesRawSource(source.Channel(r.wake, &handler.EnqueueRequestForObject{})).
		WithOptions(controller.Options{MaxConcurrentReconciles: inFlight}).
		Complete(QuietOnShutdown(configurationApplier{r}))
}

// twinsToConfigurations wakes the configurations of a changed twin's
// namespace after StatusInterval, so a stream of twin events makes about
// one status pass per interval (the queue keeps one entry per key).
func (r *TwinConfigurationReconciler) twinsToConfigurations() handler.EventHandler {
	enqueue := func(ctx context.Context, o client.Object, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
		list := &v1alpha1.TwinConfigurationList{}
		if err := r.List(ctx, list, client.InNamespace(o.GetNamespace())); err != nil {
			return
		}
		for i := range list.Items {
			q.AddAfter(reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&list.Items[i])}, r.statusInterval())
		}
	}
	return handler.Funcs{
		CreateFunc: func(ctx context.Context, e event.CreateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			enqueue(ctx, e.Object, q)
		},
		UpdateFunc: func(ctx context.Context, e event.UpdateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			enqueue(ctx, e.ObjectNew, q)
		},
		DeleteFunc: func(ctx context.Context, e event.DeleteEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			r.evals.forget(e.Object.GetUID())
			enqueue(ctx, e.Object, q)
		},
	}
}

// twinsToApplier plans a twin again when it changes, if its namespace has
// configurations or a configuration holds part of it.
func (r *TwinConfigurationReconciler) twinsToApplier() handler.EventHandler {
	enqueue := func(ctx context.Context, o client.Object, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
		req := reconcile.Request{NamespacedName: client.ObjectKeyFromObject(o)}
		for _, mf := range o.GetManagedFields() {
			if len(mf.Manager) > len(ConfigurationManagerPrefix) && mf.Manager[:len(ConfigurationManagerPrefix)] == ConfigurationManagerPrefix {
				q.Add(req)
				return
			}
		}
		list := &v1alpha1.TwinConfigurationList{}
		if err := r.List(ctx, list, client.InNamespace(o.GetNamespace()), client.Limit(1)); err == nil && len(list.Items) > 0 {
			q.Add(req)
		}
	}
	return handler.Funcs{
		CreateFunc: func(ctx context.Context, e event.CreateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			enqueue(ctx, e.Object, q)
		},
		UpdateFunc: func(ctx context.Context, e event.UpdateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			enqueue(ctx, e.ObjectNew, q)
		},
	}
}
