// Package queryapi serves the aggregated API query.kubetwin.io/v1alpha1
// (see package wire for its shape): IoT Hub queries answered from the
// operator's cache of DeviceTwins instead of a LIST of every twin through
// kube-apiserver, with Kubernetes RBAC deciding who may read.
//
// kube-apiserver proxies the API to the operator (an APIService); the
// operator trusts the user kube-apiserver names only on a request signed
// with its front-proxy certificate, and answers a query over a namespace
// only for a user a SubjectAccessReview allows to list
// devicetwins.kubetwin.io there (over all namespaces: cluster-wide), the
// same right a LIST of the twins needs.
package queryapi

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/authentication/authenticator"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/queryapi/wire"
	"github.com/kubetwin/kubetwin/internal/twinscan"
)

// Defaults of the bounds.
const (
	// DefaultMaxConcurrentQueries is how many queries run at once; each
	// holds its matches and its encoded answer.
	DefaultMaxConcurrentQueries = 4
	// DefaultMaxResponseBytes bounds one answer, or one part of an answer
	// in parts: about 10,000 whole twin documents. A larger answer not in
	// parts is refused (kubectl-twin then lists).
	DefaultMaxResponseBytes = 32 << 20
	// maxRequestBytes bounds a request body: a query and its envelope.
	maxRequestBytes = 256 << 10
)

// Options configure the API.
type Options struct {
	// Twins lists the DeviceTwins: the operator's cache (twinscan.CacheLister).
	Twins twinscan.Lister
	// Namespace is the one namespace the operator watches, "" for all.
	// Queries elsewhere are refused (ReasonNamespaceNotServed): the cache
	// has no twins there.
	Namespace string
	// Authenticator and Authorizer decide who may query (Delegating).
	Authenticator authenticator.Request
	Authorizer    authorizer.Authorizer
	// MaxConcurrentQueries queries run at once; more get 429.
	MaxConcurrentQueries int
	// MaxResponseBytes bounds the items of one answer; a larger answer
	// is refused.
	MaxResponseBytes int
	Log              logr.Logger
}

// Handler serves the API under wire.Group and, when it serves one
// namespace, also under that namespace's wire.ShardGroup: whichever
// APIService leads to it (the chart registers the shard's group for an
// operator that watches one namespace, so that shards do not contend for
// one APIService).
type Handler struct {
	o      Options
	slots  chan struct{}
	groups []string
}

// NewHandler returns the API's HTTP handler.
func NewHandler(o Options) *Handler {
	o.MaxConcurrentQueries = max(o.MaxConcurrentQueries, 1)
	if o.MaxResponseBytes <= 0 {
		o.MaxResponseBytes = DefaultMaxResponseBytes
	}
	h := &Handler{o: o, slots: make(chan struct{}, o.MaxConcurrentQueries), groups: []string{wire.Group}}
	if o.Namespace != "" {
		h.groups = append(h.groups, wire.ShardGroup(o.Namespace))
	}
	return h
}

// Groups are the API groups the handler serves.
func (h *Handler) Groups() []string { return slices.Clone(h.groups) }

// ServeHTTP authenticates every request, then serves discovery to any
// user and queries to users allowed to list the twins they read.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	code := h.serve(w, r)
	requestsTotal.WithLabelValues(strconv.Itoa(code)).Inc()
}

