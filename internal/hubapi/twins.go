package hubapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/resourceversion"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// maxWriteAttempts bounds the attempts of a write with If-Match "*" that
// keeps meeting concurrent writes.
const maxWriteAttempts = 5

// getTwin serves GET /twins/{id}: the twin document.
func (h *Handler) getTwin(ctx context.Context, req *request) (reply, *apiError) {
	t, aerr := h.resolve(ctx, req.deviceID)
	if aerr != nil {
		return reply{}, aerr
	}
	return twinReply(t), nil
}

// patchTwin serves PATCH /twins/{id}: {"tags": {...}} and
// {"properties": {"desired": {...}}} are JSON merge patches (RFC 7386) of
// the tags and desired properties (null deletes a key; "tags": null or
// "desired": null deletes the whole section). The merged sections must follow the twin rules.
// Reported properties cannot be written; the members of the twin document
// that only the hub maintains (etag, version, status, connectionState...)
// are ignored, so a document read with GET can be sent back.
func (h *Handler) patchTwin(ctx context.Context, req *request) (reply, *apiError) {
	w, aerr := h.readTwinBody(req, false)
	if aerr != nil {
		return reply{}, aerr
	}
	return h.writeSpec(ctx, req, parseIfMatch(req.r.Header), func(tags, desired twin.Doc) (twin.Doc, twin.Doc, *apiError) {
		if w.setTags {
			if w.tags == nil {
				tags = twin.Doc{} // "tags": null deletes every tag
			}
			tags = twin.MergePatch(tags, w.tags)
			if err := twin.ValidateDocument(twin.Tags, "tags", tags); err != nil {
				return nil, nil, badRequest(err.Error())
			}
		}
		if w.setDesired {
			if w.desired == nil {
				desired = twin.Doc{}
			}
			desired = twin.MergePatch(desired, w.desired)
			if err := twin.ValidateDocument(twin.Desired, "properties.desired", desired); err != nil {
				return nil, nil, badRequest(err.Error())
			}
		}
		return tags, desired, nil
	})
}

// replaceTwin serves PUT /twins/{id}: the tags and desired properties
// become those of the body; a missing section becomes empty. The desired
// "$version" and "$metadata" of a document read with GET are ignored, as
// are the reported properties and the members only the hub maintains.
func (h *Handler) replaceTwin(ctx context.Context, req *request) (reply, *apiError) {
	w, aerr := h.readTwinBody(req, true)
	if aerr != nil {
		return reply{}, aerr
	}
	return h.writeSpec(ctx, req, parseIfMatch(req.r.Header), func(twin.Doc, twin.Doc) (twin.Doc, twin.Doc, *apiError) {
		return w.tags, w.desired, nil
	})
}

// twinWrite is what a PATCH or PUT body asks for.
type twinWrite struct {
	// tags and desired are merge patches (PATCH) or whole sections (PUT).
	tags, desired twin.Doc
	// setTags and setDesired tell whether the body has the section.
	setTags, setDesired bool
}

// readOnlyTwinMembers are the members of a twin document that only the hub
// maintains; a write ignores them.
var readOnlyTwinMembers = map[string]bool{
	"etag": true, "version": true, "status": true, "statusReason": true, "statusUpdateTime": true,
	"connectionState": true, "connectionStateUpdatedTime": true, "lastActivityTime": true,
	"cloudToDeviceMessageCount": true, "authenticationType": true, "x509Thumbprint": true,
	"capabilities": true, "modelId": true, "deviceEtag": true, "deviceScope": true, "parentScopes": true,
	"configurations": true,
}

