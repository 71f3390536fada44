package hubapi

import (
	"context"
	"fmt"
	"net/http"
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
	// what is the operation for the log: "read twins".
	what string
	// scope is which device-scoped tokens may run it (see [scopeKind]);
	// scopeNone: only hub-wide tokens.
	scope scopeKind
}

// scopeKind is the kind of device scope that covers an operation.
type scopeKind int

const (
	// scopeNone: fleet-wide operations, for hub-wide tokens only.
	scopeNone scopeKind = iota
	// scopeTwin: operations on /twins/{id}, covered by a token for
	// hub/twins/{id} or hub/devices/{id}.
	scopeTwin
	// scopeDevice: operations on /devices/{id}, covered by a token for
	// hub/devices/{id}.
	scopeDevice
)

// The operations, with the rights they need.
var (
	opTwinGet      = &operation{"twinGet", []Right{ServiceConnect}, "read twins", scopeTwin}
	opTwinUpdate   = &operation{"twinUpdate", []Right{ServiceConnect}, "update twins", scopeTwin}
	opTwinReplace  = &operation{"twinReplace", []Right{ServiceConnect}, "replace twins", scopeTwin}
	opQuery        = &operation{"query", []Right{ServiceConnect, RegistryRead}, "run queries", scopeNone}
	opDeviceGet    = &operation{"deviceGet", []Right{RegistryRead}, "read the device registry", scopeDevice}
	opDeviceList   = &operation{"deviceList", []Right{RegistryRead}, "read the device registry", scopeNone}
	opDeviceCreate = &operation{"deviceCreate", []Right{RegistryWrite}, "create devices", scopeDevice}
	opDeviceUpdate = &operation{"deviceUpdate", []Right{RegistryWrite}, "update devices", scopeDevice}
	opDeviceDelete = &operation{"deviceDelete", []Right{RegistryWrite}, "delete devices", scopeDevice}
	// opUnknown is a request that matched no route.
	opUnknown = &operation{name: "unknown"}
)

// Reasons a request is unauthorized: the reason label of
// kubetwin_service_unauthorized_total and the log. The client is told
// only "Unauthorized", as IoT Hub tells it.
const (
	reasonNoToken         = "noToken"
	reasonMalformedToken  = "malformedToken"
	reasonDeviceToken     = "deviceToken"
	reasonOtherHub        = "otherHub"
	reasonExpired         = "expired"
	reasonLifetimeTooLong = "lifetimeTooLong"
	reasonUnknownPolicy   = "unknownPolicy"
	reasonInvalidPolicy   = "invalidPolicy"
	reasonBadSignature    = "badSignature"
	reasonOutOfScope      = "outOfScope"
	reasonMissingRight    = "missingRight"
)

// unauthorizedMessage is the message of every 401, IoT Hub's.
const unauthorizedMessage = "Unauthorized"

// unauthorized is a 401 whose reason (a label) and detail only the log
// and the metric get: telling a caller which policy exists, which key
// failed or which policy is broken helps only an attacker.
func unauthorized(reason, detail string) *apiError {
	return &apiError{status: http.StatusUnauthorized, code: CodeIotHubUnauthorizedAccess, msg: unauthorizedMessage,
		reason: reason, logMsg: detail}
}

// credential is an authenticated token: the policy that signed it and
// the part of the hub it is for.
type credential struct {
	policy *policy
	// scope is the path of the token's resource below the hub host name,
	// split at '/' ("devices", "x" for hub/devices/x); nil for a hub-wide
	// token.
	scope []string
}

// authenticate checks the request's SharedAccessSignature token: it must
// be a service token (skn names a policy) for this hub (sr is the hub host
// name, or a path under it; see [Handler.checkScope]), unexpired, expiring
// at most Options.MaxTokenLifetime from now, and signed with a key of the
// policy skn names.
func (h *Handler) authenticate(ctx context.Context, r *http.Request) (*credential, *apiError) {
	hdr := strings.TrimSpace(r.Header.Get("Authorization"))
	if hdr == "" {
		return nil, unauthorized(reasonNoToken, "the Authorization header is missing")
	}
	tok, err := sas.Parse(hdr)
	if err != nil {
		// The parse error may quote the token: not logged.
		return nil, unauthorized(reasonMalformedToken, "the Authorization header is not a valid SharedAccessSignature token")
	}
	if tok.KeyName == "" {
		return nil, unauthorized(reasonDeviceToken, "the token names no shared access policy (skn): device tokens are not accepted by the service API")
	}
	res := strings.TrimSuffix(tok.Resource, "/")
	host, path, scoped := strings.Cut(res, "/")
	if !strings.EqualFold(host, h.opts.HubHostname) {
		return nil, unauthorized(reasonOtherHub, fmt.Sprintf("the token is for %q, not for this hub %q", host, h.opts.HubHostname))
	}
	now := h.now()
	if tok.Expired(now) {
		return nil, unauthorized(reasonExpired, "the token expired at "+tok.Expiry.UTC().Format(time.RFC3339))
	}
	if err := tok.CheckLifetime(now, h.opts.MaxTokenLifetime); err != nil {
		return nil, unauthorized(reasonLifetimeTooLong, err.Error()+" (--max-sas-token-lifetime)")
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
		return nil, unauthorized(reasonUnknownPolicy, "there is no shared access policy named "+strconv.Quote(tok.KeyName))
	case p.err != nil:
		return nil, unauthorized(reasonInvalidPolicy, "shared access policy "+strconv.Quote(p.name)+" is invalid: "+p.err.Error())
	case !verifies(p):
		return nil, unauthorized(reasonBadSignature, "the token's signature does not match the primary or secondary key of shared access policy "+
			strconv.Quote(p.name))
	}
	c := &credential{policy: p}
	if scoped {
		c.scope = strings.Split(path, "/")
	}
	return c, nil
}

// checkScope checks that a device-scoped token covers the operation on
// the device id of the path (decoded). The token's resource, decoded once
// as every SAS field is, is compared segment by segment with the route's
// decoded segments, never as a string prefix of the path: hub/devices/x
// covers /devices/x and /twins/x, not /devices/x%2Fy nor the fleet-wide
// POST /devices/query (whose path looks like a device's). hub/twins/x
// covers /twins/x only. Any other resource below the hub covers nothing.
func checkScope(c *credential, op *operation, deviceID string) *apiError {
	if c.scope == nil {
		return nil
	}
	refuse := func() *apiError {
		return unauthorized(reasonOutOfScope, fmt.Sprintf("the token is scoped to %q, which does not cover %s of device %q",
			strings.Join(c.scope, "/"), op.name, deviceID))
	}
	if len(c.scope) != 2 || op.scope == scopeNone || deviceID == "" || c.scope[1] != deviceID {
		return refuse()
	}
	switch {
	case strings.EqualFold(c.scope[0], "devices"):
		return nil
	case strings.EqualFold(c.scope[0], "twins") && op.scope == scopeTwin:
		return nil
	}
	return refuse()
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
	return unauthorized(reasonMissingRight, fmt.Sprintf("shared access policy %q may not %s: that needs the right %s",
		p.name, op.what, strings.ReplaceAll(joinRights(op.rights), ",", " or ")))
}
