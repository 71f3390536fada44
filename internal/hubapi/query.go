package hubapi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/twinscan"
)

// Headers of the query API.
const (
	// HeaderMaxItemCount is the page size a query asks for.
	HeaderMaxItemCount = "x-ms-max-item-count"
	// HeaderContinuation carries the continuation token: in a reply when
	// another page exists (and only then), in a request to get that page.
	HeaderContinuation = "x-ms-continuation"
	// HeaderItemType says what the items are: "twin" for SELECT *, "raw"
	// for projections and aggregates.
	HeaderItemType = "x-ms-item-type"
)

// query serves POST /devices/query: {"query": "SELECT ..."} answered over
// every DeviceTwin in the cache, one page at a time.
//
// Every page runs the query again (the server keeps no cursor), so the
// continuation token says where the next page starts. Where each row
// comes from one twin (SELECT *, projections) it is the position (device
// id, namespace, name) of the last twin returned, so that twins created
// or deleted between pages neither shift nor repeat the others. Rows of
// GROUP BY are groups, with no position of their own: the token holds the
// offset of the next row and a hash of the groups before it, and is
// refused (400) once those groups have changed, rather than skip or
// repeat some. The token is base64url-encoded JSON bound to the query (a
// hash of its canonical text), and is opaque to clients; a token that
// cannot be honoured gets 400 ArgumentInvalid, never a page.
//
// The plan's label selector narrows the twins rendered and evaluated: a
// twin is skipped when its labels do not match the selector and the
// operator has reconciled its current spec (status.observedGeneration ==
// metadata.generation), which is when its labels mirror its tags. A twin
// whose tags just changed is always evaluated, so a query right after a
// tag write finds it even before the operator has mirrored the labels.
// (The cache's List would filter the same way, in memory, without that
// exception.) Field selectors are not used: the cache cannot evaluate
// them, and the full condition is evaluated anyway.
func (h *Handler) query(ctx context.Context, req *request) (reply, *apiError) {
	data, aerr := h.readBody(req)
	if aerr != nil {
		return reply{}, aerr
	}
	var body struct {
		Query *string `json:"query"`
	}
	if err := json.Unmarshal(data, &body); err != nil {
		return reply{}, badRequest(`the request body must be {"query": "SELECT ..."}: ` + err.Error())
	}
	if body.Query == nil || strings.TrimSpace(*body.Query) == "" {
		return reply{}, badRequest(`the request body must be {"query": "SELECT ..."}: the query is missing`)
	}
	size, aerr := pageSize(req.r.Header)
	if aerr != nil {
		return reply{}, aerr
	}
	q, err := query.Parse(*body.Query)
	if err != nil {
		return reply{}, badRequest("the query is invalid: " + err.Error())
	}
	hash := queryHash(q)
	var from *continuation
	if tok := strings.TrimSpace(req.r.Header.Get(HeaderContinuation)); tok != "" {
		_, top := q.Top()
		if from, err = decodeContinuation(tok, hash, q.PerTwin(), top); err != nil {
			return reply{}, badRequest(HeaderContinuation + ": " + err.Error())
		}
	}

	if aerr := h.admitQuery(req); aerr != nil {
		return reply{}, aerr
	}

	start := time.Now()
	p := newPage(size, h.opts.MaxQueryPageBytes)
	next, err := h.runQuery(ctx, q, hash, from, p)
	queryDuration.Observe(time.Since(start).Seconds())
	if errors.Is(err, errStaleContinuation) {
		return reply{}, badRequest(HeaderContinuation + ": " + err.Error())
	}
	if errors.Is(err, errGroupsTooLarge) {
		queriesTooLarge.Inc()
		return reply{}, badRequest(err.Error() + ": narrow the query (WHERE, or GROUP BY a path with fewer values)")
	}
	if err != nil {
		return reply{}, fromAPI("running the query", err)
	}
	if p.cut {
		queryPagesCut.Inc()
	}
	hdr := http.Header{}
	hdr.Set(HeaderItemType, q.ItemType())
	if next != "" {
		hdr.Set(HeaderContinuation, next)
	}
	return reply{status: http.StatusOK, rawBody: p.body(), header: hdr}, nil
}