// readTwinBody reads and checks the body of PATCH (replace false) or PUT
// (replace true) /twins/{id}.
func (h *Handler) readTwinBody(req *request, replace bool) (twinWrite, *apiError) {
	data, aerr := h.readBody(req)
	if aerr != nil {
		return twinWrite{}, aerr
	}
	doc, err := twin.Decode(data)
	if err != nil {
		return twinWrite{}, badRequest("the request body: " + err.Error())
	}
	var w twinWrite
	section := func(path string, v any) (twin.Doc, *apiError) {
		switch x := v.(type) {
		case nil:
			return nil, nil
		case map[string]any:
			return x, nil
		}
		return nil, badRequest(path + ": must be a JSON object")
	}
	for k, v := range doc {
		switch {
		case k == "deviceId":
			if s, ok := v.(string); !ok || s != req.deviceID {
				b, _ := json.Marshal(v)
				return twinWrite{}, badRequest(fmt.Sprintf("deviceId: %s does not match the device id of the path %q", b, req.deviceID))
			}
		case k == "tags":
			if w.tags, aerr = section("tags", v); aerr != nil {
				return twinWrite{}, aerr
			}
			w.setTags = true
		case k == "properties":
			props, ok := v.(map[string]any)
			if !ok {
				return twinWrite{}, badRequest("properties: must be a JSON object")
			}
			for pk, pv := range props {
				switch pk {
				case "desired":
					if w.desired, aerr = section("properties.desired", pv); aerr != nil {
						return twinWrite{}, aerr
					}
					w.setDesired = true
				case "reported":
					if !replace {
						return twinWrite{}, badRequest("properties.reported: reported properties are written by the device only (the back end may write tags and properties.desired)")
					}
				default:
					return twinWrite{}, badRequest(fmt.Sprintf("properties: %q is not a section of a twin (the back end may write properties.desired)", pk))
				}
			}
		case readOnlyTwinMembers[k]:
		default:
			return twinWrite{}, badRequest(fmt.Sprintf("%q is not a member of a twin that can be written (the back end may write tags and properties.desired)", k))
		}
	}
	if replace {
		if w.tags == nil {
			w.tags = twin.Doc{}
		}
		if w.desired == nil {
			w.desired = twin.Doc{}
		}
		delete(w.desired, "$version")
		delete(w.desired, "$metadata")
		w.setTags, w.setDesired = true, true
		if err := twin.ValidateDocument(twin.Tags, "tags", w.tags); err != nil {
			return twinWrite{}, badRequest(err.Error())
		}
		if err := twin.ValidateDocument(twin.Desired, "properties.desired", w.desired); err != nil {
			return twinWrite{}, badRequest(err.Error())
		}
		return w, nil
	}
	if err := twin.ValidatePatch(twin.Tags, "tags", w.tags); err != nil {
		return twinWrite{}, badRequest(err.Error())
	}
	if err := twin.ValidatePatch(twin.Desired, "properties.desired", w.desired); err != nil {
		return twinWrite{}, badRequest(err.Error())
	}
	return w, nil
}

// precondition is what an If-Match header asks for.
type precondition struct {
	// any is true for "*" or no If-Match: any version will do.
	any bool
	// etag is the etag sent, unquoted; rv the resourceVersion it names,
	// "" when it is not an etag the hub issued (it then matches nothing).
	etag, rv string
}

// parseIfMatch reads an If-Match header: absent, "*" or a quoted etag
// (quotes and a weak W/ prefix are optional).
func parseIfMatch(hdr http.Header) precondition {
	v := strings.TrimPrefix(strings.TrimSpace(hdr.Get("If-Match")), "W/")
	etag := strings.Trim(v, `"`)
	if etag == "" || etag == "*" {
		return precondition{any: true}
	}
	rv, err := hubtwin.ResourceVersion(etag)
	if err != nil {
		rv = ""
	}
	return precondition{etag: etag, rv: rv}
}

// mismatch is the 412 for a precondition t does not meet.
func (p precondition) mismatch(t *v1alpha1.DeviceTwin) *apiError {
	if p.rv == "" {
		return preconditionFailed(fmt.Sprintf("If-Match %q is not an etag of this hub: read the twin for its etag, or send \"*\"", p.etag))
	}
	return preconditionFailed(fmt.Sprintf("the etag %q is not current: the twin has changed since it was read (its etag is now %q)",
		p.etag, hubtwin.ETag(t.ResourceVersion)))
}

// resolve returns the twin that holds the device id, from the cache, when
// it is in the served namespace: a device elsewhere is not this hub's.
func (h *Handler) resolve(ctx context.Context, id string) (*v1alpha1.DeviceTwin, *apiError) {
	t, aerr := h.holder(ctx, id)
	if aerr != nil {
		return nil, aerr
	}
	if t.Namespace != h.opts.Namespace {
		return nil, deviceNotFound(id)
	}
	return t, nil
}

