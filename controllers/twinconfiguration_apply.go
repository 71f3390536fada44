package controllers

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// twinApply is what one configuration's field manager should own of a
// twin: its label (empty: none) and the desired paths it wins.
type twinApply struct {
	manager string
	cfg     *compiled // nil for the manager of a configuration that is gone
	label   string
	won     []leaf
}

// admitFunc reports whether a staged rollout lets c give its current
// content to twin t.
type admitFunc func(c *compiled, t *v1alpha1.DeviceTwin) bool

// planTwin decides, for every configuration of t's namespace (cfgs, in any
// order) and every configuration manager on t, what it should own:
//
//   - paths owned by a manager that is not a configuration's (the twin's
//     own manifest, the service API) are never taken;
//   - an invalid configuration keeps what it has, untouched;
//   - per path, the configuration first in precedence order wins; a path
//     overlapping one already won (the same, a prefix, or below it) is lost;
//   - a configuration that targets t wants its content if its rollout lets
//     it, else keeps what it has; one that does not (or is being deleted)
//     wants nothing, label included.
func planTwin(t *v1alpha1.DeviceTwin, cfgs []*compiled, owned map[string]ownership, extra [][]string,
	ec *evalCache, admit admitFunc) []twinApply {
	desired := desiredDoc(t)
	blocked := newPathSet()
	for m, o := range owned {
		if !strings.HasPrefix(m, ConfigurationManagerPrefix) {
			for _, segs := range o.paths {
				blocked.add(segs)
			}
		}
	}
	for _, segs := range extra {
		blocked.add(segs)
	}
	sorted := slices.Clone(cfgs)
	slices.SortFunc(sorted, precedes)
	known := map[string]bool{}
	for _, c := range sorted {
		known[c.manager()] = true
		if c.invalid != nil {
			for _, segs := range owned[c.manager()].paths {
				blocked.add(segs)
			}
		}
	}
	view := &twinView{t: t}
	var out []twinApply
	for _, c := range sorted {
		if c.invalid != nil {
			continue
		}
		a := twinApply{manager: c.manager(), cfg: c}
		if c.targets(ec, view) {
			a.label = v1alpha1.ConfigurationTargeted
			want := c.leaves
			if !admit(c, t) {
				want = keptLeaves(owned[c.manager()], desired)
			}
			for _, l := range want {
				if !blocked.overlaps(l.segs) {
					a.won = append(a.won, l)
				}
			}
			for _, l := range a.won {
				blocked.add(l.segs)
			}
			if len(a.won) > 0 {
				a.label = v1alpha1.ConfigurationApplied
			}
		}
		out = append(out, a)
	}
	for m := range owned {
		if strings.HasPrefix(m, ConfigurationManagerPrefix) && !known[m] {
			out = append(out, twinApply{manager: m})
		}
	}
	return out
}

// keptLeaves returns the paths a manager owns with their current values:
// what a twin keeps while a rollout has not reached it.
func keptLeaves(o ownership, desired twin.Doc) []leaf {
	var out []leaf
	for _, segs := range o.paths {
		if v, ok := twin.ValueAt(desired, segs); ok {
			out = append(out, leaf{segs: segs, value: v})
		}
	}
	slices.SortFunc(out, func(a, b leaf) int { return strings.Compare(a.key(), b.key()) })
	return out
}

// hasCurrent reports whether a manager's paths on the twin are all paths
// of c's content with c's values (and there is at least one).
func hasCurrent(c *compiled, o ownership, desired twin.Doc) bool {
	if len(o.paths) == 0 {
		return false
	}
	want := map[string]any{}
	for _, l := range c.leaves {
		want[l.key()] = l.value
	}
	for k, segs := range o.paths {
		w, ok := want[k]
		if !ok {
			return false
		}
		v, ok := twin.ValueAt(desired, segs)
		if !ok || !sameValue(v, w) {
			return false
		}
	}
	return true
}

// settled reports whether the manager already owns exactly what a says,
// with the same values: then no write is needed.
func settled(a twinApply, o ownership, t *v1alpha1.DeviceTwin, desired twin.Doc) bool {
	wantLabels := 0
	if a.label != "" {
		wantLabels = 1
		key := v1alpha1.ConfigurationsLabelPrefix + strings.TrimPrefix(a.manager, ConfigurationManagerPrefix)
		if !o.labels[key] || t.Labels[key] != a.label {
			return false
		}
	}
	if len(o.labels) != wantLabels || len(o.paths) != len(a.won) {
		return false
	}
	for _, l := range a.won {
		if _, ok := o.paths[l.key()]; !ok {
			return false
		}
		v, ok := twin.ValueAt(desired, l.segs)
		if !ok || !sameValue(v, l.value) {
			return false
		}
	}
	return true
}

// applyObject is the apply of a: the label and the won paths, nothing
// else, so that everything else the manager owned is released.
func applyObject(t *v1alpha1.DeviceTwin, a twinApply) *unstructured.Unstructured {
	u := &unstructured.Unstructured{}
	u.SetAPIVersion(v1alpha1.GroupVersion.String())
	u.SetKind("DeviceTwin")
	u.SetNamespace(t.Namespace)
	u.SetName(t.Name)
	// The uid makes the apply fail rather than create a twin deleted meanwhile.
	u.SetUID(t.UID)
	if a.label != "" {
		u.SetLabels(map[string]string{v1alpha1.ConfigurationsLabelPrefix + strings.TrimPrefix(a.manager, ConfigurationManagerPrefix): a.label})
	}
	if len(a.won) > 0 {
		desired := map[string]any{}
		for _, l := range a.won {
			m := desired
			for _, s := range l.segs[:len(l.segs)-1] {
				next, ok := m[s].(map[string]any)
				if !ok {
					next = map[string]any{}
					m[s] = next
				}
				m = next
			}
			m[l.segs[len(l.segs)-1]] = twin.DeepCopy(twin.Doc{"v": l.value})["v"]
		}
		u.Object["spec"] = map[string]any{"desired": desired}
	}
	return u
}

