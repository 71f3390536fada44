package hubapi

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// The service API reads and writes TwinConfigurations (IoT Hub's
// configurations) in the served namespace.
//
// +kubebuilder:rbac:groups=kubetwin.io,resources=twinconfigurations,verbs=get;list;watch;create;patch;delete

// Configurations REST (IoT Hub's automatic device configurations), mapped
// onto the TwinConfigurations of the served namespace:
//
//	PUT    /configurations/{id}      create (no If-Match) or update (If-Match: etag or *)
//	GET    /configurations/{id}      one configuration
//	GET    /configurations?top=n     the configurations, by id, at most MaxListConfigurations
//	DELETE /configurations/{id}      delete (If-Match: etag or *, or none)
//	POST   /configurations/testQueries          check a target condition and metric queries
//	POST   /devices/{id}/applyConfigurationContent  merge deviceContent into one twin's desired properties
//
// A configuration's id is its TwinConfiguration's name, so it must be a
// DNS subdomain of at most 63 characters (it is also the name part of the
// twins' label configurations.kubetwin.io/<id>). Unlike IoT Hub's, the
// content may change after creation; the operator then replaces what the
// configuration set in its twins.
//
// Reads and writes go to the API server (Options.APIReader and Client),
// not the cache: configurations are few and change rarely, and a client
// reads its own write at once.

// Defaults and limits of the configurations API.
const (
	// MaxListConfigurations is the most configurations GET /configurations
	// returns, the first ones by id.
	MaxListConfigurations = 1000
	// configurationSchemaVersion is the only schemaVersion IoT Hub has.
	configurationSchemaVersion = "1.0"
	// desiredPrefix starts every key of deviceContent.
	desiredPrefix = "properties.desired."
)

// Error codes of the configurations API.
const (
	// CodeConfigurationNotFound (404): no configuration has the id.
	CodeConfigurationNotFound = "ConfigurationNotFound"
	// CodeConfigurationAlreadyExists (409): PUT without If-Match of an id
	// that exists (or is still being deleted).
	CodeConfigurationAlreadyExists = "ConfigurationAlreadyExists"
)

// Operations of the configurations API. They reach the whole fleet, so
// only hub-wide tokens may run them, as queries.
var (
	opConfigurationGet    = &operation{"configurationGet", []Right{RegistryRead}, "read configurations", scopeNone}
	opConfigurationList   = &operation{"configurationList", []Right{RegistryRead}, "read configurations", scopeNone}
	opConfigurationPut    = &operation{"configurationPut", []Right{RegistryWrite}, "write configurations", scopeNone}
	opConfigurationDelete = &operation{"configurationDelete", []Right{RegistryWrite}, "write configurations", scopeNone}
	opConfigurationTest   = &operation{"configurationTestQueries", []Right{RegistryRead, ServiceConnect},
		"test configuration queries", scopeNone}
	opApplyConfigurationContent = &operation{"applyConfigurationContent", []Right{RegistryWrite},
		"apply configuration content", scopeNone}
)

// routeConfigurations routes /configurations[/...]; segs is the escaped
// path split at '/'.
func (h *Handler) routeConfigurations(r *http.Request, segs []string) (*operation, handlerFunc, string, *apiError) {
	switch {
	case len(segs) == 1 || len(segs) == 2 && segs[1] == "":
		if r.Method == http.MethodGet {
			return opConfigurationList, h.listConfigurations, "", nil
		}
		return opUnknown, nil, "", methodNotAllowed(r, "GET")
	case len(segs) == 2 && strings.EqualFold(segs[1], "testQueries"):
		if r.Method == http.MethodPost {
			return opConfigurationTest, h.testConfigurationQueries, "", nil
		}
		return opUnknown, nil, "", methodNotAllowed(r, "POST")
	case len(segs) == 2:
		switch r.Method {
		case http.MethodGet:
			return opConfigurationGet, h.getConfiguration, "", nil
		case http.MethodPut:
			return opConfigurationPut, h.putConfiguration, "", nil
		case http.MethodDelete:
			return opConfigurationDelete, h.deleteConfiguration, "", nil
		}
		return opUnknown, nil, "", methodNotAllowed(r, "GET, PUT, DELETE")
	}
	return opUnknown, nil, "", errorf(http.StatusNotFound, CodeNotFound,
		fmt.Sprintf("there is no API at %s %s", r.Method, r.URL.EscapedPath()))
}