func (h *Handler) serve(w http.ResponseWriter, r *http.Request) int {
	resp, ok, err := h.o.Authenticator.AuthenticateRequest(r)
	if err != nil || !ok {
		// No detail: the caller is not kube-apiserver's front proxy.
		return writeStatus(w, apierrors.NewUnauthorized("Unauthorized"))
	}
	p := strings.TrimSuffix(r.URL.Path, "/")
	if p == "/apis" {
		l := &metav1.APIGroupList{TypeMeta: metav1.TypeMeta{Kind: "APIGroupList", APIVersion: "v1"}}
		for _, g := range h.groups {
			l.Groups = append(l.Groups, apiGroup(g))
		}
		return h.discovery(w, r, l)
	}
	// /apis/{group}[/{version}[/...]]
	segs := strings.SplitN(strings.TrimPrefix(p, "/apis/"), "/", 3)
	if !strings.HasPrefix(p, "/apis/") || !slices.Contains(h.groups, segs[0]) || len(segs) > 1 && segs[1] != wire.Version {
		return writeStatus(w, apierrors.NewNotFound(schema.GroupResource{}, p))
	}
	group := segs[0]
	gv := wire.GroupVersionOf(group)
	switch len(segs) {
	case 1:
		g := apiGroup(group)
		g.TypeMeta = metav1.TypeMeta{Kind: "APIGroup", APIVersion: "v1"}
		return h.discovery(w, r, &g)
	case 2:
		return h.discovery(w, r, &metav1.APIResourceList{
			TypeMeta:     metav1.TypeMeta{Kind: "APIResourceList", APIVersion: "v1"},
			GroupVersion: gv,
			APIResources: []metav1.APIResource{{
				Name: wire.Resource, SingularName: "twinquery", Namespaced: true, Kind: wire.Kind,
				Verbs: metav1.Verbs{"create"},
			}},
		})
	}
	rest := segs[2]
	var ns string
	switch segs := strings.Split(rest, "/"); {
	case len(segs) == 1 && segs[0] == wire.Resource:
	case len(segs) == 3 && segs[0] == "namespaces" && segs[1] != "" && segs[2] == wire.Resource:
		ns = segs[1]
	default:
		return writeStatus(w, apierrors.NewNotFound(schema.GroupResource{Group: group, Resource: wire.Resource}, rest))
	}
	if r.Method != http.MethodPost {
		return writeStatus(w, apierrors.NewMethodNotSupported(schema.GroupResource{Group: group, Resource: wire.Resource}, r.Method))
	}
	return h.query(w, r, resp.User, gv, ns)
}

func apiGroup(group string) metav1.APIGroup {
	v := metav1.GroupVersionForDiscovery{GroupVersion: wire.GroupVersionOf(group), Version: wire.Version}
	return metav1.APIGroup{Name: group, Versions: []metav1.GroupVersionForDiscovery{v}, PreferredVersion: v}
}

func (h *Handler) discovery(w http.ResponseWriter, r *http.Request, body any) int {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return writeStatus(w, apierrors.NewMethodNotSupported(schema.GroupResource{}, r.Method))
	}
	b, _ := json.Marshal(body)
	return writeJSON(w, http.StatusOK, b)
}

// devicetwins is what a query reads, and what the user must be allowed to list.
var devicetwins = schema.GroupResource{Group: v1alpha1.GroupVersion.Group, Resource: "devicetwins"}