// holder returns the twin that holds the device id, in any namespace.
func (h *Handler) holder(ctx context.Context, id string) (*v1alpha1.DeviceTwin, *apiError) {
	t, err := h.opts.Resolve(ctx, id)
	switch {
	case err == nil && t != nil:
		return t, nil
	case err == nil, errors.Is(err, deviceid.ErrNotFound), apierrors.IsNotFound(err):
		return nil, deviceNotFound(id)
	}
	return nil, fromAPI("looking up the device", err)
}

// current returns the twin a write is to be based on: the cached copy
// when it meets the precondition and fresh is false, else the API
// server's copy, which must meet it.
func (h *Handler) current(ctx context.Context, id string, pre precondition, fresh bool) (*v1alpha1.DeviceTwin, *apiError) {
	t, aerr := h.resolve(ctx, id)
	if aerr != nil {
		return nil, aerr
	}
	if !pre.any && pre.rv == "" {
		return nil, pre.mismatch(t)
	}
	if !fresh && (pre.any || t.ResourceVersion == pre.rv) {
		return t, nil
	}
	live := &v1alpha1.DeviceTwin{}
	if err := h.opts.APIReader.Get(ctx, client.ObjectKeyFromObject(t), live); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, deviceNotFound(id)
		}
		return nil, fromAPI("reading the twin", err)
	}
	if !live.DeletionTimestamp.IsZero() {
		return nil, deviceNotFound(id)
	}
	if !pre.any && live.ResourceVersion != pre.rv {
		return nil, pre.mismatch(live)
	}
	return live, nil
}

// specChange computes the new tags and desired properties from the
// current ones (which it may keep, or modify in place).
type specChange func(tags, desired twin.Doc) (twin.Doc, twin.Doc, *apiError)

// writeSpec changes a twin's spec.tags and spec.desired and replies with
// the updated twin.
//
// The write is a JSON merge patch of exactly the keys that change, with
// the resourceVersion of the copy it was computed from as precondition:
// the etag of If-Match, or, for "*", the current copy, recomputed and
// retried when another write came first. It is a merge patch rather than
// a server-side apply because GitOps tools (Flux, Argo CD) may own the
// twin's other fields, and even keys of its tags: an apply would have to
// state every key of the sections to own them, and would either fail
// with conflicts or, forced, take their ownership away. The merge patch
// changes only what the client changed, like `kubectl patch`, and leaves
// every other field and its owner alone.
func (h *Handler) writeSpec(ctx context.Context, req *request, pre precondition, change specChange) (reply, *apiError) {
	for attempt := 0; ; attempt++ {
		base, aerr := h.current(ctx, req.deviceID, pre, attempt > 0)
		if aerr != nil {
			return reply{}, aerr
		}
		tags, err1 := twin.DecodeRaw(rawJSON(base.Spec.Tags))
		desired, err2 := twin.DecodeRaw(rawJSON(base.Spec.Desired))
		if err := errors.Join(err1, err2); err != nil {
			return reply{}, internalError("reading the stored twin", err)
		}
		newTags, newDesired, aerr := change(twin.DeepCopy(tags), twin.DeepCopy(desired))
		if aerr != nil {
			return reply{}, aerr
		}
		patch := specPatch(base.ResourceVersion, tags, newTags, desired, newDesired)
		if patch == nil {
			return twinReply(base), nil
		}
		obj := &v1alpha1.DeviceTwin{}
		obj.Namespace, obj.Name = base.Namespace, base.Name
		err := h.opts.Client.Patch(ctx, obj, client.RawPatch(types.MergePatchType, patch), client.FieldOwner(FieldManager))
		switch {
		case err == nil:
			return twinReply(h.awaitWrite(ctx, obj, true)), nil
		case apierrors.IsConflict(err) && pre.any && attempt+1 < maxWriteAttempts:
			continue
		case apierrors.IsConflict(err) && pre.any:
			return reply{}, &apiError{status: http.StatusServiceUnavailable, code: CodeServiceUnavailable, cause: err,
				msg: fmt.Sprintf("the twin was changed by others %d times while this update was being written: retry", maxWriteAttempts)}
		case apierrors.IsConflict(err):
			return reply{}, preconditionFailed(fmt.Sprintf("the etag %q is not current: the twin has changed since it was read", pre.etag))
		case apierrors.IsNotFound(err):
			return reply{}, deviceNotFound(req.deviceID)
		}
		return reply{}, fromAPI("updating the twin", err)
	}
}