func methodNotAllowed(r *http.Request, allow string) *apiError {
	e := errorf(http.StatusMethodNotAllowed, CodeMethodNotAllowed,
		fmt.Sprintf("%s is not supported on %s (allowed: %s)", r.Method, r.URL.EscapedPath(), allow))
	e.allow = allow
	return e
}

// configurationID returns the id of /configurations/{id}, checked.
func configurationID(r *http.Request) (string, *apiError) {
	segs := strings.Split(strings.TrimPrefix(r.URL.EscapedPath(), "/"), "/")
	id, err := url.PathUnescape(segs[1])
	if err != nil {
		return "", badRequest("the configuration id in the path is not properly URL-encoded")
	}
	return id, checkConfigurationID("id", id)
}

// checkConfigurationID checks that id can name a TwinConfiguration and its
// twins' label.
func checkConfigurationID(field, id string) *apiError {
	if len(id) <= 63 && len(validation.IsDNS1123Subdomain(id)) == 0 &&
		len(validation.IsQualifiedName(v1alpha1.ConfigurationsLabelPrefix+id)) == 0 {
		return nil
	}
	return badRequest(fmt.Sprintf("%s: %q is not a valid configuration id: use at most 63 lower-case letters, digits, "+
		"'-' and '.', starting and ending with a letter or digit (it names the TwinConfiguration and the twins' label %s<id>)",
		field, id, v1alpha1.ConfigurationsLabelPrefix))
}

func configurationNotFound(id string) *apiError {
	return errorf(http.StatusNotFound, CodeConfigurationNotFound, "configuration "+strconv.Quote(id)+" does not exist")
}

// configurationJSON is IoT Hub's configuration document.
type configurationJSON struct {
	ID                 string               `json:"id"`
	SchemaVersion      string               `json:"schemaVersion"`
	Labels             map[string]string    `json:"labels"`
	Content            configurationContent `json:"content"`
	ContentType        string               `json:"contentType"`
	TargetCondition    string               `json:"targetCondition"`
	CreatedTimeUtc     string               `json:"createdTimeUtc"`
	LastUpdatedTimeUtc string               `json:"lastUpdatedTimeUtc"`
	Priority           int32                `json:"priority"`
	SystemMetrics      configurationMetrics `json:"systemMetrics"`
	Metrics            configurationMetrics `json:"metrics"`
	ETag               string               `json:"etag"`
}

type configurationContent struct {
	DeviceContent  map[string]any `json:"deviceContent"`
	ModulesContent map[string]any `json:"modulesContent"`
	ModuleContent  map[string]any `json:"moduleContent"`
}

type configurationMetrics struct {
	Results map[string]int32  `json:"results"`
	Queries map[string]string `json:"queries"`
}

