package hubapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/ratelog"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/internal/twinscan"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// The service API creates, patches and deletes DeviceTwins, reads the
// shared access policies Secret and writes device key Secrets.
//
// +kubebuilder:rbac:groups=kubetwin.io,resources=devicetwins,verbs=get;list;watch;create;patch;delete
// +kubebuilder:rbac:groups="",resources=secrets,verbs=get;list;watch;create;update

// FieldManager is the field manager of every write the service API makes.
const FieldManager = "kubetwin-service-api"

// Defaults and limits of the API.
const (
	// DefaultPolicyTTL is how long the shared access policies are used
	// before the Secret is read again.
	DefaultPolicyTTL = 5 * time.Second
	// DefaultPolicyReadTimeout bounds one read of the policies Secret.
	DefaultPolicyReadTimeout = 5 * time.Second
	// DefaultMaxConcurrentQueries is how many queries a replica runs at
	// once; more get 429 ThrottlingException.
	DefaultMaxConcurrentQueries = 8
	// DefaultMaxQueryPageBytes bounds the encoded items of one query page:
	// a page that would grow past it ends early, with a continuation token.
	DefaultMaxQueryPageBytes = 4 << 20
	// DefaultCacheWait bounds how long a write waits for the manager's
	// cache to show it before replying.
	DefaultCacheWait = 2 * time.Second
	// DefaultMaxBodyBytes caps request bodies: a twin's tags and desired
	// properties are at most 40 KB, so 256 KiB leaves room for escaping
	// and formatting.
	DefaultMaxBodyBytes = 256 << 10
	// DefaultPageSize is the page size of a query without
	// x-ms-max-item-count, as in IoT Hub.
	DefaultPageSize = 100
	// MaxPageSize is the largest page of a query; a larger
	// x-ms-max-item-count is cut to it.
	MaxPageSize = 1000
	// MaxListDevices is the most devices GET /devices returns (IoT Hub's
	// cap too); the first ones in device id order. Use a query to page
	// through more.
	MaxListDevices = 1000
	// DefaultMaxTokenLifetime is the default of Options.MaxTokenLifetime:
	// 8760h, a year (--max-sas-token-lifetime).
	DefaultMaxTokenLifetime = sas.DefaultMaxLifetime
	// requestTimeout bounds the work of one request.
	requestTimeout = 30 * time.Second
)

// ContentTypeJSON is the Content-Type of every JSON reply.
const ContentTypeJSON = "application/json; charset=utf-8"

