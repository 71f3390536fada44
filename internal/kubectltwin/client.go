package kubectltwin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	goruntime "runtime"
	"slices"
	"sort"
	"strings"
	"sync"

	jsonv2 "github.com/go-json-experiment/json"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/validation"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/queryapi/wire"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// Resource is the plural resource name of DeviceTwins.
const Resource = "devicetwins"

// DefaultChunkSize is how many DeviceTwins one LIST request asks for, as
// kubectl's --chunk-size.
const DefaultChunkSize = 500

var codecs = func() serializer.CodecFactory {
	s := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(s); err != nil {
		panic(err)
	}
	return serializer.NewCodecFactory(s)
}()

// NewClient returns a REST client for the kubetwin.io/v1alpha1 API of the
// cluster cfg points at. It needs no discovery: one request per page.
func NewClient(cfg *rest.Config) (rest.Interface, error) {
	return restClient(cfg, v1alpha1.GroupVersion, "/apis", codecs)
}

// restClient returns a REST client for one group version, without discovery.
func restClient(cfg *rest.Config, gv schema.GroupVersion, apiPath string, cf serializer.CodecFactory) (rest.Interface, error) {
	c := rest.CopyConfig(cfg)
	c.GroupVersion = &gv
	c.APIPath = apiPath
	c.NegotiatedSerializer = cf.WithoutConversion()
	if c.UserAgent == "" {
		c.UserAgent = "kubectl-twin/" + Version() + " " + rest.DefaultKubernetesUserAgent()
	}
	return rest.RESTClientFor(c)
}

// ListOptions are the selectors and page size of a LIST of DeviceTwins.
type ListOptions struct {
	// Namespace to list in; "" lists all namespaces.
	Namespace string
	// LabelSelector and FieldSelector are sent to the server ("" for none).
	LabelSelector, FieldSelector string
	// ChunkSize is the page size (limit); 0 or less lists in one request.
	ChunkSize int64
}

// ListTwins lists the DeviceTwins selected by opts page by page (limit and
// continue, as kubectl does for big lists) and calls visit with each page;
// a page's items are not used after visit returns. It returns the number
// of requests made.
func ListTwins(ctx context.Context, c rest.Interface, opts ListOptions, visit func([]v1alpha1.DeviceTwin) error) (pages int, err error) {
	lo := metav1.ListOptions{LabelSelector: opts.LabelSelector, FieldSelector: opts.FieldSelector}
	if opts.ChunkSize > 0 {
		lo.Limit = opts.ChunkSize
	}
	for {
		var list v1alpha1.DeviceTwinList
		err := c.Get().
			NamespaceIfScoped(opts.Namespace, opts.Namespace != "").
			Resource(Resource).
			VersionedParams(&lo, metav1.ParameterCodec).
			Do(ctx).
			Into(&list)
		pages++
		if err != nil {
			return pages, err
		}
		if err := visit(list.Items); err != nil {
			return pages, err
		}
		if list.Continue == "" {
			return pages, nil
		}
		lo.Continue = list.Continue
	}
}

// Twin is one DeviceTwin of an answer: its IoT Hub twin document and where
// the object lives.
type Twin struct {
	Namespace, Name string
	// InSync is the status of the InSync condition ("" without it).
	InSync string
	// Doc is the IoT Hub twin document (hubtwin.FromDeviceTwin).
	Doc map[string]any
}

// Answer is the result of a query run against the API server.
type Answer struct {
	query.Result
	// Twins holds, for a SELECT * result, the twin behind each item.
	Twins []*Twin
	// Listed is how many DeviceTwins the server returned (before the
	// residual filter); Pages how many LIST requests that took. Through
	// the query API, Listed is how many it evaluated and Pages is 0.
	Listed, Pages int
	// Via is how the query was answered: ViaAPI, ViaList or ViaShards.
	Via string
	// Group is the query API group that answered, with ViaAPI.
	Group string
	// Shards, with ViaShards, are the namespaces whose shards answered;
	// the twins of the others were listed (Listed, Pages).
	Shards []string
	// Evaluated, with ViaShards, is how many twins the shards evaluated.
	Evaluated int
	// Parts, through the query API, is how many requests the answer took
	// (more than 1 when it came in parts, spec.paged).
	Parts int
	// Raw, through a QueryAPI with KeepRaw, holds the items as the query
	// API sent them, and Items is nil.
	Raw []json.RawMessage
	// Streamed, through a QueryAPI with a Sink, is how many items the
	// sink took; Items and Raw are nil.
	Streamed int
}

// Len is how many items the answer has.
func (a *Answer) Len() int { return max(len(a.Items), len(a.Raw), a.Streamed) }

// afterOutputError: a query failed after a part of its answer was
// written. It is not asked again another way (by listing), which would
// write the answer again.
type afterOutputError struct{ err error }