// renderConfiguration returns the IoT Hub document of c.
func renderConfiguration(c *v1alpha1.TwinConfiguration) configurationJSON {
	labels := map[string]string{}
	for k, v := range c.Labels {
		labels[k] = v
	}
	content := map[string]any{}
	if d, err := twin.DecodeRaw(rawJSON(c.Spec.Content.Desired)); err == nil {
		// One key per top-level desired property: the same content as any
		// deeper split of it.
		for k, v := range d {
			content[desiredPrefix+k] = v
		}
	}
	created := c.CreationTimestamp.UTC()
	updated := created
	for _, mf := range c.ManagedFields {
		if mf.Subresource == "" && mf.Time != nil && mf.Time.After(updated) {
			updated = mf.Time.UTC()
		}
	}
	sys := configurationMetrics{
		Results: map[string]int32{
			"targetedCount": c.Status.TargetedCount,
			"appliedCount":  c.Status.AppliedCount,
			"inSyncCount":   c.Status.InSyncCount,
		},
		Queries: map[string]string{
			"appliedCount": "SELECT deviceId FROM devices WHERE configurations.[[" + c.Name + "]].status = 'Applied'",
		},
	}
	if tc := c.Spec.TargetCondition; tc != "" {
		if strings.TrimSpace(tc) == "*" {
			sys.Queries["targetedCount"] = "SELECT deviceId FROM devices"
		} else {
			sys.Queries["targetedCount"] = "SELECT deviceId FROM devices WHERE " + tc
		}
	}
	metrics := configurationMetrics{Results: map[string]int32{}, Queries: map[string]string{}}
	for _, m := range c.Spec.Metrics {
		metrics.Queries[m.Name] = m.Query
	}
	for _, m := range c.Status.Metrics {
		metrics.Results[m.Name] = m.Count
	}
	return configurationJSON{
		ID:                 c.Name,
		SchemaVersion:      configurationSchemaVersion,
		Labels:             labels,
		Content:            configurationContent{DeviceContent: content, ModulesContent: map[string]any{}, ModuleContent: map[string]any{}},
		ContentType:        "assignment",
		TargetCondition:    c.Spec.TargetCondition,
		CreatedTimeUtc:     created.Format(twin.TimeFormat),
		LastUpdatedTimeUtc: updated.Format(twin.TimeFormat),
		Priority:           c.Spec.Priority,
		SystemMetrics:      sys,
		Metrics:            metrics,
		ETag:               configurationETag(c),
	}
}

// configurationETag is the etag of what the configuration document lets a
// client change (its spec, through metadata.generation, and its labels):
// status updates, which the operator makes all the time, leave it alone,
// so a client's etag stays good while the rollout progresses.
func configurationETag(c *v1alpha1.TwinConfiguration) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%d", c.UID, c.Generation)
	keys := make([]string, 0, len(c.Labels))
	for k := range c.Labels {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(h, "\x00%s=%s", k, c.Labels[k])
	}
	return base64.StdEncoding.EncodeToString(h.Sum(nil)[:12])
}

// ifMatch reads If-Match: "" when absent, "*", or the etag unquoted.
func ifMatch(r *http.Request) string {
	v := strings.TrimPrefix(strings.TrimSpace(r.Header.Get("If-Match")), "W/")
	if v == "*" {
		return v
	}
	return strings.Trim(v, `"`)
}

// configurationWrite is what a PUT body asks for.
type configurationWrite struct {
	labels map[string]string
	spec   v1alpha1.TwinConfigurationSpec
	// noTarget: the body has no targetCondition (an update then keeps a
	// label selector set through Kubernetes).
	noTarget bool
}