// Options configures a [Handler].
type Options struct {
	// Client writes DeviceTwins and Secrets; the manager's client will do
	// (its writes go to the API server).
	Client client.Client
	// Reader reads DeviceTwins and device-key Secrets: the manager's cache
	// (mgr.GetClient() or mgr.GetCache()). The handler reads only
	// Namespace through it; queries and the device list list the
	// DeviceTwins there through it too, unless Twins is set.
	Reader client.Reader
	// Twins lists the DeviceTwins of a namespace for queries and the
	// device list: the cache's own objects, which the handler only reads
	// (twinscan.CacheLister of the manager's cache). Nil: they are listed
	// through Reader.
	Twins twinscan.Lister
	// Order, when set, gives the DeviceTwins of Namespace in the order of
	// a query's result (twinscan.CacheOrder of the manager's cache): a
	// page of SELECT * or of a projection without TOP then starts where
	// the previous page ended instead of passing over every twin. Without
	// it, or when it fails, such pages are read from Twins too.
	Order func(context.Context) (*twinscan.Order, error)
	// APIReader reads from the API server itself (mgr.GetAPIReader()): the
	// shared access policies Secret, and a twin when the cached copy is
	// older than the etag a client sent.
	APIReader client.Reader
	// Resolve returns the DeviceTwin that holds a device id, in any
	// namespace, from the manager's cache. It returns an error matching
	// deviceid.ErrNotFound (or a NotFound API error) when no twin has the
	// id. The handler does not modify the twin it returns, and serves it
	// only when it is in Namespace.
	Resolve func(ctx context.Context, deviceID string) (*v1alpha1.DeviceTwin, error)
	// Namespace is the one namespace the API serves (--registry-namespace):
	// every read and write, with every policy, acts only on DeviceTwins
	// there, and devices created through the API get their DeviceTwin and
	// key Secret there. A device whose twin is elsewhere is DeviceNotFound.
	Namespace string
	// HubHostname is the hub host name: the resource (sr) of service
	// tokens, and the HostName of connection strings.
	HubHostname string
	// PolicySecret names the Secret of the shared access policies (see
	// EnsurePolicies).
	PolicySecret types.NamespacedName
	// PolicyTTL is how long the policies are used before the Secret is read
	// again (DefaultPolicyTTL). A token that does not verify makes the
	// handler read it again at once, at most once a second.
	PolicyTTL time.Duration
	// PolicyReadTimeout bounds one read of the policies Secret
	// (DefaultPolicyReadTimeout). Requests do not wait for a read while
	// a copy exists (see policyStore).
	PolicyReadTimeout time.Duration
	// MaxConcurrentQueries is how many queries run at once, from reading
	// the body to sending the page (DefaultMaxConcurrentQueries); another
	// gets 429 ThrottlingException with Retry-After.
	MaxConcurrentQueries int
	// MaxQueryPageBytes bounds the encoded items of one query page
	// (DefaultMaxQueryPageBytes): the page ends early, with a continuation
	// token, rather than grow past it. A page always holds at least one
	// item.
	MaxQueryPageBytes int
	// CacheWait bounds how long a write waits for Reader to show it before
	// replying, so the client then reads its own write (DefaultCacheWait;
	// negative: no wait).
	CacheWait time.Duration
	// AwaitReconcile, when positive, makes a write of tags or desired
	// properties also wait (up to this long) for the operator to have
	// reconciled the new spec (status.observedGeneration), and reply with
	// that copy. The operator's own follow-up writes (labels mirrored from
	// tags, status) change the resourceVersion and so the etag; replying
	// after them gives the client an etag that stays valid for its next
	// write, and a query right after sees the mirrored labels. Set it when
	// the DeviceTwin controller runs with the handler; leave it zero
	// otherwise (it would always wait in vain).
	AwaitReconcile time.Duration
	// MaxBodyBytes caps request bodies (DefaultMaxBodyBytes).
	MaxBodyBytes int64
	// MaxTokenLifetime refuses a token whose expiry (se) is further than
	// this from now (--max-sas-token-lifetime): a leaked token must not be
	// good for a century. Zero: DefaultMaxTokenLifetime; negative: no
	// bound.
	MaxTokenLifetime time.Duration
	// LogLimiter bounds the lines that clients can cause (refused
	// requests); ratelog.DefaultRate per second and kind if nil.
	LogLimiter *ratelog.Limiter
	// Logger receives one line per refused or failed request (V(0)) and
	// per served request (V(1)). Keys and tokens are never logged.
	Logger logr.Logger
	// Now is the clock (tests may replace it); time.Now by default.
	Now func() time.Time
}

// Handler serves the IoT Hub service API (see the package documentation).
// It is safe for concurrent use.
type Handler struct {
	opts     Options
	policies *policyStore
	log      logr.Logger
	// rlog logs what clients can cause, rate-limited.
	rlog ratelog.Logger
	// queries holds a token per query running.
	queries chan struct{}
}

var _ http.Handler = (*Handler)(nil)