// specPatch returns the merge patch that turns the old sections into the
// new ones under the resourceVersion precondition rv, or nil when nothing
// changes.
func specPatch(rv string, oldTags, newTags, oldDesired, newDesired twin.Doc) []byte {
	spec := map[string]json.RawMessage{}
	if !twin.Equal(oldTags, newTags) {
		spec["tags"] = twin.Encode(twin.Diff(oldTags, newTags))
	}
	if !twin.Equal(oldDesired, newDesired) {
		spec["desired"] = twin.Encode(twin.Diff(oldDesired, newDesired))
	}
	if len(spec) == 0 {
		return nil
	}
	b, _ := json.Marshal(map[string]any{
		"metadata": map[string]string{"resourceVersion": rv},
		"spec":     spec,
	})
	return b
}

// twinReply is the 200 reply with a twin document.
func twinReply(t *v1alpha1.DeviceTwin) reply {
	return reply{status: http.StatusOK, body: hubtwin.FromDeviceTwin(t),
		header: http.Header{"Etag": {strconv.Quote(hubtwin.ETag(t.ResourceVersion))}}}
}

func rawJSON(j *apiextensionsv1.JSON) []byte {
	if j == nil {
		return nil
	}
	return j.Raw
}

// awaitWrite waits, at most Options.CacheWait, until the cache (Reader)
// holds the written twin or a newer copy of it, so that a read or query
// that follows the reply sees the write; with spec true and
// Options.AwaitReconcile set it then waits, at most that long, until the
// operator has reconciled the written generation. It returns the newest
// copy it saw (written, if the cache did not catch up).
func (h *Handler) awaitWrite(ctx context.Context, written *v1alpha1.DeviceTwin, spec bool) *v1alpha1.DeviceTwin {
	if h.opts.CacheWait < 0 {
		return written
	}
	key := client.ObjectKeyFromObject(written)
	best := written
	caught := h.poll(ctx, h.opts.CacheWait, func() bool {
		t := &v1alpha1.DeviceTwin{}
		if err := h.opts.Reader.Get(ctx, key, t); err != nil || t.UID != written.UID || !atLeast(t.ResourceVersion, written.ResourceVersion) {
			return false
		}
		best = t
		return true
	})
	if !caught || !spec || h.opts.AwaitReconcile <= 0 {
		return best
	}
	h.poll(ctx, h.opts.AwaitReconcile, func() bool {
		t := &v1alpha1.DeviceTwin{}
		if err := h.opts.Reader.Get(ctx, key, t); err != nil || t.UID != written.UID || !atLeast(t.ResourceVersion, best.ResourceVersion) {
			return false
		}
		best = t
		return t.Status.ObservedGeneration >= written.Generation
	})
	return best
}

// awaitGone waits, at most Options.CacheWait, until the cache no longer
// holds the twin, or holds it as being deleted.
func (h *Handler) awaitGone(ctx context.Context, key types.NamespacedName) {
	if h.opts.CacheWait < 0 {
		return
	}
	h.poll(ctx, h.opts.CacheWait, func() bool {
		t := &v1alpha1.DeviceTwin{}
		err := h.opts.Reader.Get(ctx, key, t)
		return apierrors.IsNotFound(err) || err == nil && !t.DeletionTimestamp.IsZero()
	})
}

// poll calls cond every few milliseconds until it holds (true) or timeout
// passes (false).
func (h *Handler) poll(ctx context.Context, timeout time.Duration, cond func() bool) bool {
	err := wait.PollUntilContextTimeout(ctx, 5*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		return cond(), nil
	})
	return err == nil
}

// atLeast reports whether resourceVersion a is b or newer. Resource
// versions are compared as the API server defines it; when one is not
// comparable only equality counts.
func atLeast(a, b string) bool {
	c, err := resourceversion.CompareResourceVersion(a, b)
	if err != nil {
		return a == b
	}
	return c >= 0
}