// readConfigurationBody reads and checks the body of PUT /configurations/{id}.
func (h *Handler) readConfigurationBody(req *request, id string) (configurationWrite, *apiError) {
	data, aerr := h.readBody(req)
	if aerr != nil {
		return configurationWrite{}, aerr
	}
	doc, err := twin.Decode(data)
	if err != nil {
		return configurationWrite{}, badRequest("the request body: " + err.Error())
	}
	var w configurationWrite
	var content twin.Doc
	for k, v := range doc {
		switch k {
		case "id":
			if s, ok := v.(string); !ok || s != id {
				b, _ := json.Marshal(v)
				return w, badRequest(fmt.Sprintf("id: %s does not match the configuration id of the path %q", b, id))
			}
		case "schemaVersion":
			if s, ok := v.(string); v != nil && (!ok || s != configurationSchemaVersion) {
				b, _ := json.Marshal(v)
				return w, badRequest(fmt.Sprintf("schemaVersion: %s is not supported (the only one is %q)", b, configurationSchemaVersion))
			}
		case "labels":
			if w.labels, aerr = configurationLabels(v); aerr != nil {
				return w, aerr
			}
		case "content":
			if content, aerr = contentDesired(v, false); aerr != nil {
				return w, aerr
			}
		case "targetCondition":
			s, ok := v.(string)
			if v != nil && !ok {
				return w, badRequest("targetCondition: must be a string, the WHERE clause of a query over twins such as tags.environment = 'test'")
			}
			if strings.TrimSpace(s) != "" {
				if _, err := query.ParseCondition(s); err != nil {
					return w, badRequest("targetCondition: " + err.Error())
				}
			}
			w.spec.TargetCondition = strings.TrimSpace(s)
		case "priority":
			n, ok := v.(json.Number)
			p, err := strconv.ParseInt(string(n), 10, 32)
			if v != nil && (!ok || err != nil || p < 0) {
				b, _ := json.Marshal(v)
				return w, badRequest(fmt.Sprintf("priority: %s is not a whole number from 0 to %d", b, int32(^uint32(0)>>1)))
			}
			w.spec.Priority = int32(p)
		case "metrics":
			if w.spec.Metrics, aerr = metricQueries(v); aerr != nil {
				return w, aerr
			}
		case "systemMetrics", "etag", "createdTimeUtc", "lastUpdatedTimeUtc", "contentType":
			// Kept by the hub: a document read with GET can be sent back.
		default:
			return w, badRequest(fmt.Sprintf("%q is not a member of a configuration (id, schemaVersion, labels, content, "+
				"targetCondition, priority, metrics)", k))
		}
	}
	if content == nil {
		return w, badRequest(`content: required: {"deviceContent": {"properties.desired.<path>": <value>, ...}}`)
	}
	w.spec.Content.Desired = &apiextensionsv1.JSON{Raw: twin.Encode(content)}
	w.noTarget = w.spec.TargetCondition == ""
	return w, nil
}

// configurationLabels checks a configuration's labels: they are the
// TwinConfiguration's, so Kubernetes label rules apply.
func configurationLabels(v any) (map[string]string, *apiError) {
	m, ok := v.(map[string]any)
	if v != nil && !ok {
		return nil, badRequest("labels: must be a JSON object of strings")
	}
	out := make(map[string]string, len(m))
	for k, lv := range m {
		s, ok := lv.(string)
		if !ok {
			return nil, badRequest(fmt.Sprintf("labels.%s: must be a string", k))
		}
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			return nil, badRequest(fmt.Sprintf("labels: %q is not a valid label name: %s", k, strings.Join(errs, "; ")))
		}
		if errs := validation.IsValidLabelValue(s); len(errs) > 0 {
			return nil, badRequest(fmt.Sprintf("labels.%s: %q is not a valid label value: %s", k, s, strings.Join(errs, "; ")))
		}
		out[k] = s
	}
	return out, nil
}