func (h *Handler) query(w http.ResponseWriter, r *http.Request, u user.Info, gv, ns string) int {
	if h.o.Namespace != "" && ns != h.o.Namespace {
		where := "all namespaces"
		if ns != "" {
			where = "namespace " + ns
		}
		return writeStatus(w, &apierrors.StatusError{ErrStatus: metav1.Status{
			Status: metav1.StatusFailure, Code: http.StatusNotFound, Reason: wire.ReasonNamespaceNotServed,
			Message: fmt.Sprintf("this query API serves the DeviceTwins of namespace %s only (the operator's --namespace), not %s",
				h.o.Namespace, where),
		}})
	}
	decision, reason, err := h.o.Authorizer.Authorize(r.Context(), authorizer.AttributesRecord{
		User: u, Verb: "list", APIGroup: devicetwins.Group, APIVersion: v1alpha1.GroupVersion.Version,
		Resource: devicetwins.Resource, Namespace: ns, ResourceRequest: true,
	})
	if decision != authorizer.DecisionAllow {
		scope := "at the cluster scope"
		if ns != "" {
			scope = fmt.Sprintf("in the namespace %q", ns)
		}
		msg := fmt.Sprintf("User %q cannot list resource %q in API group %q %s, which a query over them needs",
			u.GetName(), devicetwins.Resource, devicetwins.Group, scope)
		if reason != "" {
			msg += ": " + reason
		}
		if err != nil {
			h.o.Log.Error(err, "authorizing a query", "user", u.GetName(), "namespace", ns)
			msg += " (the SubjectAccessReview failed: " + err.Error() + ")"
		}
		return writeStatus(w, apierrors.NewForbidden(devicetwins, "", errors.New(msg)))
	}

	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequestBytes))
	if err != nil {
		return writeStatus(w, apierrors.NewRequestEntityTooLargeError(
			fmt.Sprintf("the request body is over %d bytes: it should hold a TwinQuery", maxRequestBytes)))
	}
	var tq wire.TwinQuery
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&tq); err != nil {
		return writeStatus(w, apierrors.NewBadRequest(`the request body must be a TwinQuery {"apiVersion": "`+gv+
			`", "kind": "`+wire.Kind+`", "spec": {"query": "SELECT ..."}}: `+err.Error()))
	}
	switch {
	case tq.APIVersion != "" && tq.APIVersion != gv:
		return writeStatus(w, apierrors.NewBadRequest(fmt.Sprintf("apiVersion %q: this API serves %s", tq.APIVersion, gv)))
	case tq.Kind != "" && tq.Kind != wire.Kind:
		return writeStatus(w, apierrors.NewBadRequest(fmt.Sprintf("kind %q: this resource takes a %s", tq.Kind, wire.Kind)))
	case tq.Namespace != "" && tq.Namespace != ns:
		return writeStatus(w, apierrors.NewBadRequest(fmt.Sprintf("metadata.namespace %q does not match the namespace of the request %q", tq.Namespace, ns)))
	case strings.TrimSpace(tq.Spec.Query) == "":
		return writeStatus(w, apierrors.NewBadRequest(`spec.query is missing: it holds the query, e.g. "SELECT * FROM devices"`))
	}
	q, err := query.Parse(tq.Spec.Query)
	if err != nil {
		return writeStatus(w, apierrors.NewBadRequest("spec.query: "+err.Error()))
	}
	pg, err := pageOf(tq.Spec, q)
	if err != nil {
		return writeStatus(w, apierrors.NewBadRequest(err.Error()))
	}

	select {
	case h.slots <- struct{}{}:
	default:
		queriesThrottled.Inc()
		return writeStatus(w, apierrors.NewTooManyRequests(
			fmt.Sprintf("too many queries: this server answers at most %d at once (--query-api-max-concurrent-queries)", cap(h.slots)), 1))
	}
	queriesInFlight.Inc()
	defer func() {
		queriesInFlight.Dec()
		<-h.slots
	}()

	start := time.Now()
	status, err := h.answer(r.Context(), q, ns, pg)
	queryDuration.Observe(time.Since(start).Seconds())
	var tooLarge *tooLargeError
	switch {
	case errors.As(err, &tooLarge):
		responsesTooLarge.Inc()
		return writeStatus(w, &apierrors.StatusError{ErrStatus: metav1.Status{
			Status: metav1.StatusFailure, Code: http.StatusUnprocessableEntity, Reason: wire.ReasonResponseTooLarge,
			Message: tooLarge.Error(),
		}})
	case err != nil:
		h.o.Log.Error(err, "answering a query", "namespace", ns)
		return writeStatus(w, apierrors.NewInternalError(err))
	}
	tq.TypeMeta = metav1.TypeMeta{Kind: wire.Kind, APIVersion: gv}
	tq.Namespace = ns
	tq.Status = *status
	b, err := marshalAnswer(&tq)
	if err != nil {
		return writeStatus(w, apierrors.NewInternalError(err))
	}
	// Created, as for other create-only reviews: the answer is new.
	return writeAnswer(w, r, http.StatusCreated, b)
}

