package controllers

import (
	"cmp"
	"encoding/json"
	"slices"
	"strings"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/internal/webhook"
)

// ConfigurationManagerPrefix prefixes the server-side apply field manager
// of each TwinConfiguration: kubetwin-configuration-<name>.
const ConfigurationManagerPrefix = "kubetwin-configuration-"

// ConfigurationFinalizer lets a deleted configuration take its content
// back from every twin before it goes.
const ConfigurationFinalizer = "kubetwin.io/configuration"

// pathSep joins the keys of a desired path in map keys (no twin key holds it).
const pathSep = "\x00"

// leaf is one desired path of a configuration's content and its value
// (a scalar, or an empty object).
type leaf struct {
	segs  []string
	value any
}

func (l leaf) key() string { return strings.Join(l.segs, pathSep) }

// compiled is a configuration checked and parsed, for one generation.
type compiled struct {
	uid        types.UID
	generation int64
	name       string
	priority   int32
	created    metav1.Time
	deleting   bool
	invalid    error
	target     *query.Query // nil: every twin (or the selector decides)
	targetKey  string
	selector   labels.Selector
	leaves     []leaf
	metrics    []compiledMetric
	rollout    *v1alpha1.RolloutSpec
}

type compiledMetric struct {
	name string
	q    *query.Query
	key  string
}

func (c *compiled) manager() string  { return ConfigurationManagerPrefix + c.name }
func (c *compiled) labelKey() string { return v1alpha1.ConfigurationsLabelPrefix + c.name }

// compileConfiguration checks c with the webhook's rules and parses it.
func compileConfiguration(c *v1alpha1.TwinConfiguration) *compiled {
	out := &compiled{
		uid: c.UID, generation: c.Generation, name: c.Name, priority: c.Spec.Priority,
		created: c.CreationTimestamp, deleting: !c.DeletionTimestamp.IsZero(),
	}
	if errs := webhook.ValidateConfiguration(c); len(errs) > 0 {
		msgs := make([]string, len(errs))
		for i, e := range errs {
			msgs[i] = e.Error()
		}
		out.invalid = invalidError(strings.Join(msgs, "; "))
		return out
	}
	if c.Spec.TargetCondition != "" {
		out.target, _ = webhook.ParseTargetCondition(c.Spec.TargetCondition)
		if out.target != nil {
			out.targetKey = "t:" + out.target.String()
		}
	}
	out.selector, _ = webhook.TargetSelector(c, out.target)
	if out.selector == nil {
		out.selector = labels.Everything()
	}
	var raw []byte
	if c.Spec.Content.Desired != nil {
		raw = c.Spec.Content.Desired.Raw
	}
	content, _ := twin.ParseSection(twin.Desired, "spec.content.desired", raw)
	out.leaves = flatten(nil, content, nil)
	out.rollout = c.Spec.Rollout.DeepCopy()
	for _, m := range c.Spec.Metrics {
		q, _ := webhook.ParseMetricQuery(m.Query)
		out.metrics = append(out.metrics, compiledMetric{name: m.Name, q: q, key: "m:" + q.String()})
	}
	return out
}

type invalidError string

func (e invalidError) Error() string { return string(e) }

// flatten appends the leaves of d below prefix: scalars and empty objects.
func flatten(prefix []string, d twin.Doc, out []leaf) []leaf {
	for _, k := range sortedDocKeys(d) {
		segs := append(slices.Clip(prefix), k)
		if sub, ok := d[k].(map[string]any); ok && len(sub) > 0 {
			out = flatten(segs, sub, out)
			continue
		}
		out = append(out, leaf{segs: segs, value: d[k]})
	}
	return out
}