// admitQuery takes one of the MaxConcurrentQueries query slots until the
// reply is written, or refuses the query with 429 when none is free: the
// pages queries build are what bounds the API's memory.
func (h *Handler) admitQuery(req *request) *apiError {
	select {
	case h.queries <- struct{}{}:
	default:
		queriesThrottled.Inc()
		return &apiError{status: http.StatusTooManyRequests, code: CodeThrottlingException, retryAfter: time.Second,
			msg: fmt.Sprintf("too many queries: this server runs at most %d at once; retry later", cap(h.queries))}
	}
	queriesInFlight.Inc()
	req.release = func() {
		queriesInFlight.Dec()
		<-h.queries
	}
	return nil
}

// page collects the items of one query page, encoded as JSON, up to a
// number of items and of bytes.
type page struct {
	size, maxBytes int
	buf            bytes.Buffer // "[" and the items so far, comma-separated
	item           bytes.Buffer // the item being added
	enc            *json.Encoder
	n              int
	// cut is set when an item did not fit into maxBytes.
	cut bool
}

func newPage(size, maxBytes int) *page {
	p := &page{size: size, maxBytes: maxBytes}
	p.buf.WriteByte('[')
	p.enc = json.NewEncoder(&p.item)
	p.enc.SetEscapeHTML(false) // as writeJSON
	return p
}

// add appends item, unless the page is full: it holds size items, or the
// item would take it past maxBytes (the first item is always taken, so a
// page makes progress however large a twin is).
func (p *page) add(item any) (bool, error) {
	if p.n == p.size {
		return false, nil
	}
	p.item.Reset()
	if err := p.enc.Encode(item); err != nil {
		return false, fmt.Errorf("encoding a query result: %w", err)
	}
	enc := bytes.TrimSuffix(p.item.Bytes(), []byte("\n"))
	if p.n > 0 && p.buf.Len()+1+len(enc)+1 > p.maxBytes {
		p.cut = true
		return false, nil
	}
	if p.n > 0 {
		p.buf.WriteByte(',')
	}
	p.buf.Write(enc)
	p.n++
	return true, nil
}

// body is the page as a JSON array.
func (p *page) body() []byte {
	p.item = bytes.Buffer{}
	return append(p.buf.Bytes(), ']')
}

