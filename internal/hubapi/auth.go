package hubapi

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/kubetwin/kubetwin/pkg/sas"
)

// operation is one operation of the API.
type operation struct {
	// name labels the operation in metrics and logs.
	name string
	// rights are the rights a policy needs one of.
	rights []Right
	// what is the operation for messages: "read twins".
	what string
}

// The operations, with the rights they need.
var (
	opTwinGet      = &operation{"twinGet", []Right{ServiceConnect}, "read twins"}
	opTwinUpdate   = &operation{"twinUpdate", []Right{ServiceConnect}, "update twins"}
	opTwinReplace  = &operation{"twinReplace", []Right{ServiceConnect}, "replace twins"}
	opQuery        = &operation{"query", []Right{ServiceConnect, RegistryRead}, "run queries"}
	opDeviceGet    = &operation{"deviceGet", []Right{RegistryRead}, "read the device registry"}
	opDeviceList   = &operation{"deviceList", []Right{RegistryRead}, "read the device registry"}
	opDeviceCreate = &operation{"deviceCreate", []Right{RegistryWrite}, "create devices"}
	opDeviceUpdate = &operation{"deviceUpdate", []Right{RegistryWrite}, "update devices"}
	opDeviceDelete = &operation{"deviceDelete", []Right{RegistryWrite}, "delete devices"}
	// opUnknown is a request that matched no route.
	opUnknown = &operation{name: "unknown"}
)

// authenticate checks the request's SharedAccessSignature token: it must
// be for the hub (sr is the hub host name, or a path under it that covers
// the request), unexpired, and signed with a key of the policy skn names.
// It returns that policy.
func (h *Handler) authenticate(ctx context.Context, r *http.Request) (*policy, *apiError) {
	hdr := strings.TrimSpace(r.Header.Get("Authorization"))
	if hdr == "" {
		return nil, unauthorized("the Authorization header is missing: send a SharedAccessSignature token signed with the key of a shared access policy")
	}
	tok, err := sas.Parse(hdr)
	if err != nil {
		e := unauthorized("the Authorization header is not a valid SharedAccessSignature token: " +
			strings.TrimPrefix(err.Error(), "SAS token: "))
		e.logMsg = "the Authorization header is not a valid SharedAccessSignature token"
		return nil, e
	}
	if tok.KeyName == "" {
		return nil, unauthorized("the token names no shared access policy (skn): device tokens are not accepted by the service API")
	}
	if e := h.checkResource(tok.Resource, r); e != nil {
		return nil, e
	}
	if tok.Expired(h.now()) {
		return nil, unauthorized("the token expired at " + tok.Expiry.UTC().Format(time.RFC3339))
	}
	set, err := h.policies.get(ctx)
	if err != nil {
		return nil, fromAPI("reading the shared access policies", err)
	}
	verifies := func(p *policy) bool {
		for _, k := range p.keys {
			if tok.Verify(k) {
				return true
			}
		}
		return false
	}
	p := set.policies[tok.KeyName]
	if p == nil || (p.err == nil && !verifies(p)) {
		// A policy or key that was just added or rotated: read again.
		if set, err = h.policies.reread(ctx); err != nil {
			return nil, fromAPI("reading the shared access policies", err)
		}
		p = set.policies[tok.KeyName]
	}
	switch {
	case p == nil:
		return nil, unauthorized("there is no shared access policy named " + strconv.Quote(tok.KeyName))
	case p.err != nil:
		return nil, unauthorized("shared access policy " + strconv.Quote(p.name) +
			" is misconfigured and refuses every request (the operator's log says why)")
	case !verifies(p):
		return nil, unauthorized("the token's signature does not match the primary or secondary key of shared access policy " +
			strconv.Quote(p.name))
	}
	return p, nil
}

// checkResource checks the token's resource (sr, URL-decoded): the hub
// host name (in any case), as the service SDKs sign it, or a path below it
// (host/devices/x) that covers the request's path.
func (h *Handler) checkResource(resource string, r *http.Request) *apiError {
	res := strings.TrimSuffix(resource, "/")
	host, scope, _ := strings.Cut(res, "/")
	if !strings.EqualFold(host, h.opts.HubHostname) {
		return unauthorized(fmt.Sprintf("the token is for %q, not for this hub: its resource (sr) must be the hub host name %q",
			host, h.opts.HubHostname))
	}
	if scope == "" {
		return nil
	}
	path, err := url.PathUnescape(r.URL.EscapedPath())
	if err != nil {
		path = r.URL.Path
	}
	if path != "/"+scope && !strings.HasPrefix(path, "/"+scope+"/") {
		return unauthorized(fmt.Sprintf("the token's resource %q does not cover %s", res, path))
	}
	return nil
}

// authorize checks that p has one of the rights op needs.
func authorize(p *policy, op *operation) *apiError {
	if len(op.rights) == 0 {
		return nil
	}
	for _, r := range op.rights {
		if p.has(r) {
			return nil
		}
	}
	return unauthorized(fmt.Sprintf("shared access policy %q may not %s: that needs the right %s",
		p.name, op.what, strings.ReplaceAll(joinRights(op.rights), ",", " or ")))
}