// NewHandler returns a Handler. Client, Reader, APIReader, Resolve,
// Namespace, HubHostname and PolicySecret are required.
func NewHandler(o Options) (*Handler, error) {
	var missing []string
	for _, f := range []struct {
		name string
		ok   bool
	}{
		{"Client", o.Client != nil}, {"Reader", o.Reader != nil}, {"APIReader", o.APIReader != nil},
		{"Resolve", o.Resolve != nil}, {"Namespace", o.Namespace != ""}, {"HubHostname", o.HubHostname != ""},
		{"PolicySecret", o.PolicySecret.Name != "" && o.PolicySecret.Namespace != ""},
	} {
		if !f.ok {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("hubapi: options missing: %s", strings.Join(missing, ", "))
	}
	if o.PolicyTTL <= 0 {
		o.PolicyTTL = DefaultPolicyTTL
	}
	if o.PolicyReadTimeout <= 0 {
		o.PolicyReadTimeout = DefaultPolicyReadTimeout
	}
	if o.MaxConcurrentQueries <= 0 {
		o.MaxConcurrentQueries = DefaultMaxConcurrentQueries
	}
	if o.MaxQueryPageBytes <= 0 {
		o.MaxQueryPageBytes = DefaultMaxQueryPageBytes
	}
	if o.CacheWait == 0 {
		o.CacheWait = DefaultCacheWait
	}
	if o.MaxBodyBytes <= 0 {
		o.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if o.MaxTokenLifetime == 0 {
		o.MaxTokenLifetime = DefaultMaxTokenLifetime
	}
	if o.LogLimiter == nil {
		o.LogLimiter = ratelog.New(ratelog.DefaultRate)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger.GetSink() == nil {
		o.Logger = logr.Discard()
	}
	// Every read of twins and key Secrets goes through the served
	// namespace: nothing outside it can be listed, read or found.
	o.Reader = namespaceReader{Reader: o.Reader, ns: o.Namespace}
	if o.Twins == nil {
		o.Twins = twinscan.ReaderLister(o.Reader)
	}
	h := &Handler{opts: o, log: o.Logger, rlog: ratelog.NewLogger(o.Logger, o.LogLimiter),
		queries: make(chan struct{}, o.MaxConcurrentQueries)}
	h.policies = &policyStore{reader: o.APIReader, key: o.PolicySecret, ttl: o.PolicyTTL, timeout: o.PolicyReadTimeout,
		log: o.Logger, now: o.Now}
	return h, nil
}

func (h *Handler) now() time.Time { return h.opts.Now() }

// request is one request being served.
type request struct {
	w  http.ResponseWriter
	r  *http.Request
	op *operation
	// deviceID is the decoded device id of the path, when it has one.
	deviceID string
	// policy is the name of the policy that signed the token, once checked.
	policy string
	// release, when set, runs once the reply is written (it frees the
	// query slot the request holds).
	release func()
}

// reply is a successful answer.
type reply struct {
	status int
	// body is encoded as JSON; nil sends no body.
	body any
	// rawBody, when set, is sent as the JSON body as it is.
	rawBody []byte
	header  http.Header
}

// handlerFunc serves one operation.
type handlerFunc func(ctx context.Context, req *request) (reply, *apiError)

// ServeHTTP routes the request, checks its token and the right the
// operation needs, serves it and writes the reply or IoT Hub error.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(r.Context(), requestTimeout)
	defer cancel()
	req := &request{w: w, r: r, op: opUnknown}
	rep, aerr := h.serve(ctx, req)
	status := h.write(req, rep, aerr)
	if req.release != nil {
		req.release()
	}
	requestsTotal.WithLabelValues(req.op.name, strconv.Itoa(status)).Inc()
	requestDuration.WithLabelValues(req.op.name).Observe(time.Since(start).Seconds())
}

func (h *Handler) serve(ctx context.Context, req *request) (reply, *apiError) {
	op, fn, rawID, routeErr := h.route(req.r)
	req.op = op
	cred, aerr := h.authenticate(ctx, req.r)
	if aerr != nil {
		return reply{}, aerr
	}
	req.policy = cred.policy.name
	if routeErr != nil {
		return reply{}, routeErr
	}
	id := ""
	if rawID != "" {
		var err error
		if id, err = url.PathUnescape(rawID); err != nil {
			return reply{}, badRequest("the device id in the path is not properly URL-encoded")
		}
	}
	if aerr := checkScope(cred, op, id); aerr != nil {
		return reply{}, aerr
	}
	if aerr := authorize(cred.policy, op); aerr != nil {
		return reply{}, aerr
	}
	if rawID != "" {
		if err := twin.ValidateDeviceID("deviceId", id); err != nil {
			return reply{}, badRequest(err.Error())
		}
		req.deviceID = id
	}
	return fn(ctx, req)
}

// route returns the operation a request asks for, its handler and the
// escaped device id segment of its path ("" for none), or a 404 or 405.
// The path is split in its escaped form, so that an encoded '/', '?' or
// '#' in a device id stays inside its segment.
func (h *Handler) route(r *http.Request) (*operation, handlerFunc, string, *apiError) {
	segs := strings.Split(strings.TrimPrefix(r.URL.EscapedPath(), "/"), "/")
	is := func(i int, name string) bool { return len(segs) > i && strings.EqualFold(segs[i], name) }
	notAllowed := func(allow string) *apiError {
		e := errorf(http.StatusMethodNotAllowed, CodeMethodNotAllowed,
			fmt.Sprintf("%s is not supported on %s (allowed: %s)", r.Method, r.URL.EscapedPath(), allow))
		e.allow = allow
		return e
	}
	switch {
	case is(0, "twins") && len(segs) == 2 && segs[1] != "":
		switch r.Method {
		case http.MethodGet:
			return opTwinGet, h.getTwin, segs[1], nil
		case http.MethodPatch:
			return opTwinUpdate, h.patchTwin, segs[1], nil
		case http.MethodPut:
			return opTwinReplace, h.replaceTwin, segs[1], nil
		}
		return opUnknown, nil, "", notAllowed("GET, PATCH, PUT")
	case is(0, "devices") && (len(segs) == 1 || len(segs) == 2 && segs[1] == ""):
		if r.Method == http.MethodGet {
			return opDeviceList, h.listDevices, "", nil
		}
		return opUnknown, nil, "", notAllowed("GET")
	case is(0, "devices") && is(1, "query") && len(segs) == 2 && r.Method == http.MethodPost:
		return opQuery, h.query, "", nil
	case is(0, "configurations"):
		return h.routeConfigurations(r, segs)
	case is(0, "devices") && len(segs) == 3 && is(2, "applyConfigurationContent"):
		if r.Method == http.MethodPost {
			return opApplyConfigurationContent, h.applyConfigurationContent, segs[1], nil
		}
		return opUnknown, nil, "", notAllowed("POST")
	case is(0, "devices") && len(segs) == 2:
		switch r.Method {
		case http.MethodGet:
			return opDeviceGet, h.getDevice, segs[1], nil
		case http.MethodPut:
			// The SDKs create without If-Match and update with one.
			if r.Header.Get("If-Match") == "" {
				return opDeviceCreate, h.createDevice, segs[1], nil
			}
			return opDeviceUpdate, h.updateDevice, segs[1], nil
		case http.MethodDelete:
			return opDeviceDelete, h.deleteDevice, segs[1], nil
		}
		return opUnknown, nil, "", notAllowed("GET, PUT, DELETE")
	}
	return opUnknown, nil, "", errorf(http.StatusNotFound, CodeNotFound,
		fmt.Sprintf("there is no API at %s %s", r.Method, r.URL.EscapedPath()))
}

// readBody reads the request body, at most Options.MaxBodyBytes of it.
func (h *Handler) readBody(req *request) ([]byte, *apiError) {
	limit := h.opts.MaxBodyBytes
	tooLarge := errorf(http.StatusRequestEntityTooLarge, CodeMessageTooLarge,
		fmt.Sprintf("the request body is larger than the %d bytes allowed", limit))
	if req.r.ContentLength > limit {
		return nil, tooLarge
	}
	data, err := io.ReadAll(http.MaxBytesReader(req.w, req.r.Body, limit))
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		return nil, tooLarge
	case err != nil:
		return nil, &apiError{status: http.StatusBadRequest, code: CodeArgumentInvalid,
			msg: "reading the request body failed", cause: err}
	case len(bytes.TrimSpace(data)) == 0:
		return nil, badRequest("the request body is empty: a JSON object is required")
	}
	return data, nil
}

// write sends the reply or the error and returns the status code sent.
// Errors are logged with a tracking id that the reply carries too.
func (h *Handler) write(req *request, rep reply, aerr *apiError) int {
	w := req.w
	if aerr == nil {
		for k, v := range rep.header {
			w.Header()[k] = v
		}
		switch {
		case rep.rawBody != nil:
			writeRawJSON(w, rep.status, rep.rawBody)
		case rep.body == nil:
			w.WriteHeader(rep.status)
		default:
			writeJSON(w, rep.status, rep.body)
		}
		if log := h.log.V(1); log.Enabled() {
			log.Info("service API request served", h.logValues(req, rep.status)...)
		}
		return rep.status
	}
	tracking := newTrackingID()
	if aerr.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(aerr.retryAfter.Seconds()))))
	}
	if aerr.allow != "" {
		w.Header().Set("Allow", aerr.allow)
	}
	writeJSON(w, aerr.status, newErrorBody(aerr.code, aerr.msg, tracking, h.now()))
	reason := aerr.msg
	if aerr.logMsg != "" {
		reason = aerr.logMsg
	}
	kv := append(h.logValues(req, aerr.status), "code", aerr.code, "reason", reason, "trackingId", tracking)
	switch {
	case aerr.status >= http.StatusInternalServerError:
		h.log.Error(aerr.cause, "service API request failed", kv...)
	case aerr.status == http.StatusUnauthorized:
		unauthorizedTotal.WithLabelValues(aerr.reason).Inc()
		h.rlog.Info("service API request unauthorized", append(kv, "unauthorizedReason", aerr.reason)...)
	default:
		if aerr.cause != nil {
			kv = append(kv, "error", aerr.cause.Error())
		}
		h.rlog.Info("service API request refused", kv...)
	}
	return aerr.status
}