func (e *afterOutputError) Error() string {
	return "after a part of the answer was written: " + e.err.Error()
}

func (e *afterOutputError) Unwrap() error { return e.err }

// Execute answers q over the DeviceTwins of namespace ("" for all): it
// lists them with the plan's label and field selectors, page by page,
// renders each as its IoT Hub document, keeps those the WHERE condition
// matches and runs the query over them.
func Execute(ctx context.Context, c rest.Interface, namespace string, q *query.Query, chunkSize int64) (*Answer, error) {
	return executeList(ctx, c, namespace, nil, q, chunkSize)
}

// executeList is Execute, leaving out the twins of the namespaces in
// except (a field selector: the server does not send them).
func executeList(ctx context.Context, c rest.Interface, namespace string, except []string, q *query.Query, chunkSize int64) (*Answer, error) {
	plan := q.Plan()
	var (
		docs []map[string]any
		kept []*Twin
		ans  = &Answer{}
	)
	fields := []string{}
	if plan.FieldSelector != "" {
		fields = append(fields, plan.FieldSelector)
	}
	for _, ns := range except {
		fields = append(fields, "metadata.namespace!="+ns)
	}
	pages, err := ListTwins(ctx, c, ListOptions{
		Namespace: namespace, LabelSelector: plan.LabelSelector, FieldSelector: strings.Join(fields, ","), ChunkSize: chunkSize,
	}, func(items []v1alpha1.DeviceTwin) error {
		for i := range items {
			ans.Listed++
			doc := hubtwin.FromDeviceTwin(&items[i])
			if !q.Match(doc) { // filter each page now: a residual-only query need not hold the fleet
				continue
			}
			kept = append(kept, &Twin{
				Namespace: items[i].Namespace, Name: items[i].Name,
				InSync: conditionStatus(&items[i], v1alpha1.ConditionInSync), Doc: doc,
			})
			docs = append(docs, doc)
		}
		return nil
	})
	ans.Pages, ans.Via = pages, ViaList
	if err != nil {
		return nil, err
	}
	res, err := q.Run(docs)
	if err != nil {
		return nil, err
	}
	ans.Result = res
	ans.Twins = twinsOfItems(res, kept)
	return ans, nil
}

// twinsOfItems returns, for a SELECT * result run over the documents of
// twins, the twin behind each item (nil for other results).
func twinsOfItems(res query.Result, twins []*Twin) []*Twin {
	if res.ItemType != query.ItemTypeTwin {
		return nil
	}
	// Run returns the documents it was given: find each one's twin.
	byDoc := make(map[uintptr]*Twin, len(twins))
	for _, t := range twins {
		byDoc[mapID(t.Doc)] = t
	}
	out := make([]*Twin, len(res.Items))
	for i, it := range res.Items {
		if out[i] = byDoc[mapID(it)]; out[i] == nil {
			out[i] = &Twin{Doc: it} // not expected: Run returns the documents it is given
		}
	}
	return out
}

// GetTwin returns the DeviceTwin called name in namespace; failing that,
// the one whose device id is name. With namespace "" it looks up the device
// id in every namespace.
func GetTwin(ctx context.Context, c rest.Interface, namespace, name string) (*v1alpha1.DeviceTwin, error) {
	var getErr error
	// A device id that cannot be an object name (upper case letters are
	// fine to ask for; '/', '%', '?' and the like are not) is looked up
	// by device id only.
	if namespace != "" && len(validation.IsDNS1123Subdomain(strings.ToLower(name))) == 0 {
		var t v1alpha1.DeviceTwin
		getErr = c.Get().Namespace(namespace).Resource(Resource).Name(name).Do(ctx).Into(&t)
		if getErr == nil {
			return &t, nil
		}
		if !apierrors.IsNotFound(getErr) {
			return nil, getErr
		}
	}
	var found []v1alpha1.DeviceTwin
	_, err := ListTwins(ctx, c, ListOptions{
		Namespace:     namespace,
		FieldSelector: fields.OneTermEqualSelector(query.FieldDeviceID, name).String(),
	}, func(items []v1alpha1.DeviceTwin) error {
		found = append(found, items...)
		return nil
	})
	switch {
	case err != nil && getErr != nil:
		return nil, getErr // the lookup by name said more
	case err != nil:
		return nil, err
	case len(found) == 1:
		return &found[0], nil
	case len(found) > 1:
		names := make([]string, len(found))
		for i := range found {
			names[i] = found[i].Namespace + "/" + found[i].Name
		}
		sort.Strings(names)
		return nil, fmt.Errorf("device id %q is claimed by %d DeviceTwins: %s", name, len(found), strings.Join(names, ", "))
	case getErr != nil:
		return nil, getErr
	default:
		return nil, apierrors.NewNotFound(v1alpha1.GroupVersion.WithResource(Resource).GroupResource(), name)
	}
}