// marshalAnswer marshals tq with its items as they are: json.Marshal
// would check and copy every byte of them again (a sixth of a large
// answer's time), and they are compact JSON from itemEncoder. tq is
// marshalled with no items, and they are put between the brackets of
// "items":[] in status, which is there once: every quote inside a string
// is escaped, so the bytes "items":[] are a key and its value.
func marshalAnswer(tq *wire.TwinQuery) ([]byte, error) {
	items := tq.Status.Items
	tq.Status.Items = []json.RawMessage{}
	b, err := json.Marshal(tq)
	tq.Status.Items = items
	if err != nil || len(items) == 0 {
		return b, err
	}
	const key = `"items":[`
	st := bytes.Index(b, []byte(`"status":{`))
	at := bytes.Index(b[max(st, 0):], []byte(key+"]"))
	if st < 0 || at < 0 {
		return nil, errors.New("marshalling a query answer: no status.items in it")
	}
	at += st + len(key)
	size := len(b) + len(items)
	for _, it := range items {
		size += len(it)
	}
	out := make([]byte, 0, size)
	out = append(out, b[:at]...)
	for i, it := range items {
		if i > 0 {
			out = append(out, ',')
		}
		out = append(out, it...)
	}
	return append(out, b[at:]...), nil
}

// tooLargeError: the answer would exceed MaxResponseBytes (after items
// items; -1: its groups).
type tooLargeError struct{ items, limit int }

func (e *tooLargeError) Error() string {
	if e.items < 0 {
		return fmt.Sprintf("the groups of the answer hold more than this server sends (%d bytes, --query-api-max-response-bytes): "+
			"narrow the query (WHERE, or GROUP BY a path with fewer values)", e.limit)
	}
	return fmt.Sprintf("the answer is larger than this server sends (%d bytes, --query-api-max-response-bytes) after %d items: "+
		"narrow the query (WHERE, TOP n, or a projection instead of SELECT *)", e.limit, e.items)
}

// page is where a part of a paged answer starts: of a SELECT * or a
// projection without GROUP BY or aggregates, whose items each come from
// one twin (query.PerTwin), in the twins' order.
type page struct {
	// paged: the answer may come in parts.
	paged bool
	// after is the last twin of the previous part (nil: the first part).
	after *pageKey
}

// pageKey is a twin's place in the answer's order, and what is left of
// the query's TOP after it; it is what status.continue encodes.
type pageKey struct {
	DeviceID  string `json:"d"`
	Namespace string `json:"n"`
	Name      string `json:"m"`
	// Left is the items TOP still allows (-1: no TOP).
	Left int `json:"t"`
}

func (k pageKey) before(deviceID, ns, name string) bool {
	return cmp.Or(strings.Compare(k.DeviceID, deviceID), strings.Compare(k.Namespace, ns), strings.Compare(k.Name, name)) < 0
}

func (k pageKey) token() string {
	b, _ := json.Marshal(k)
	return base64.RawURLEncoding.EncodeToString(b)
}

// pageOf checks spec's paging fields against q.
func pageOf(spec wire.TwinQuerySpec, q *query.Query) (page, error) {
	pg := page{paged: spec.Paged && q.PerTwin()}
	if spec.Continue == "" {
		return pg, nil
	}
	if !spec.Paged {
		return pg, errors.New("spec.continue is only for the parts of a paged answer: set spec.paged too")
	}
	if !pg.paged {
		return pg, errors.New("spec.continue: only the answer of a SELECT * or a projection without GROUP BY or aggregates comes in parts, and this query's rows are of groups of twins")
	}
	b, err := base64.RawURLEncoding.DecodeString(spec.Continue)
	var k pageKey
	if err == nil {
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		err = dec.Decode(&k)
	}
	if err != nil || k.Left < -1 || k.Left == 0 {
		return pg, fmt.Errorf("spec.continue %q is not a continue token this server sent (send status.continue of the previous part as it is)", spec.Continue)
	}
	pg.after = &k
	return pg, nil
}