// logValues are the key/value pairs that describe a request in the log.
func (h *Handler) logValues(req *request, status int) []any {
	kv := []any{"operation", req.op.name, "method", req.r.Method, "status", status, "remote", req.r.RemoteAddr}
	if req.deviceID != "" {
		kv = append(kv, "deviceId", req.deviceID)
	}
	if req.policy != "" {
		kv = append(kv, "policy", req.policy)
	}
	if id := req.r.Header.Get("Request-Id"); id != "" {
		kv = append(kv, "requestId", id)
	}
	return kv
}

// writeJSON writes v as the JSON body of a reply with the given status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		// Not expected: every body is made of JSON-ready values.
		status = http.StatusInternalServerError
		buf.Reset()
		_ = json.NewEncoder(&buf).Encode(newErrorBody(CodeServerError, "encoding the reply failed", newTrackingID(), time.Now()))
	}
	writeRawJSON(w, status, buf.Bytes())
}

// writeRawJSON writes body, encoded JSON, as a reply with the given status.
func writeRawJSON(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", ContentTypeJSON)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// namespaceReader reads only objects in one namespace: a Get elsewhere is
// NotFound, and a List lists that namespace only.
type namespaceReader struct {
	client.Reader
	ns string
}

func (r namespaceReader) Get(ctx context.Context, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
	if key.Namespace != r.ns {
		return apierrors.NewNotFound(schema.GroupResource{}, key.Name)
	}
	return r.Reader.Get(ctx, key, obj, opts...)
}

func (r namespaceReader) List(ctx context.Context, list client.ObjectList, opts ...client.ListOption) error {
	// Last, so it overrides any namespace in opts.
	return r.Reader.List(ctx, list, append(opts, client.InNamespace(r.ns))...)
}