func sortedDocKeys(d map[string]any) []string {
	keys := make([]string, 0, len(d))
	for k := range d {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// precedes orders configurations by precedence on a desired path: higher
// priority first, then the newest, then by name.
func precedes(a, b *compiled) int {
	if a.priority != b.priority {
		return cmp.Compare(b.priority, a.priority)
	}
	if !a.created.Equal(&b.created) {
		if b.created.Before(&a.created) {
			return -1
		}
		return 1
	}
	return cmp.Compare(a.name, b.name)
}

// compiledCache keeps each configuration compiled once per generation.
type compiledCache struct {
	mu sync.Mutex
	m  map[types.UID]*compiled
}

func (cc *compiledCache) get(c *v1alpha1.TwinConfiguration) *compiled {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.m == nil {
		cc.m = map[types.UID]*compiled{}
	}
	deleting := !c.DeletionTimestamp.IsZero()
	if x, ok := cc.m[c.UID]; ok && x.generation == c.Generation && x.deleting == deleting && x.priority == c.Spec.Priority {
		return x
	}
	x := compileConfiguration(c)
	cc.m[c.UID] = x
	return x
}

func (cc *compiledCache) forget(uid types.UID) {
	cc.mu.Lock()
	delete(cc.m, uid)
	cc.mu.Unlock()
}

// evalCache remembers, per twin and resourceVersion, the answer of each
// query, so that a status pass over 10,000 twins renders only the twins
// that changed since the last one.
type evalCache struct {
	mu sync.Mutex
	m  map[types.UID]*evalEntry
}

type evalEntry struct {
	rv      string
	results map[string]bool
	owned   map[string]ownership // managedBy, once parsed
	// factsKey is the planKey the facts were found under.
	factsKey string
	facts    map[types.UID]surveyFact
}

// fact returns what a status pass found for the twin and configuration
// uid under key, if it is still current.
func (ec *evalCache) fact(t *v1alpha1.DeviceTwin, key string, uid types.UID) (surveyFact, bool) {
	ec.mu.Lock()
	defer ec.mu.Unlock()
	e := ec.entry(t)
	if e.factsKey != key {
		return surveyFact{}, false
	}
	f, ok := e.facts[uid]
	return f, ok
}

func (ec *evalCache) setFact(t *v1alpha1.DeviceTwin, key string, uid types.UID, f surveyFact) {
	ec.mu.Lock()
	defer ec.mu.Unlock()
	e := ec.entry(t)
	if e.factsKey != key || e.facts == nil {
		e.factsKey, e.facts = key, map[types.UID]surveyFact{}
	}
	e.facts[uid] = f
}

// entry returns the twin's entry for its current resourceVersion; call
// with ec.mu held.
func (ec *evalCache) entry(t *v1alpha1.DeviceTwin) *evalEntry {
	if ec.m == nil {
		ec.m = map[types.UID]*evalEntry{}
	}
	e := ec.m[t.UID]
	if e == nil || e.rv != t.ResourceVersion {
		e = &evalEntry{rv: t.ResourceVersion, results: map[string]bool{}}
		ec.m[t.UID] = e
	}
	return e
}

// managed returns managedBy(t), parsed once per resourceVersion. The
// result must not be changed.
func (ec *evalCache) managed(t *v1alpha1.DeviceTwin) map[string]ownership {
	ec.mu.Lock()
	owned := ec.entry(t).owned
	ec.mu.Unlock()
	if owned != nil {
		return owned
	}
	owned = managedBy(t)
	ec.mu.Lock()
	ec.entry(t).owned = owned
	ec.mu.Unlock()
	return owned
}

// twinView renders a twin's IoT Hub document at most once.
type twinView struct {
	t   *v1alpha1.DeviceTwin
	doc map[string]any
}

func (v *twinView) document() map[string]any {
	if v.doc == nil {
		v.doc = hubtwin.FromDeviceTwin(v.t)
	}
	return v.doc
}

// match reports whether q (nil: every twin) holds for the twin.
func (ec *evalCache) match(v *twinView, key string, q *query.Query) bool {
	if q == nil {
		return true
	}
	ec.mu.Lock()
	if r, ok := ec.entry(v.t).results[key]; ok {
		ec.mu.Unlock()
		return r
	}
	ec.mu.Unlock()
	r := q.Match(v.document())
	ec.mu.Lock()
	ec.entry(v.t).results[key] = r
	ec.mu.Unlock()
	return r
}

func (ec *evalCache) forget(uid types.UID) {
	ec.mu.Lock()
	delete(ec.m, uid)
	ec.mu.Unlock()
}

// targets reports whether c targets the twin.
func (c *compiled) targets(ec *evalCache, v *twinView) bool {
	if c.invalid != nil || c.deleting {
		return false
	}
	if !c.selector.Matches(labels.Set(v.t.Labels)) {
		return false
	}
	return ec.match(v, c.targetKey, c.target)
}

// ownership is what one field manager owns of a twin: label keys and
// desired paths (leaves, keys joined by pathSep).
type ownership struct {
	labels map[string]bool
	paths  map[string][]string
}

func (o ownership) empty() bool { return len(o.labels) == 0 && len(o.paths) == 0 }

// managedBy returns, per field manager of the twin's main resource, what
// it owns (status subresource entries are left out).
func managedBy(t *v1alpha1.DeviceTwin) map[string]ownership {
	out := map[string]ownership{}
	for _, mf := range t.ManagedFields {
		if mf.Subresource != "" || mf.FieldsV1 == nil {
			continue
		}
		var fields struct {
			Metadata struct {
				Labels map[string]json.RawMessage `json:"f:labels"`
			} `json:"f:metadata"`
			Spec struct {
				Desired json.RawMessage `json:"f:desired"`
			} `json:"f:spec"`
		}
		if json.Unmarshal(mf.FieldsV1.GetRawBytes(), &fields) != nil {
			continue
		}
		o, ok := out[mf.Manager]
		if !ok {
			o = ownership{labels: map[string]bool{}, paths: map[string][]string{}}
			out[mf.Manager] = o
		}
		for k := range fields.Metadata.Labels {
			if name, ok := strings.CutPrefix(k, "f:"); ok {
				o.labels[name] = true
			}
		}
		if len(fields.Spec.Desired) > 0 {
			fieldLeaves(nil, fields.Spec.Desired, o.paths)
		}
	}
	return out
}

// fieldLeaves collects the leaves of a FieldsV1 subtree: members ("f:key")
// without members of their own.
func fieldLeaves(prefix []string, raw json.RawMessage, out map[string][]string) {
	var node map[string]json.RawMessage
	if json.Unmarshal(raw, &node) != nil {
		return
	}
	children := 0
	for k, sub := range node {
		name, ok := strings.CutPrefix(k, "f:")
		if !ok {
			continue
		}
		children++
		fieldLeaves(append(slices.Clip(prefix), name), sub, out)
	}
	if children == 0 && len(prefix) > 0 {
		out[strings.Join(prefix, pathSep)] = prefix
	}
}

// sameValue compares two twin values (numbers by value).
func sameValue(a, b any) bool { return twin.Equal(twin.Doc{"v": a}, twin.Doc{"v": b}) }

// pathSet tells whether a desired path overlaps paths already taken: the
// same path, one of its prefixes, or one below it.
type pathSet struct {
	leaves map[string]bool
	inner  map[string]bool
}

func newPathSet() *pathSet {
	return &pathSet{leaves: map[string]bool{}, inner: map[string]bool{}}
}

func (s *pathSet) add(segs []string) {
	for i := 1; i < len(segs); i++ {
		s.inner[strings.Join(segs[:i], pathSep)] = true
	}
	s.leaves[strings.Join(segs, pathSep)] = true
}

func (s *pathSet) overlaps(segs []string) bool {
	for i := 1; i <= len(segs); i++ {
		if s.leaves[strings.Join(segs[:i], pathSep)] {
			return true
		}
	}
	return s.inner[strings.Join(segs, pathSep)]
}