// answer runs q over the cached twins of ns ("" for all) in the order
// kubectl-twin's listing gives: by deviceId, then namespace and name. A
// paged answer (SELECT *, or a projection of one row per twin) starts
// after pg.after and ends, with status.continue, before the item that
// would make it larger than MaxResponseBytes.
func (h *Handler) answer(ctx context.Context, q *query.Query, ns string, pg page) (*wire.TwinQueryStatus, error) {
	all, err := h.o.Twins(ctx, ns)
	if err != nil {
		return nil, fmt.Errorf("listing the cached DeviceTwins: %w", err)
	}
	if k := pg.after; k != nil {
		// Twins up to the previous part's last are not evaluated again.
		after := all[:0:0]
		for _, t := range all {
			if k.before(hubtwin.DeviceID(t), t.Namespace, t.Name) {
				after = append(after, t)
			}
		}
		all = after
	}
	sel := labels.Everything()
	if s := q.Plan().LabelSelector; s != "" {
		if sel, err = labels.Parse(s); err != nil {
			return nil, fmt.Errorf("the plan's label selector %q: %w", s, err)
		}
	}
	// The label selector only narrows, as the API server's would for a
	// LIST. A twin whose spec the operator has not reconciled yet may not
	// carry its tags' labels: it is evaluated anyway.
	twins := make([]*v1alpha1.DeviceTwin, 0, len(all))
	for _, t := range all {
		if sel.Matches(labels.Set(t.Labels)) || t.Status.ObservedGeneration != t.Generation {
			twins = append(twins, t)
		}
	}
	switch {
	case !q.PerTwin():
		return h.groupRows(q, twins)
	case q.ItemType() != query.ItemTypeTwin:
		return h.pagedRows(q, twins, pg)
	}
	cands := twinscan.Matches(q, twinscan.NewPartial(q.WherePaths()), twins, false) // the documents are rendered whole
	slices.SortFunc(cands, func(a, b twinscan.Match) int {
		return cmp.Or(strings.Compare(a.DeviceID, b.DeviceID), strings.Compare(a.Twin.Namespace, b.Twin.Namespace), strings.Compare(a.Twin.Name, b.Twin.Name))
	})

	st := &wire.TwinQueryStatus{ItemType: q.ItemType(), Items: []json.RawMessage{}, Evaluated: len(twins)}
	n, left := len(cands), -1
	if top, ok := q.Top(); ok {
		left = top
	}
	if pg.after != nil {
		left = pg.after.Left
	}
	if left >= 0 {
		n = min(n, left)
	}
	// The documents are rendered one after another into out, and the
	// items are slices of it: one buffer, not one per twin.
	var (
		out   []byte
		ends  []int
		total int
	)
	for i, c := range cands[:n] {
		start := len(out)
		out = hubtwin.AppendJSON(out, c.Twin)
		if total += len(out) - start + 1; total > h.o.MaxResponseBytes {
			if !pg.paged || i == 0 {
				return nil, &tooLargeError{items: i, limit: h.o.MaxResponseBytes}
			}
			last := cands[i-1]
			k := pageKey{DeviceID: last.DeviceID, Namespace: last.Twin.Namespace, Name: last.Twin.Name, Left: -1}
			if left >= 0 {
				k.Left = left - i
			}
			st.Continue = k.token()
			out = out[:start]
			break
		}
		if i == 0 {
			// Room for the rest, as large as the first, within the bound.
			out = slices.Grow(out, min(h.o.MaxResponseBytes, len(out)*n)-len(out))
		}
		ends = append(ends, len(out))
		st.Twins = append(st.Twins, wire.TwinRef{Namespace: c.Twin.Namespace, Name: c.Twin.Name, InSync: inSync(c.Twin)})
	}
	st.Items = make([]json.RawMessage, len(ends))
	start := 0
	for i, end := range ends {
		st.Items[i] = out[start:end:end]
		start = end
	}
	return st, nil
}