// conditionStatus returns the status of the condition typ, or "".
func conditionStatus(t *v1alpha1.DeviceTwin, typ string) string {
	for _, c := range t.Status.Conditions {
		if c.Type == typ {
			return string(c.Status)
		}
	}
	return ""
}

// errNoCRD explains a 404 on the collection.
var errNoCRD = errors.New("the server does not serve DeviceTwins (kubetwin.io/v1alpha1): is the CRD installed? (make install)")

// mapID identifies a map by its address.
func mapID(m map[string]any) uintptr { return reflect.ValueOf(m).Pointer() }

// How a query was answered.
const (
	// ViaAPI: the operator's query API (query.kubetwin.io) answered from
	// its cache.
	ViaAPI = "api"
	// ViaList: the plugin listed the DeviceTwins and evaluated the query.
	ViaList = "list"
	// ViaAuto: the query API when kube-apiserver serves it, else listing.
	ViaAuto = "auto"
	// ViaShards: a query over every namespace answered from the twins the
	// query APIs of the shards (an operator per namespace, each with a
	// group of its own) match and a LIST of the other namespaces, merged.
	ViaShards = "shards"
)

// QueryAPI is one group of the operator's query API, as the plugin calls
// it: wire.Group, served by an operator that watches every namespace, or
// wire.ShardGroup(namespace), served by the operator of that namespace's
// shard.
type QueryAPI struct {
	// Group is the API group.
	Group string
	// KeepRaw: the items are kept as they came (Answer.Raw), not decoded
	// (Items, and each Twin's Doc, are nil).
	KeepRaw bool
	// Sink, with KeepRaw, takes the items part by part instead:
	// it writes one part while the next is asked for (Answer.Streamed
	// counts them). An error once it has taken items is an
	// *afterOutputError.
	Sink func(items []json.RawMessage) error
	c    rest.Interface
}

// NewQueryAPI returns a client of group's query API.
func NewQueryAPI(cfg *rest.Config, group string) (*QueryAPI, error) {
	c, err := restClient(cfg, schema.GroupVersion{Group: group, Version: wire.Version}, "/apis", clientgoscheme.Codecs)
	if err != nil {
		return nil, err
	}
	return &QueryAPI{Group: group, c: c}, nil
}

// post sends one TwinQuery of spec and returns its answer.
func (a *QueryAPI) post(ctx context.Context, namespace string, spec wire.TwinQuerySpec) (*wire.TwinQueryStatus, error) {
	gv := wire.GroupVersionOf(a.Group)
	body, err := json.Marshal(wire.TwinQuery{TypeMeta: metav1.TypeMeta{APIVersion: gv, Kind: wire.Kind}, Spec: spec})
	if err != nil {
		return nil, err
	}
	// The answer is decoded as it is read: a whole fleet's is a hundred
	// megabytes or more, not held twice, with a decoder several times
	// faster than encoding/json's. An error's Status is decoded by Stream.
	r, err := a.c.Post().NamespaceIfScoped(namespace, namespace != "").Resource(wire.Resource).
		SetHeader("Content-Type", "application/json").Body(body).Stream(ctx)
	if err != nil {
		return nil, err
	}
	defer func() { _ = r.Close() }()
	var tq wire.TwinQuery
	if err := jsonv2.UnmarshalRead(r, &tq); err != nil {
		return nil, fmt.Errorf("the query API's answer is not a %s: %w", wire.Kind, err)
	}
	return &tq.Status, nil
}

// decodeItems starts decoding raw, the items of a part of an answer, on
// every core, into the end of *into (in order). The function it returns
// waits until they are decoded, and returns the first error.
func decodeItems(raw []json.RawMessage, into *[]map[string]any) func() error {
	base := len(*into)
	*into = slices.Grow(*into, len(raw))[:base+len(raw)]
	docs := (*into)[base:]
	workers := max(1, min(goruntime.GOMAXPROCS(0), len(raw)/256))
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < len(raw); i += workers {
				var err error
				// The answer was decoded whole, so each item is valid JSON.
				if docs[i], err = twin.DecodeValid(raw[i]); err != nil {
					errs[w] = fmt.Errorf("item %d of the query API's answer: %w", base+i, err)
					return
				}
			}
		})
	}
	return func() error {
		wg.Wait()
		return errors.Join(errs...)
	}
}

// notInstalledError: no APIService serves the group.
type notInstalledError struct{ msg string }

func (e *notInstalledError) Error() string { return e.msg }