// configurationApplier gives each twin what the configurations of its
// namespace say: one reconcile per twin, one apply per configuration
// whose share of the twin changed.
type configurationApplier struct {
	*TwinConfigurationReconciler
}

var _ reconcile.Reconciler = configurationApplier{}

// Reconcile plans one twin and applies what differs from what each
// configuration's manager owns.
func (a configurationApplier) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	t := &v1alpha1.DeviceTwin{}
	if err := a.Get(ctx, req.NamespacedName, t); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !t.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, nil
	}
	cfgs, err := a.configurations(ctx, t.Namespace)
	if err != nil {
		return ctrl.Result{}, err
	}
	owned := a.evals.managed(t)
	if len(cfgs) == 0 && !hasConfigurationManager(owned) {
		return ctrl.Result{}, nil
	}
	desired := desiredDoc(t)
	var extra [][]string
	// A conflict names paths another manager took after our cache saw the
	// twin: plan again without them (a few times at most).
	for attempt := 0; ; attempt++ {
		plan := planTwin(t, cfgs, owned, extra, &a.evals, a.admit)
		// Releases first, so a path changing hands is free when its new
		// winner applies.
		slices.SortStableFunc(plan, func(x, y twinApply) int {
			return cmpBool(len(x.won) >= len(owned[x.manager].paths), len(y.won) >= len(owned[y.manager].paths))
		})
		conflicts, err := a.applyPlan(ctx, t, plan, owned, desired)
		if err != nil || len(conflicts) == 0 {
			return ctrl.Result{}, err
		}
		if attempt == 2 {
			return ctrl.Result{}, fmt.Errorf("paths of twin %s kept conflicting: %v", t.Name, conflicts)
		}
		extra = append(extra, conflicts...)
	}
}

func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case !a:
		return -1
	}
	return 1
}

func hasConfigurationManager(owned map[string]ownership) bool {
	for m := range owned {
		if strings.HasPrefix(m, ConfigurationManagerPrefix) {
			return true
		}
	}
	return false
}

// applyPlan applies every entry of plan that differs from what its
// manager owns. It returns the desired paths an apply conflicted on with a
// manager that is not a configuration's (they are the twin's own).
func (a configurationApplier) applyPlan(ctx context.Context, t *v1alpha1.DeviceTwin, plan []twinApply,
	owned map[string]ownership, desired twin.Doc) ([][]string, error) {
	log := ctrl.LoggerFrom(ctx)
	for _, p := range plan {
		if settled(p, owned[p.manager], t, desired) {
			continue
		}
		err := a.apply(ctx, t, p)
		switch {
		case err == nil:
			log.V(1).Info("configuration applied", "manager", p.manager, "label", p.label, "paths", len(p.won))
		case apierrors.IsNotFound(err):
			return nil, nil
		case apierrors.IsConflict(err):
			paths, ours := conflictPaths(err)
			if len(paths) == 0 || ours {
				return nil, fmt.Errorf("applying %s: %w", p.manager, err)
			}
			return paths, nil
		default:
			return nil, fmt.Errorf("applying %s: %w", p.manager, err)
		}
	}
	return nil, nil
}

// apply sends one apply, within the applier's rate.
func (a configurationApplier) apply(ctx context.Context, t *v1alpha1.DeviceTwin, p twinApply) error {
	if !a.limiter.Allow() {
		configApplyThrottled.Inc()
		if err := a.limiter.Wait(ctx); err != nil {
			return err
		}
	}
	configAppliesInFlight.Inc()
	defer configAppliesInFlight.Dec()
	// Never forced: a path another manager owns with another value is a
	// conflict, and the twin's own manifest wins.
	err := a.Apply(ctx, client.ApplyConfigurationFromUnstructured(applyObject(t, p)), client.FieldOwner(p.manager))
	switch {
	case err == nil:
		configApplies.WithLabelValues("ok").Inc()
	case apierrors.IsConflict(err):
		configApplies.WithLabelValues("conflict").Inc()
	default:
		configApplies.WithLabelValues("error").Inc()
	}
	return err
}

// conflictPaths reads the desired paths of a field manager conflict, and
// whether a configuration's manager holds one of them (then our cache is
// behind, and a retry will do).
func conflictPaths(err error) ([][]string, bool) {
	var se *apierrors.StatusError
	if !errors.As(err, &se) || se.ErrStatus.Details == nil {
		return nil, false
	}
	var out [][]string
	ours := false
	for _, c := range se.ErrStatus.Details.Causes {
		if c.Type != metav1.CauseTypeFieldManagerConflict {
			continue
		}
		if strings.Contains(c.Message, `"`+ConfigurationManagerPrefix) {
			ours = true
			continue
		}
		if segs, ok := desiredFieldPath(c.Field); ok {
			out = append(out, segs)
		}
	}
	return out, ours
}

// desiredFieldPath parses a conflict's field path, .spec.desired.a.b, into
// its keys below spec.desired. Keys holding '.' cannot be told apart;
// the twin rules forbid them.
func desiredFieldPath(f string) ([]string, bool) {
	rest, ok := strings.CutPrefix(f, ".spec.desired.")
	if !ok || rest == "" {
		return nil, false
	}
	return strings.Split(rest, "."), true
}