// contentDesired turns IoT Hub's content {"deviceContent":
// {"properties.desired.a.b": v}} into the desired document it sets
// ({"a": {"b": v}}), checked with the twin rules. With patch, null values
// are kept (they delete the key) and the document is checked as a patch.
func contentDesired(v any, patch bool) (twin.Doc, *apiError) {
	c, ok := v.(map[string]any)
	if !ok {
		return nil, badRequest(`content: must be a JSON object: {"deviceContent": {"properties.desired.<path>": <value>, ...}}`)
	}
	var dc map[string]any
	for k, v := range c {
		switch k {
		case "deviceContent":
			if dc, ok = v.(map[string]any); !ok && v != nil {
				return nil, badRequest("content.deviceContent: must be a JSON object")
			}
		case "modulesContent", "moduleContent":
			if m, ok := v.(map[string]any); v != nil && (!ok || len(m) > 0) {
				return nil, badRequest("content." + k + ": IoT Edge module content is not supported: use content.deviceContent")
			}
		default:
			return nil, badRequest(fmt.Sprintf("content: %q is not a member of a configuration's content (deviceContent)", k))
		}
	}
	if len(dc) == 0 {
		return nil, badRequest(`content.deviceContent: required: at least one "properties.desired.<path>": <value>`)
	}
	keys := make([]string, 0, len(dc))
	for k := range dc {
		keys = append(keys, k)
	}
	// Shorter keys first, so that a key inside another one's value is found.
	slices.Sort(keys)
	desired := twin.Doc{}
	for _, k := range keys {
		rest, ok := strings.CutPrefix(k, desiredPrefix)
		segs := strings.Split(rest, ".")
		if !ok || slices.Contains(segs, "") {
			return nil, badRequest(fmt.Sprintf("content.deviceContent: %q is not a desired property path: keys are "+
				"properties.desired.<key>[.<key>...]", k))
		}
		node := desired
		for i, s := range segs[:len(segs)-1] {
			next, exists := node[s]
			if !exists {
				child := twin.Doc{}
				node[s] = child
				node = child
				continue
			}
			child, isObj := next.(map[string]any)
			if !isObj || isContentKey(dc, segs[:i+1]) {
				return nil, badRequest(fmt.Sprintf("content.deviceContent: %q is inside %q, which is set too", k,
					desiredPrefix+strings.Join(segs[:i+1], ".")))
			}
			node = child
		}
		if _, exists := node[segs[len(segs)-1]]; exists {
			return nil, badRequest(fmt.Sprintf("content.deviceContent: %q holds properties that other keys set too", k))
		}
		val, err := twin.FromAny(map[string]any{"v": dc[k]})
		if err != nil {
			return nil, badRequest(fmt.Sprintf("content.deviceContent[%q]: %v", k, err))
		}
		node[segs[len(segs)-1]] = val["v"]
	}
	path := "content.deviceContent.properties.desired"
	var err error
	if patch {
		err = twin.ValidatePatch(twin.Desired, path, desired)
	} else {
		err = twin.ValidateDocument(twin.Desired, path, desired)
	}
	if err != nil {
		return nil, badRequest(err.Error())
	}
	return desired, nil
}

// isContentKey reports whether deviceContent has the key of segs itself.
func isContentKey(dc map[string]any, segs []string) bool {
	_, ok := dc[desiredPrefix+strings.Join(segs, ".")]
	return ok
}