// Served asks kube-apiserver's discovery whether it serves the query API
// of a.Group (an APIService that is Available). When it does not, it
// says why: not installed (404, a *notInstalledError),
// installed but not available (503), or the error.
func (a *QueryAPI) Served(ctx context.Context) (bool, error) {
	gv := wire.GroupVersionOf(a.Group)
	res := a.c.Get().AbsPath("/apis/" + gv).Do(ctx)
	if err := res.Error(); err != nil {
		switch {
		case apierrors.IsNotFound(err):
			return false, &notInstalledError{gv + " is not served (no APIService: the chart's queryAPI.enabled installs it)"}
		case apierrors.IsServiceUnavailable(err):
			return false, errors.New(gv + " is installed but not available (kubectl get apiservice " + wire.Version + "." + a.Group + ")")
		}
		return false, errors.New("discovery of " + gv + " failed: " + err.Error())
	}
	raw, _ := res.Raw()
	var rl metav1.APIResourceList
	if err := json.Unmarshal(raw, &rl); err != nil {
		return false, errors.New("discovery of " + gv + " is not an APIResourceList: " + err.Error())
	}
	for _, r := range rl.APIResources {
		if r.Name == wire.Resource {
			return true, nil
		}
	}
	return false, errors.New(gv + " does not serve " + wire.Resource)
}

// Execute answers q over the DeviceTwins of namespace ("" for all) with
// the query API: one request, answered from the operator's cache. Its
// answer is the one Execute computes from a LIST (the operator's cache
// may lag the API server by the watch's delay).
//
// A SELECT *, or a projection without GROUP BY or aggregates, is asked
// for in parts (spec.paged): an answer larger than the operator sends at
// once comes in several, each asked for with the previous one's
// status.continue, and the items of one part are decoded (or given to
// Sink) while the next is asked for. An operator older than parts refuses
// spec.paged as an unknown field: it is asked again without it, and an
// answer too large for it is refused (ResponseTooLarge), for the caller
// to list, as is one of an operator that sends only a SELECT * in parts.
func (a *QueryAPI) Execute(ctx context.Context, namespace string, q *query.Query) (*Answer, error) {
	spec := wire.TwinQuerySpec{Query: q.String(), Paged: q.PerTwin()}
	st, err := a.post(ctx, namespace, spec)
	if spec.Paged && apierrors.IsBadRequest(err) && strings.Contains(err.Error(), `unknown field "paged"`) {
		spec.Paged = false
		st, err = a.post(ctx, namespace, spec)
	}
	if err != nil {
		return nil, err
	}
	raw := a.KeepRaw
	stream := raw && a.Sink != nil
	items := make([]map[string]any, 0, len(st.Items))
	var kept []json.RawMessage
	streamed := 0
	// done waits for the work on the previous part (decoding it, or the
	// sink writing it), which runs while the next part is asked for.
	done := func() error { return nil }
	take := func(part []json.RawMessage) {
		switch {
		case stream:
			errc := make(chan error, 1)
			go func() { errc <- a.Sink(part) }()
			streamed += len(part)
			done = sync.OnceValue(func() error { return <-errc })
		case raw:
			kept = append(kept, part...)
		default:
			done = decodeItems(part, &items)
		}
	}
	// fail returns err once the previous part's work is over, marked as
	// coming after output when the sink has written items.
	fail := func(err error) (*Answer, error) {
		_ = done()
		if streamed > 0 {
			return nil, &afterOutputError{err}
		}
		return nil, err
	}
	take(st.Items)
	parts := 1
	for cont := st.Continue; cont != ""; parts++ {
		spec.Continue = cont
		part, err := a.post(ctx, namespace, spec)
		switch {
		case err != nil:
			return fail(err)
		case part.ItemType != st.ItemType:
			return fail(fmt.Errorf("part %d of the query API's answer has items of type %q, the first %q", parts+1, part.ItemType, st.ItemType))
		case len(part.Items) == 0 && part.Continue != "":
			return fail(fmt.Errorf("part %d of the query API's answer is empty but says more follow", parts+1))
		}
		if err := done(); err != nil {
			return fail(err)
		}
		take(part.Items)
		st.Twins = append(st.Twins, part.Twins...)
		cont = part.Continue
	}
	if err := done(); err != nil {
		return fail(err)
	}
	ans := &Answer{Listed: st.Evaluated, Via: ViaAPI, Group: a.Group, Parts: parts, Streamed: streamed}
	ans.ItemType = st.ItemType
	ans.GroupKeys = st.GroupKeys
	if raw {
		ans.Raw = kept
	} else {
		ans.Items = items
	}
	if st.ItemType == query.ItemTypeTwin {
		if len(st.Twins) != ans.Len() {
			return fail(fmt.Errorf("the query API's answer names %d twins for %d items", len(st.Twins), ans.Len()))
		}
		ans.Twins = make([]*Twin, len(st.Twins))
		for i, r := range st.Twins {
			ans.Twins[i] = &Twin{Namespace: r.Namespace, Name: r.Name, InSync: r.InSync}
			if !raw {
				ans.Twins[i].Doc = ans.Items[i]
			}
		}
	}
	return ans, nil
}