// groupsChunk is how many twins a query of groups (GROUP BY, aggregates)
// evaluates at a time: their partial documents are held for a chunk only
// (for GROUP BY properties, whole documents).
const groupsChunk = 256

// groupRows answers a query whose rows are of groups of twins: the twins
// are added to the groups a chunk at a time, in the answer's order, and
// the groups are refused as too large once they hold more than the bound
// (the answer would be larger still).
func (h *Handler) groupRows(q *query.Query, twins []*v1alpha1.DeviceTwin) (*wire.TwinQueryStatus, error) {
	keyed := sortedTwins(twins)
	partial := twinscan.NewPartial(q.Paths())
	a := q.Aggregate()
	chunk := make([]*v1alpha1.DeviceTwin, 0, groupsChunk)
	docs := make([]map[string]any, 0, groupsChunk)
	for at := 0; at < len(keyed); at += groupsChunk {
		chunk = chunk[:0]
		for _, k := range keyed[at:min(at+groupsChunk, len(keyed))] {
			chunk = append(chunk, k.Twin)
		}
		docs = docs[:0]
		for _, c := range twinscan.Matches(q, partial, chunk, true) {
			docs = append(docs, c.Doc)
		}
		a.Add(docs)
		if a.Size() > h.o.MaxResponseBytes {
			return nil, &tooLargeError{items: -1, limit: h.o.MaxResponseBytes}
		}
	}
	res := a.Result()
	st := &wire.TwinQueryStatus{ItemType: q.ItemType(), Items: []json.RawMessage{}, Evaluated: len(twins), GroupKeys: res.GroupKeys}
	enc := newItemEncoder(h.o.MaxResponseBytes)
	for _, it := range res.Items {
		b, err := enc.encode(it)
		if err != nil {
			return nil, err
		}
		st.Items = append(st.Items, b)
	}
	return st, nil
}

// sortedTwins returns twins with their device ids, in the answer's order:
// by device id, namespace and name.
func sortedTwins(twins []*v1alpha1.DeviceTwin) []twinscan.Match {
	keyed := make([]twinscan.Match, len(twins))
	for i, t := range twins {
		keyed[i] = twinscan.Match{Twin: t, DeviceID: hubtwin.DeviceID(t)}
	}
	slices.SortFunc(keyed, func(a, b twinscan.Match) int {
		return cmp.Or(strings.Compare(a.DeviceID, b.DeviceID), strings.Compare(a.Twin.Namespace, b.Twin.Namespace), strings.Compare(a.Twin.Name, b.Twin.Name))
	})
	return keyed
}

// rowsChunk is the most twins a projection without groups evaluates at a
// time (a variable for the tests). The first chunk is of minRowsChunk
// twins; each next one is what the rest of the bound holds at the bytes
// per twin so far (at least minRowsChunk): a part holds little more than
// it sends in memory, however large the twins are.
var rowsChunk = 8192

const minRowsChunk = 16

