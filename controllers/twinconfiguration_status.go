package controllers

import (
	"fmt"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// configSurvey is what one status pass found over a namespace's twins for
// one configuration.
type configSurvey struct {
	targeted, applied, inSync int32
	// unsettled: twins whose share of this configuration is not yet what
	// it should be (content to give or to take back).
	unsettled int
	// inFlight: twins that have (or are being given) the content and do
	// not report it back yet.
	inFlight int
	// candidates: targeted twins a staged rollout has not reached, which
	// would get some of the content; in name order.
	candidates []*v1alpha1.DeviceTwin
	metrics    []v1alpha1.ConfigurationMetricResult
	// concerned: twins this configuration targets or holds part of.
	concerned []*v1alpha1.DeviceTwin
	// rollout outcome, set by rollout.
	paused, halted bool
	unhealthy      int32
	maxUnhealthy   int
}

// survey runs one pass over twins (the namespace's, from the cache) for
// self, planning each twin as the applier would. What it finds for a twin
// is kept with the twin's resourceVersion and the configurations'
// generations (and rollout admissions), so a pass recomputes only the
// twins that changed since the last one.
func (r *TwinConfigurationReconciler) survey(self *compiled, cfgs []*compiled, twins []v1alpha1.DeviceTwin) configSurvey {
	s := configSurvey{metrics: make([]v1alpha1.ConfigurationMetricResult, len(self.metrics))}
	for i, m := range self.metrics {
		s.metrics[i].Name = m.name
	}
	key := r.planKey(cfgs)
	for i := range twins {
		t := &twins[i]
		if !t.DeletionTimestamp.IsZero() {
			continue
		}
		v := &twinView{t: t}
		for j, m := range self.metrics {
			if r.evals.match(v, m.key, m.q) {
				s.metrics[j].Count++
			}
		}
		if self.invalid != nil {
			continue
		}
		f, ok := r.evals.fact(t, key, self.uid)
		if !ok {
			f = r.surveyTwin(self, cfgs, v)
			r.evals.setFact(t, key, self.uid, f)
		}
		if !f.targeted && !f.held {
			continue
		}
		s.concerned = append(s.concerned, t)
		if !f.settled {
			s.unsettled++
		}
		if !f.targeted {
			continue
		}
		s.targeted++
		switch {
		case f.applied:
			s.applied++
			if f.inSync {
				s.inSync++
			} else {
				s.inFlight++
			}
		case !f.settled && f.wins:
			s.inFlight++
		}
		if f.candidate {
			s.candidates = append(s.candidates, t)
		}
	}
	slices.SortFunc(s.candidates, func(a, b *v1alpha1.DeviceTwin) int { return strings.Compare(a.Name, b.Name) })
	return s
}

// surveyFact is what a status pass needs to know of one twin for one
// configuration.
type surveyFact struct {
	targeted, held bool
	// settled: the configuration's manager owns what the plan says.
	settled bool
	// wins: the plan gives the configuration some paths of the twin.
	wins bool
	// applied: label Applied and some paths owned; inSync: those reported back.
	applied, inSync bool
	// candidate: a staged rollout has not reached the twin, and would
	// give it some of the content.
	candidate bool
}

func (r *TwinConfigurationReconciler) surveyTwin(self *compiled, cfgs []*compiled, v *twinView) surveyFact {
	t := v.t
	owned := r.evals.managed(t)
	mine := owned[self.manager()]
	f := surveyFact{targeted: self.targets(&r.evals, v), held: !mine.empty()}
	if !f.targeted {
		f.settled = !f.held
		return f
	}
	desired := desiredDoc(t)
	a := findApply(planTwin(t, cfgs, owned, nil, &r.evals, r.admit), self.manager())
	f.settled = settled(a, mine, t, desired)
	f.wins = len(a.won) > 0
	f.applied = t.Labels[self.labelKey()] == v1alpha1.ConfigurationApplied && len(mine.paths) > 0
	f.inSync = f.applied && reportsBack(mine, t, desired)
	if self.rollout != nil && !hasCurrent(self, mine, desired) && !r.admit(self, t) {
		admitSelf := func(c *compiled, t *v1alpha1.DeviceTwin) bool { return c == self || r.admit(c, t) }
		b := findApply(planTwin(t, cfgs, owned, nil, &r.evals, admitSelf), self.manager())
		f.candidate = len(b.won) > 0
	}
	return f
}

// planKey names the configurations of a namespace as planned (each one's
// uid, generation and deletion) and the rollouts' admissions: survey facts
// computed under another key are stale.
func (r *TwinConfigurationReconciler) planKey(cfgs []*compiled) string {
	var b strings.Builder
	for _, c := range cfgs {
		fmt.Fprintf(&b, "%s/%d/%t;", c.uid, c.generation, c.deleting)
	}
	r.mu.Lock()
	fmt.Fprintf(&b, "#%d", r.admissions)
	r.mu.Unlock()
	return b.String()
}

func findApply(plan []twinApply, manager string) twinApply {
	for _, a := range plan {
		if a.manager == manager {
			return a
		}
	}
	return twinApply{manager: manager}
}

// reportsBack reports whether the twin reports every desired path the
// manager owns with the value it has in spec.desired.
func reportsBack(o ownership, t *v1alpha1.DeviceTwin, desired twin.Doc) bool {
	reported, err := specDoc(t.Status.Reported)
	if err != nil {
		return false
	}
	for _, segs := range o.paths {
		want, ok := twin.ValueAt(desired, segs)
		if !ok {
			return false
		}
		got, ok := twin.ValueAt(reported, segs)
		if !ok || !sameValue(got, want) {
			return false
		}
	}
	return true
}

// admit reports whether c may give its current content to t: always
// without a rollout; with one, when the rollout let t in for c's current
// generation.
func (r *TwinConfigurationReconciler) admit(c *compiled, t *v1alpha1.DeviceTwin) bool {
	if c.rollout == nil {
		return true
	}
	if hasCurrent(c, r.evals.managed(t)[c.manager()], desiredDoc(t)) {
		return true
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	a := r.admitted[c.uid]
	return a != nil && a.generation == c.generation && a.names[t.Name]
}

// desiredDoc returns a twin's spec.desired, empty if it does not decode.
func desiredDoc(t *v1alpha1.DeviceTwin) twin.Doc {
	d, err := specDoc(t.Spec.Desired)
	if err != nil {
		return twin.Doc{}
	}
	return d
}

// rollout lets a staged rollout go on: while it is neither paused nor
// halted by its health metric, it lets in candidates, in name order, until
// maxInFlight twins are in flight. It returns the twins let in.
func (r *TwinConfigurationReconciler) rollout(self *compiled, s *configSurvey) []*v1alpha1.DeviceTwin {
	ro := self.rollout
	if ro == nil || self.invalid != nil {
		return nil
	}
	s.paused = ro.Paused
	if ro.HealthMetric != "" {
		for _, m := range s.metrics {
			if m.Name == ro.HealthMetric {
				s.unhealthy = m.Count
			}
		}
		if ro.MaxUnhealthy != nil {
			s.maxUnhealthy, _ = intstr.GetScaledValueFromIntOrPercent(ro.MaxUnhealthy, int(s.applied), false)
		}
		s.halted = int(s.unhealthy) > s.maxUnhealthy
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.admitted == nil {
		r.admitted = map[types.UID]*admission{}
	}
	a := r.admitted[self.uid]
	if a == nil || a.generation != self.generation {
		a = &admission{generation: self.generation, names: map[string]bool{}}
		r.admitted[self.uid] = a
		r.admissions++
	}
	if s.paused || s.halted {
		// Twins let in but not yet given the content do not get it.
		if len(a.names) > 0 {
			clear(a.names)
			r.admissions++
		}
		return nil
	}
	limit, _ := intstr.GetScaledValueFromIntOrPercent(&ro.MaxInFlight, int(s.targeted), true)
	budget := max(limit, 1) - s.inFlight
	var in []*v1alpha1.DeviceTwin
	for _, t := range s.candidates {
		if len(in) >= budget {
			break
		}
		a.names[t.Name] = true
		in = append(in, t)
	}
	if len(in) > 0 {
		r.admissions++
	}
	s.candidates = s.candidates[len(in):]
	return in
}

// configStatus is the status a pass gives: counts, metrics, and the
// conditions in the kstatus convention (Reconciling and Stalled present
// only when True).
func configStatus(c *v1alpha1.TwinConfiguration, self *compiled, s configSurvey, now metav1.Time) v1alpha1.TwinConfigurationStatus {
	st := *c.Status.DeepCopy()
	st.ObservedGeneration = c.Generation
	st.TargetedCount, st.AppliedCount, st.InSyncCount = s.targeted, s.applied, s.inSync
	st.Metrics = s.metrics
	if len(st.Metrics) == 0 {
		st.Metrics = nil
	}
	gen := c.Generation
	set := func(typ string, status metav1.ConditionStatus, reason, msg string) {
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{
			Type: typ, Status: status, Reason: reason, Message: msg, ObservedGeneration: gen, LastTransitionTime: now,
		})
	}
	waiting := len(s.candidates)
	var (
		ready                = metav1.ConditionFalse
		progressing          = metav1.ConditionFalse
		reconciling, stalled bool
		reason, msg          string
	)
	switch {
	case self.invalid != nil:
		reason, msg, stalled = v1alpha1.ReasonInvalidConfiguration, self.invalid.Error(), true
	case s.halted:
		reason, stalled = v1alpha1.ReasonRolloutHalted, true
		msg = fmt.Sprintf("metric %s counts %d twins, more than the %d allowed: %d targeted twins wait for the content",
			self.rollout.HealthMetric, s.unhealthy, s.maxUnhealthy, waiting)
	case s.unsettled > 0:
		reason, progressing, reconciling = v1alpha1.ReasonApplying, metav1.ConditionTrue, true
		msg = fmt.Sprintf("%d of %d targeted twins are being given the content", s.unsettled, s.targeted)
	case waiting > 0 && s.paused:
		reason = v1alpha1.ReasonRolloutPaused
		msg = fmt.Sprintf("rollout paused: %d targeted twins wait for the content", waiting)
	case waiting > 0 || s.inFlight > 0:
		reason, progressing, reconciling = v1alpha1.ReasonWaitingForDevices, metav1.ConditionTrue, true
		msg = fmt.Sprintf("%d of %d twins with the content report it back", s.inSync, s.applied)
		if waiting > 0 {
			msg += fmt.Sprintf("; %d targeted twins wait for the rollout", waiting)
		}
	default:
		reason, ready = v1alpha1.ReasonApplied, metav1.ConditionTrue
		msg = fmt.Sprintf("%d twins have the content and report it back (%d targeted)", s.applied, s.targeted)
	}
	set(v1alpha1.ConditionReady, ready, reason, msg)
	set(v1alpha1.ConfigConditionProgressing, progressing, reason, msg)
	if reconciling {
		set(v1alpha1.ConditionReconciling, metav1.ConditionTrue, reason, msg)
	} else {
		meta.RemoveStatusCondition(&st.Conditions, v1alpha1.ConditionReconciling)
	}
	if stalled {
		set(v1alpha1.ConditionStalled, metav1.ConditionTrue, reason, msg)
	} else {
		meta.RemoveStatusCondition(&st.Conditions, v1alpha1.ConditionStalled)
	}
	return st
}