// metricQueries checks {"queries": {"name": "SELECT deviceId FROM devices
// WHERE ..."}} and returns them in name order.
func metricQueries(v any) ([]v1alpha1.ConfigurationMetric, *apiError) {
	if v == nil {
		return nil, nil
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, badRequest(`metrics: must be a JSON object: {"queries": {"<name>": "SELECT deviceId FROM devices WHERE ..."}}`)
	}
	var qs map[string]any
	for k, v := range m {
		switch k {
		case "queries":
			if qs, ok = v.(map[string]any); !ok && v != nil {
				return nil, badRequest("metrics.queries: must be a JSON object of named queries")
			}
		case "results":
			// Counted by the operator.
		default:
			return nil, badRequest(fmt.Sprintf("metrics: %q is not a member of metrics (queries)", k))
		}
	}
	if len(qs) > maxMetrics {
		return nil, badRequest(fmt.Sprintf("metrics.queries: %d queries, more than the %d allowed", len(qs), maxMetrics))
	}
	out := make([]v1alpha1.ConfigurationMetric, 0, len(qs))
	for name, v := range qs {
		s, ok := v.(string)
		if !ok {
			return nil, badRequest(fmt.Sprintf("metrics.queries.%s: must be a string (a query)", name))
		}
		if msg := metricNameError(name); msg != "" {
			return nil, badRequest(fmt.Sprintf("metrics.queries: %q %s", name, msg))
		}
		if err := checkMetricQuery(s); err != nil {
			return nil, badRequest(fmt.Sprintf("metrics.queries.%s: %v", name, err))
		}
		out = append(out, v1alpha1.ConfigurationMetric{Name: name, Query: s})
	}
	slices.SortFunc(out, func(a, b v1alpha1.ConfigurationMetric) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// maxMetrics is the most metrics of a configuration (the CRD's bound).
const maxMetrics = 20

// metricNameError says why name cannot name a metric, "" when it can.
func metricNameError(name string) string {
	ok := name != "" && len(name) <= 63 && isAlnumByte(name[0])
	for i := 0; ok && i < len(name); i++ {
		c := name[i]
		ok = isAlnumByte(c) || c == '_' || c == '.' || c == '-'
	}
	if ok {
		return ""
	}
	return "is not a metric name: use at most 63 letters, digits, '_', '.' and '-', starting with a letter or digit"
}

func isAlnumByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// checkMetricQuery checks a metric's query: it counts twins, so it must
// have a row per twin (no aggregates, no GROUP BY).
func checkMetricQuery(s string) error {
	q, err := query.Parse(s)
	if err != nil {
		return err
	}
	if !q.PerTwin() {
		return fmt.Errorf("a metric counts twins: use SELECT deviceId FROM devices WHERE ..., without aggregates or GROUP BY")
	}
	return nil
}

// getConfiguration serves GET /configurations/{id}.
func (h *Handler) getConfiguration(ctx context.Context, req *request) (reply, *apiError) {
	id, aerr := configurationID(req.r)
	if aerr != nil {
		return reply{}, aerr
	}
	c, aerr := h.readConfiguration(ctx, id)
	if aerr != nil {
		return reply{}, aerr
	}
	return configurationReply(c), nil
}

// readConfiguration reads a configuration from the API server; one being
// deleted does not exist any more.
func (h *Handler) readConfiguration(ctx context.Context, id string) (*v1alpha1.TwinConfiguration, *apiError) {
	c := &v1alpha1.TwinConfiguration{}
	err := h.opts.APIReader.Get(ctx, client.ObjectKey{Namespace: h.opts.Namespace, Name: id}, c)
	switch {
	case apierrors.IsNotFound(err):
		return nil, configurationNotFound(id)
	case err != nil:
		return nil, fromAPI("reading the configuration", err)
	case !c.DeletionTimestamp.IsZero():
		return nil, configurationNotFound(id)
	}
	return c, nil
}

func configurationReply(c *v1alpha1.TwinConfiguration) reply {
	return reply{status: http.StatusOK, body: renderConfiguration(c)}
}

// listConfigurations serves GET /configurations: the configurations in id
// order, at most MaxListConfigurations (or ?top=n, if fewer).
func (h *Handler) listConfigurations(ctx context.Context, req *request) (reply, *apiError) {
	limit := MaxListConfigurations
	if v := req.r.URL.Query().Get("top"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return reply{}, badRequest(fmt.Sprintf("top: %q is not a whole number from 1 to %d", v, MaxListConfigurations))
		}
		limit = min(n, MaxListConfigurations)
	}
	var list v1alpha1.TwinConfigurationList
	if err := h.opts.APIReader.List(ctx, &list, client.InNamespace(h.opts.Namespace)); err != nil {
		return reply{}, fromAPI("listing the configurations", err)
	}
	slices.SortFunc(list.Items, func(a, b v1alpha1.TwinConfiguration) int { return strings.Compare(a.Name, b.Name) })
	out := make([]configurationJSON, 0, min(len(list.Items), limit))
	for i := range list.Items {
		if len(out) == limit {
			break
		}
		if list.Items[i].DeletionTimestamp.IsZero() {
			out = append(out, renderConfiguration(&list.Items[i]))
		}
	}
	return reply{status: http.StatusOK, body: out}, nil
}

// putConfiguration serves PUT /configurations/{id}: without If-Match it
// creates the configuration (409 if it exists); with If-Match ("*" or the
// etag) it updates it (412 when the etag is not current, 404 when it does
// not exist). An update replaces the labels, target condition, priority,
// content and metric queries, and keeps what IoT Hub's document has no
// member for (spec.rollout, a label selector when the body has no
// targetCondition). The write is a merge patch of what changes.
func (h *Handler) putConfiguration(ctx context.Context, req *request) (reply, *apiError) {
	id, aerr := configurationID(req.r)
	if aerr != nil {
		return reply{}, aerr
	}
	w, aerr := h.readConfigurationBody(req, id)
	if aerr != nil {
		return reply{}, aerr
	}
	match := ifMatch(req.r)
	if match == "" {
		return h.createConfiguration(ctx, id, w)
	}
	for attempt := 0; attempt < maxWriteAttempts; attempt++ {
		live, aerr := h.readConfiguration(ctx, id)
		if aerr != nil {
			return reply{}, aerr
		}
		if match != "*" && match != configurationETag(live) {
			return reply{}, preconditionFailed(fmt.Sprintf("the etag %q is not current: the configuration has changed "+
				"since it was read (its etag is now %q)", match, configurationETag(live)))
		}
		if w.noTarget && live.Spec.Selector == nil {
			return reply{}, badRequest("targetCondition: required: the WHERE clause of a query over twins, such as " +
				"tags.environment = 'test' (\"*\" targets every twin)")
		}
		updated := live.DeepCopy()
		updated.Labels = w.labels
		spec := w.spec
		spec.Rollout = live.Spec.Rollout
		if w.noTarget {
			spec.Selector = live.Spec.Selector
		}
		updated.Spec = spec
		if equality.Semantic.DeepEqual(updated.Spec, live.Spec) && equality.Semantic.DeepEqual(labelsOrNil(updated.Labels), labelsOrNil(live.Labels)) {
			return configurationReply(live), nil
		}
		err := h.opts.Client.Patch(ctx, updated, client.MergeFromWithOptions(live, client.MergeFromWithOptimisticLock{}),
			client.FieldOwner(FieldManager))
		switch {
		case err == nil:
			return configurationReply(updated), nil
		case apierrors.IsConflict(err):
			continue // read again: the etag may still be good (a status write came first)
		case apierrors.IsNotFound(err):
			return reply{}, configurationNotFound(id)
		}
		return reply{}, fromAPI("updating the configuration", err)
	}
	return reply{}, &apiError{status: http.StatusServiceUnavailable, code: CodeServiceUnavailable, retryAfter: time.Second,
		msg: fmt.Sprintf("the configuration was changed by others %d times while this update was being written: retry", maxWriteAttempts)}
}

func labelsOrNil(m map[string]string) map[string]string {
	if len(m) == 0 {
		return nil
	}
	return m
}

// createConfiguration creates the TwinConfiguration id.
func (h *Handler) createConfiguration(ctx context.Context, id string, w configurationWrite) (reply, *apiError) {
	if w.noTarget {
		return reply{}, badRequest("targetCondition: required: the WHERE clause of a query over twins, such as " +
			"tags.environment = 'test' (\"*\" targets every twin)")
	}
	c := &v1alpha1.TwinConfiguration{
		ObjectMeta: metav1.ObjectMeta{Namespace: h.opts.Namespace, Name: id, Labels: w.labels},
		Spec:       w.spec,
	}
	err := h.opts.Client.Create(ctx, c, client.FieldOwner(FieldManager))
	switch {
	case err == nil:
		return configurationReply(c), nil
	case apierrors.IsAlreadyExists(err):
		return reply{}, errorf(http.StatusConflict, CodeConfigurationAlreadyExists,
			fmt.Sprintf("configuration %q already exists (or is still being deleted): update it with If-Match", id))
	}
	return reply{}, fromAPI("creating the configuration", err)
}

// deleteConfiguration serves DELETE /configurations/{id}, with If-Match
// (the etag or "*") or without. The operator then removes what the
// configuration set in its twins before the TwinConfiguration goes.
func (h *Handler) deleteConfiguration(ctx context.Context, req *request) (reply, *apiError) {
	id, aerr := configurationID(req.r)
	if aerr != nil {
		return reply{}, aerr
	}
	match := ifMatch(req.r)
	for attempt := 0; attempt < maxWriteAttempts; attempt++ {
		live, aerr := h.readConfiguration(ctx, id)
		if aerr != nil {
			return reply{}, aerr
		}
		if match != "" && match != "*" && match != configurationETag(live) {
			return reply{}, preconditionFailed(fmt.Sprintf("the etag %q is not current: the configuration has changed "+
				"since it was read (its etag is now %q)", match, configurationETag(live)))
		}
		rv := live.ResourceVersion
		err := h.opts.Client.Delete(ctx, live, client.Preconditions{UID: &live.UID, ResourceVersion: &rv})
		switch {
		case err == nil:
			return reply{status: http.StatusNoContent}, nil
		case apierrors.IsConflict(err):
			continue
		case apierrors.IsNotFound(err):
			return reply{}, configurationNotFound(id)
		}
		return reply{}, fromAPI("deleting the configuration", err)
	}
	return reply{}, &apiError{status: http.StatusServiceUnavailable, code: CodeServiceUnavailable, retryAfter: time.Second,
		msg: fmt.Sprintf("the configuration was changed by others %d times while it was being deleted: retry", maxWriteAttempts)}
}

// testQueriesResponse is IoT Hub's answer to POST /configurations/testQueries:
// the error of the target condition ("" when valid) and of each metric
// query that is not valid.
type testQueriesResponse struct {
	TargetConditionError    string            `json:"targetConditionError"`
	CustomMetricQueryErrors map[string]string `json:"customMetricQueryErrors"`
}

// testConfigurationQueries serves POST /configurations/testQueries:
// {"targetCondition": "...", "customMetricQueries": {"name": "SELECT ..."}}.
// Invalid queries are reported in the 200 reply, as IoT Hub does; a body
// of the wrong shape is 400.
func (h *Handler) testConfigurationQueries(_ context.Context, req *request) (reply, *apiError) {
	data, aerr := h.readBody(req)
	if aerr != nil {
		return reply{}, aerr
	}
	doc, err := twin.Decode(data)
	if err != nil {
		return reply{}, badRequest("the request body: " + err.Error())
	}
	res := testQueriesResponse{CustomMetricQueryErrors: map[string]string{}}
	for k, v := range doc {
		switch k {
		case "targetCondition":
			s, ok := v.(string)
			if v != nil && !ok {
				return reply{}, badRequest("targetCondition: must be a string")
			}
			if strings.TrimSpace(s) == "" {
				continue
			}
			if _, err := query.ParseCondition(s); err != nil {
				res.TargetConditionError = err.Error()
			}
		case "customMetricQueries":
			qs, ok := v.(map[string]any)
			if v != nil && !ok {
				return reply{}, badRequest("customMetricQueries: must be a JSON object of named queries")
			}
			for name, q := range qs {
				s, ok := q.(string)
				if !ok {
					return reply{}, badRequest(fmt.Sprintf("customMetricQueries.%s: must be a string (a query)", name))
				}
				if msg := metricNameError(name); msg != "" {
					res.CustomMetricQueryErrors[name] = "the name " + msg
				} else if err := checkMetricQuery(s); err != nil {
					res.CustomMetricQueryErrors[name] = err.Error()
				}
			}
		default:
			return reply{}, badRequest(fmt.Sprintf("%q is not a member of a query test (targetCondition, customMetricQueries)", k))
		}
	}
	return reply{status: http.StatusOK, body: res}, nil
}

// applyConfigurationContent serves POST /devices/{id}/applyConfigurationContent:
// the body's deviceContent is merged into the twin's desired properties,
// as a twin update with If-Match "*" (the twin's own desired properties,
// which win over every configuration).
func (h *Handler) applyConfigurationContent(ctx context.Context, req *request) (reply, *apiError) {
	data, aerr := h.readBody(req)
	if aerr != nil {
		return reply{}, aerr
	}
	doc, err := twin.Decode(data)
	if err != nil {
		return reply{}, badRequest("the request body: " + err.Error())
	}
	patch, aerr := contentDesired(doc, true)
	if aerr != nil {
		return reply{}, aerr
	}
	_, aerr = h.writeSpec(ctx, req, precondition{any: true}, func(tags, desired twin.Doc) (twin.Doc, twin.Doc, *apiError) {
		desired = twin.MergePatch(desired, patch)
		if err := twin.ValidateDocument(twin.Desired, "properties.desired", desired); err != nil {
			return nil, nil, badRequest(err.Error())
		}
		return tags, desired, nil
	})
	if aerr != nil {
		return reply{}, aerr
	}
	return reply{status: http.StatusOK, body: map[string]any{}}, nil
}