// pagedRows answers a projection without groups (q.PerTwin), or a part of
// it when pg.paged: its rows, one per matching twin, in the twins' order,
// after pg.after, up to the bound. The twins are evaluated a chunk at a
// time, in order, until the part is full: a part costs about what it
// sends, not a pass over the rest of the fleet.
func (h *Handler) pagedRows(q *query.Query, twins []*v1alpha1.DeviceTwin, pg page) (*wire.TwinQueryStatus, error) {
	st := &wire.TwinQueryStatus{ItemType: q.ItemType(), Items: []json.RawMessage{}, Evaluated: len(twins)}
	keyed := sortedTwins(twins)
	left := -1 // the rows TOP allows
	if top, ok := q.Top(); ok {
		left = top
	}
	if pg.after != nil {
		left = pg.after.Left
	}
	// A projection of paths is written from each twin's rendered
	// document (twinscan.Rows); the condition needs only its own paths.
	cols, direct := q.PathColumns()
	rows, paths := (*twinscan.Rows)(nil), q.Paths()
	if direct {
		rows, paths = twinscan.NewRows(cols), q.WherePaths()
	}
	partial := twinscan.NewPartial(paths)
	var last *twinscan.Match // the twin of the last row sent
	sent, total := 0, 0
	size := min(rowsChunk, minRowsChunk)
	for at := 0; at < len(keyed) && (left < 0 || sent < left); at += size {
		switch {
		case at > 0 && total == 0:
			size = min(rowsChunk, 2*size) // no row yet
		case at > 0:
			perTwin := max(1, total/at)
			size = min(rowsChunk, max(minRowsChunk, (h.o.MaxResponseBytes-total)/perTwin+1))
		}
		chunk := make([]*v1alpha1.DeviceTwin, 0, size)
		for _, k := range keyed[at:min(at+size, len(keyed))] {
			chunk = append(chunk, k.Twin)
		}
		cands := twinscan.Matches(q, partial, chunk, !direct) // in the order given
		if left >= 0 {
			cands = cands[:min(len(cands), left-sent)]
		}
		items, err := chunkRows(q, rows, cands)
		if err != nil {
			return nil, err
		}
		for i, b := range items {
			if total += len(b) + 1; total > h.o.MaxResponseBytes {
				if !pg.paged || sent == 0 {
					return nil, &tooLargeError{items: sent, limit: h.o.MaxResponseBytes}
				}
				// The next part starts after the twin of the last row sent.
				k := pageKey{DeviceID: last.DeviceID, Namespace: last.Twin.Namespace, Name: last.Twin.Name, Left: -1}
				if left >= 0 {
					k.Left = left - sent
				}
				st.Continue = k.token()
				return st, nil
			}
			st.Items = append(st.Items, b)
			last = &cands[i]
			sent++
		}
	}
	return st, nil
}

// chunkRows returns the rows of cands as JSON: written by rows (on every
// core) when it is not nil, else run and encoded.
func chunkRows(q *query.Query, rows *twinscan.Rows, cands []twinscan.Match) ([]json.RawMessage, error) {
	items := make([]json.RawMessage, len(cands))
	if rows != nil {
		workers := max(1, min(runtime.GOMAXPROCS(0), len(cands)/512))
		var wg sync.WaitGroup
		for w := range workers {
			lo, hi := w*len(cands)/workers, (w+1)*len(cands)/workers
			wg.Go(func() {
				var (
					sc   twinscan.RowScratch
					out  []byte
					ends = make([]int, 0, hi-lo)
				)
				for _, c := range cands[lo:hi] {
					out = rows.Append(out, &sc, c.Twin)
					ends = append(ends, len(out))
				}
				start := 0
				for i, end := range ends {
					items[lo+i] = out[start:end:end]
					start = end
				}
			})
		}
		wg.Wait()
		return items, nil
	}
	res, err := run(q, cands)
	if err != nil {
		return nil, err
	}
	if len(res.Items) != len(cands) {
		return nil, fmt.Errorf("a projection without groups gave %d rows for %d twins", len(res.Items), len(cands))
	}
	enc := newItemEncoder(math.MaxInt)
	for i, row := range res.Items {
		if items[i], err = enc.encode(row); err != nil {
			return nil, err
		}
	}
	return items, nil
}

// run runs q over the partial documents of cands.
func run(q *query.Query, cands []twinscan.Match) (query.Result, error) {
	docs := make([]map[string]any, len(cands))
	for i, c := range cands {
		docs[i] = c.Doc
	}
	return q.Run(docs)
}