// pageSize reads x-ms-max-item-count: DefaultPageSize when absent, a whole
// number from 1 up, cut to MaxPageSize.
func pageSize(hdr http.Header) (int, *apiError) {
	v := strings.TrimSpace(hdr.Get(HeaderMaxItemCount))
	if v == "" {
		return DefaultPageSize, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil && errors.Is(err, strconv.ErrRange) && !strings.HasPrefix(v, "-") {
		n, err = MaxPageSize, nil
	}
	if err != nil || n < 1 {
		return 0, badRequest(fmt.Sprintf("%s: %q is not a page size (a whole number from 1, at most %d are returned)",
			HeaderMaxItemCount, v, MaxPageSize))
	}
	return int(min(n, MaxPageSize)), nil
}

// runQuery fills p with one page of the query's result, starting after
// from (nil: the first page), and returns the continuation token of the
// next page, "" when there is none.
//
// A page of a per-twin query without TOP is read from Options.Order when
// set (orderedPage); otherwise, and for TOP, groups and aggregates, the
// twins come from Options.Twins (the cache's own objects, not copies).
// Those the label selector leaves out, those a per-twin page starts after
// and those being deleted are dropped first; the condition is evaluated on
// partial documents (twinscan) on every core; only then is it checked
// that a matching twin holds its device id (Options.Resolve), so a page
// of a large fleet resolves its matches, not every twin.
func (h *Handler) runQuery(ctx context.Context, q *query.Query, hash string, from *continuation, p *page) (string, error) {
	sel := labels.Everything()
	if s := q.Plan().LabelSelector; s != "" {
		var err error
		if sel, err = labels.Parse(s); err != nil {
			sel = labels.Everything() // not expected: the planner writes valid selectors
		}
	}
	// Rows of one twin each: a page is the next matches after the
	// continuation point, each row computed from its twin alone, up to
	// what TOP still allows.
	stream := q.PerTwin()
	var after *twinKey
	left := -1
	if n, top := q.Top(); top {
		left = n
	}
	if stream && from != nil {
		after = from.After
		if from.Left != nil {
			left = *from.Left
		}
	}
	star := q.ItemType() == query.ItemTypeTwin
	paths := q.Paths()
	if star {
		paths = q.WherePaths() // the documents returned are rendered whole
	}
	part := twinscan.NewPartial(paths)
	rows := pageRows{h: h, q: q, hash: hash, part: part, p: p, left: left}
	if stream && h.opts.Order != nil {
		if o, err := h.opts.Order(ctx); err == nil {
			return h.orderedPage(ctx, q, sel, o, (*twinscan.Key)(after), &rows)
		}
	}
	all, err := h.opts.Twins(ctx, h.opts.Namespace)
	if err != nil {
		return "", err
	}
	twins := make([]*v1alpha1.DeviceTwin, 0, len(all))
	for _, t := range all {
		if !t.DeletionTimestamp.IsZero() {
			continue
		}
		if !sel.Matches(labels.Set(t.Labels)) && t.Status.ObservedGeneration == t.Generation {
			continue
		}
		if after != nil && keyOf(t).compare(*after) <= 0 {
			continue
		}
		twins = append(twins, t)
	}
	if stream {
		// Rows are made only for the page's twins.
		return h.streamPage(ctx, twinscan.Matches(q, part, twins, false), &rows)
	}
	return h.groupPage(ctx, q, hash, part, twins, from, p)
}

// groupsChunk is how many devices a query of groups evaluates at a time:
// their partial documents are held for a chunk only (for GROUP BY
// properties, whole documents).
const groupsChunk = 256

// groupBytesPerPage: the groups of a query may hold this many times
// MaxQueryPageBytes (32 MiB by default), and at least minGroupBytes, while
// they are computed.
const (
	groupBytesPerPage = 8
	minGroupBytes     = 1 << 20
)

// maxGroupBytes is what the groups of a query may hold.
func (p *page) maxGroupBytes() int { return max(minGroupBytes, groupBytesPerPage*p.maxBytes) }

// errGroupsTooLarge: the groups of a query hold more than
// page.maxGroupBytes.
var errGroupsTooLarge = errors.New("the query's groups are too large")

// groupPage answers a page of a query of groups (GROUP BY, aggregates):
// the devices are added to the groups a chunk at a time in key order (as
// Run takes them), and the page is the groups after the continuation's.
func (h *Handler) groupPage(ctx context.Context, q *query.Query, hash string, part *twinscan.Partial, twins []*v1alpha1.DeviceTwin,
	from *continuation, p *page) (string, error) {
	slices.SortFunc(twins, func(a, b *v1alpha1.DeviceTwin) int { return keyOf(a).compare(keyOf(b)) })
	a := q.Aggregate()
	docs := make([]map[string]any, 0, groupsChunk)
	for at := 0; at < len(twins); at += groupsChunk {
		docs = docs[:0]
		for _, c := range twinscan.Matches(q, part, twins[at:min(at+groupsChunk, len(twins))], true) {
			if h.holds(ctx, c.Twin) {
				docs = append(docs, c.Doc)
			}
		}
		a.Add(docs)
		if a.Size() > p.maxGroupBytes() {
			return "", fmt.Errorf("%w: they hold more than %d bytes (%d times --service-api-max-query-page-bytes)", errGroupsTooLarge, p.maxGroupBytes(), groupBytesPerPage)
		}
	}
	res := a.Result()
	begin := 0
	if from != nil {
		var err error
		if begin, err = groupStart(from, res.GroupKeys); err != nil {
			return "", err
		}
	}
	end, err := p.addFrom(res.Items, begin)
	if err != nil || end == len(res.Items) {
		return "", err
	}
	return (&continuation{V: continuationVersion, Query: hash, Offset: end, Groups: groupsHash(res.GroupKeys[:end])}).encode(), nil
}

// addFrom adds items from begin until the page is full, and returns where
// it stopped.
func (p *page) addFrom(items []map[string]any, begin int) (int, error) {
	end := begin
	for end < len(items) {
		ok, err := p.add(items[end])
		if err != nil || !ok {
			return end, err
		}
		end++
	}
	return end, nil
}

// streamPage answers one page of a per-twin query (SELECT *, projections)
// when there is no Order, from the matches after the
// continuation point among the twins listed: it takes
// them in key order, sorting only as far as the page goes (inOrder), and
// renders a row for each device among them until the page is full and one
// more shows that another page exists (or the page has no room for it).
// A page deep into a large fleet so costs a scan of the fleet, not a sort
// of it and a rendering of every twin.
func (h *Handler) streamPage(ctx context.Context, cands []twinscan.Match, rows *pageRows) (string, error) {
	for c := range inOrder(cands, compareMatches, 2*rows.p.size+16) {
		if next, full, err := rows.add(ctx, c); full || err != nil {
			return next, err
		}
	}
	return "", nil
}

// pageRows fills a page of a per-twin query with the rows of matches
// given in the result's order.
type pageRows struct {
	h    *Handler
	q    *query.Query
	hash string
	part *twinscan.Partial
	p    *page
	last twinKey // the twin of the page's last row
	// left is how many rows TOP still allows (-1: no TOP).
	left int
}

// add puts the row of c on the page if c's twin holds its device id. When
// the page has no room for it, it returns full and the continuation token
// of the next page, which starts after the page's last row.
func (r *pageRows) add(ctx context.Context, c twinscan.Match) (next string, full bool, err error) {
	if r.left == 0 {
		return "", true, nil // TOP's rows are all sent: the last page
	}
	if !r.h.holds(ctx, c.Twin) {
		return "", false, nil
	}
	var item any
	if r.q.ItemType() == query.ItemTypeTwin {
		item = hubtwin.FromDeviceTwin(c.Twin)
	} else {
		res, err := r.q.Run([]map[string]any{r.part.Doc(c.Twin)})
		if err != nil {
			return "", false, err
		}
		if len(res.Items) != 1 {
			return "", false, fmt.Errorf("the row of device %q: %d rows from its twin, want 1", c.DeviceID, len(res.Items))
		}
		item = res.Items[0]
	}
	ok, err := r.p.add(item)
	if err != nil {
		return "", false, err
	}
	if !ok {
		next := &continuation{V: continuationVersion, Query: r.hash, After: &r.last}
		if r.left > 0 {
			next.Left = &r.left
		}
		return next.encode(), true, nil
	}
	r.last = matchKey(c)
	if r.left > 0 {
		r.left--
	}
	return "", false, nil
}

// maxOrderBatch bounds the twins orderedPage takes from the Order at once
// (and so how long it holds the Order's lock).
const maxOrderBatch = 16384

// orderedPage answers one page of a per-twin query (SELECT *, projections)
// from o, the twins in the result's order: it walks them
// from the continuation point (after; nil: the start) a batch at a time,
// the first twice a page, each next one four times larger; drops
// those the label selector leaves out and those being deleted; evaluates
// the condition on the batch on every core; and renders a row for each
// device among the matches until the page is full and one more shows that
// another page exists. A page so costs its own twins (with a condition,
// the twins between its matches), not a pass over the namespace.
func (h *Handler) orderedPage(ctx context.Context, q *query.Query, sel labels.Selector, o *twinscan.Order, after *twinscan.Key,
	rows *pageRows) (string, error) {
	batch := 2*rows.p.size + 16
	var entries []twinscan.Entry
	var twins []*v1alpha1.DeviceTwin
	for {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		entries = o.After(after, batch, entries[:0])
		twins = twins[:0]
		for _, e := range entries {
			t := e.Twin
			if !t.DeletionTimestamp.IsZero() {
				continue
			}
			if !sel.Matches(labels.Set(t.Labels)) && t.Status.ObservedGeneration == t.Generation {
				continue
			}
			twins = append(twins, t)
		}
		for _, c := range twinscan.Matches(q, rows.part, twins, false) {
			if next, full, err := rows.add(ctx, c); full || err != nil {
				return next, err
			}
		}
		if len(entries) < batch {
			return "", nil
		}
		k := entries[len(entries)-1].Key
		after = &k
		batch = min(4*batch, maxOrderBatch)
	}
}

// holds reports whether t holds its device id (Options.Resolve): a twin
// that wants an id another twin holds (refused, or stalled as a duplicate
// by the operator) is not a device.
func (h *Handler) holds(ctx context.Context, t *v1alpha1.DeviceTwin) bool {
	if !t.DeletionTimestamp.IsZero() {
		return false
	}
	holder, err := h.opts.Resolve(ctx, t.EffectiveDeviceID())
	return err == nil && holder != nil && holder.UID == t.UID
}

// groupStart returns the index of the first row of a page of groups:
// rows of groups have no key of their own, so the token holds their
// offset, valid only while the groups before it are the same ones. (A
// query without GROUP BY has no keys: any token of it is stale.)
func groupStart(from *continuation, keys []string) (int, error) {
	if from.Offset > len(keys) || groupsHash(keys[:from.Offset]) != from.Groups {
		return 0, errStaleContinuation
	}
	return from.Offset, nil
}

// errStaleContinuation: a GROUP BY token whose groups have changed since
// the page that issued it. Going on would skip or repeat groups.
var errStaleContinuation = errors.New("the groups of this query have changed since the previous page " +
	"(a twin joined, left or changed group): run the query again from the first page")

// groupsHash identifies a sequence of group keys.
func groupsHash(keys []string) string {
	h := sha256.New()
	for _, k := range keys {
		// Length-prefixed, so that no two sequences write the same bytes.
		h.Write(strconv.AppendInt(nil, int64(len(k)), 10))
		h.Write([]byte{':'})
		h.Write([]byte(k))
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// twinKey is the position of a twin in a query's result.
type twinKey struct {
	ID        string `json:"d"`
	Namespace string `json:"s"`
	Name      string `json:"n"`
}

func (k twinKey) compare(o twinKey) int { return twinscan.Key(k).Compare(twinscan.Key(o)) }

// keyOf is t's position in a query's result.
func keyOf(t *v1alpha1.DeviceTwin) twinKey { return twinKey(twinscan.KeyOf(t)) }

func matchKey(m twinscan.Match) twinKey {
	return twinKey{ID: m.DeviceID, Namespace: m.Twin.Namespace, Name: m.Twin.Name}
}

func compareMatches(a, b twinscan.Match) int { return matchKey(a).compare(matchKey(b)) }

// continuationVersion is the format version of continuation tokens.
// Version 1 used offsets for projections, which skip or repeat rows when
// twins come and go between pages; its tokens are refused.
const continuationVersion = 2

// continuation is the content of a continuation token.
type continuation struct {
	V int `json:"v"`
	// Query is the hash of the query the token belongs to.
	Query string `json:"q"`
	// After is the position of the last twin returned, for results with a
	// row per twin (SELECT *, projections).
	After *twinKey `json:"a,omitempty"`
	// Left is how many rows TOP still allows after After, for a query
	// with TOP.
	Left *int `json:"l,omitempty"`
	// Offset is the index of the next row, for rows of groups (GROUP BY).
	Offset int `json:"o,omitempty"`
	// Groups is the groupsHash of the rows before Offset.
	Groups string `json:"g,omitempty"`
}

func (c *continuation) encode() string {
	b, _ := json.Marshal(c)
	return base64.RawURLEncoding.EncodeToString(b)
}

// errNotOurToken: a token that is malformed, of another query or of
// another version.
var errNotOurToken = errors.New("not a continuation token of this query: " +
	"send back the token of the previous page's reply with the same query")

// decodeContinuation parses a token and checks that it belongs to the
// query (its hash) and has the query's kind of position.
func decodeContinuation(tok, hash string, perTwin, top bool) (*continuation, error) {
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(tok, "="))
	if err != nil {
		return nil, errNotOurToken
	}
	var c continuation
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil || dec.More() || c.V != continuationVersion || c.Query != hash {
		return nil, errNotOurToken
	}
	if perTwin {
		if c.After == nil || c.Offset != 0 || c.Groups != "" || top != (c.Left != nil) || c.Left != nil && *c.Left <= 0 {
			return nil, errNotOurToken
		}
	} else if c.After != nil || c.Left != nil || c.Offset <= 0 || c.Groups == "" {
		return nil, errNotOurToken
	}
	return &c, nil
}

// queryHash identifies a query by its canonical text.
func queryHash(q *query.Query) string {
	sum := sha256.Sum256([]byte(q.String()))
	return hex.EncodeToString(sum[:8])
}