func inSync(t *v1alpha1.DeviceTwin) string {
	for _, c := range t.Status.Conditions {
		if c.Type == v1alpha1.ConditionInSync {
			return string(c.Status)
		}
	}
	return ""
}

// itemEncoder encodes items, counting their bytes against a limit.
type itemEncoder struct {
	buf      bytes.Buffer
	enc      *json.Encoder
	n, total int
	limit    int
}

func newItemEncoder(limit int) *itemEncoder {
	e := &itemEncoder{limit: limit}
	e.enc = json.NewEncoder(&e.buf)
	e.enc.SetEscapeHTML(false)
	return e
}

func (e *itemEncoder) encode(item any) (json.RawMessage, error) {
	e.buf.Reset()
	if err := e.enc.Encode(item); err != nil {
		return nil, fmt.Errorf("encoding a query result: %w", err)
	}
	b := bytes.TrimSuffix(e.buf.Bytes(), []byte("\n"))
	e.total += len(b) + 1
	if e.total > e.limit {
		return nil, &tooLargeError{items: e.n, limit: e.limit}
	}
	e.n++
	return slices.Clone(b), nil
}

func writeStatus(w http.ResponseWriter, err *apierrors.StatusError) int {
	st := err.Status()
	st.TypeMeta = metav1.TypeMeta{Kind: "Status", APIVersion: "v1"}
	if st.Code == http.StatusTooManyRequests && st.Details != nil && st.Details.RetryAfterSeconds > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int(st.Details.RetryAfterSeconds)))
	}
	b, _ := json.Marshal(&st)
	return writeJSON(w, int(st.Code), b)
}

func writeJSON(w http.ResponseWriter, code int, b []byte) int {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(code)
	_, _ = w.Write(b)
	return code
}

// Server serves the API over HTTPS on every replica (each has the cache).
type Server struct {
	// Addr is the listen address.
	Addr string
	// TLSConfig has the serving certificate; client certificates are
	// requested and checked by the Authenticator.
	TLSConfig *tls.Config
	Handler   *Handler
	// Delegating, if set, is started first and awaited (up to
	// ReadyTimeout) before serving.
	Delegating   *Delegating
	ReadyTimeout time.Duration
	Log          logr.Logger

	mu   sync.Mutex
	addr net.Addr
}

// NeedLeaderElection is false: every replica answers from its own cache.
func (s *Server) NeedLeaderElection() bool { return false }

// ListenAddr returns the address the server listens on once started.
func (s *Server) ListenAddr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Start serves until ctx ends.
func (s *Server) Start(ctx context.Context) error {
	if d := s.Delegating; d != nil {
		d.Start(ctx)
		wctx, cancel := context.WithTimeout(ctx, cmp.Or(s.ReadyTimeout, 30*time.Second))
		for !d.Ready() && wctx.Err() == nil {
			select {
			case <-wctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
		cancel()
		if !d.Ready() {
			// Serve anyway: requests are refused until the ConfigMap
			// appears, and the operator's other work goes on.
			s.Log.Error(errNotReady, "query API authentication not ready: refusing requests until it is")
		}
	}
	tc := s.TLSConfig.Clone()
	tc.ClientAuth = tls.RequestClientCert
	tc.MinVersion = max(tc.MinVersion, tls.VersionTLS12)
	tc.NextProtos = []string{"http/1.1"} // no HTTP/2 (CVE-2023-44487), as the operator's other servers
	ln, err := tls.Listen("tcp", s.Addr, tc)
	if err != nil {
		return fmt.Errorf("query API: listening on %s: %w", s.Addr, err)
	}
	s.mu.Lock()
	s.addr = ln.Addr()
	s.mu.Unlock()
	srv := &http.Server{
		Handler:           s.Handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       90 * time.Second,
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	s.Log.Info("serving the query API", "address", ln.Addr().String(), "groups", s.Handler.Groups())
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
