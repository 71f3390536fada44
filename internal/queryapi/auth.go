package queryapi

import (
	"context"
	"errors"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apiserver/pkg/authentication/authenticator"
	"k8s.io/apiserver/pkg/authentication/request/headerrequest"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/apiserver/pkg/authorization/authorizerfactory"
	"k8s.io/apiserver/pkg/server/dynamiccertificates"
	"k8s.io/client-go/kubernetes"
)

// Where kube-apiserver publishes how it authenticates to extension API
// servers (its --requestheader-* flags): the front-proxy CA that signs its
// client certificate, the names that certificate may have and the headers
// carrying the user.
const (
	authConfigMapNamespace = "kube-system"
	authConfigMapName      = "extension-apiserver-authentication"
)

// Delegating authenticates and authorizes requests the way an extension
// API server of kube-apiserver does (k8s.io/apiserver's delegating
// authentication and authorization, without the rest of a generic API
// server):
//
//   - a request is from a user only when it carries a client certificate
//     issued by the requestheader CA of the extension-apiserver-authentication
//     ConfigMap, with one of its allowed names (any, when none is listed):
//     kube-apiserver's front-proxy certificate. The user is then the one
//     named by its X-Remote-User, X-Remote-Group and X-Remote-Extra-*
//     headers (the header names come from the ConfigMap too). Any other
//     request is anonymous, and refused.
//   - whether that user may do something is a SubjectAccessReview, cached
//     briefly (allowed for AllowCacheTTL, denied for DenyCacheTTL).
//
// The ConfigMap is watched: a rotated front-proxy CA is picked up.
type Delegating struct {
	authenticator.Request
	authorizer.Authorizer

	ca      *dynamiccertificates.ConfigMapCAController
	headers *headerrequest.RequestHeaderAuthRequestController
}

// Cache lifetimes of SubjectAccessReview answers: long enough that a
// burst of queries costs one review, short enough that a revoked role
// stops working soon.
const (
	AllowCacheTTL = 10 * time.Second
	DenyCacheTTL  = 5 * time.Second
)

// NewDelegating returns the authenticator and authorizer; Run starts them.
// The operator's service account needs to read the ConfigMap (the
// extension-apiserver-authentication-reader Role in kube-system) and to
// create SubjectAccessReviews (system:auth-delegator).
func NewDelegating(kube kubernetes.Interface) (*Delegating, error) {
	ca, err := dynamiccertificates.NewDynamicCAFromConfigMapController("query-api-requestheader",
		authConfigMapNamespace, authConfigMapName, "requestheader-client-ca-file", kube)
	if err != nil {
		return nil, err
	}
	headers := headerrequest.NewRequestHeaderAuthRequestController(authConfigMapName, authConfigMapNamespace, kube,
		"requestheader-username-headers", "requestheader-uid-headers", "requestheader-group-headers",
		"requestheader-extra-headers-prefix", "requestheader-allowed-names")
	authn := headerrequest.NewDynamicVerifyOptionsSecure(ca.VerifyOptions,
		headerrequest.StringSliceProviderFunc(headers.AllowedClientNames),
		headerrequest.StringSliceProviderFunc(headers.UsernameHeaders),
		headerrequest.StringSliceProviderFunc(headers.UIDHeaders),
		headerrequest.StringSliceProviderFunc(headers.GroupHeaders),
		headerrequest.StringSliceProviderFunc(headers.ExtraHeaderPrefixes))
	authz, err := authorizerfactory.DelegatingAuthorizerConfig{
		SubjectAccessReviewClient: kube.AuthorizationV1(),
		AllowCacheTTL:             AllowCacheTTL,
		DenyCacheTTL:              DenyCacheTTL,
		WebhookRetryBackoff:       &wait.Backoff{Duration: 500 * time.Millisecond, Factor: 1.5, Jitter: 0.2, Steps: 5},
	}.New()
	if err != nil {
		return nil, err
	}
	return &Delegating{Request: authn, Authorizer: authz, ca: ca, headers: headers}, nil
}

// Start watches the ConfigMap until ctx ends.
func (d *Delegating) Start(ctx context.Context) {
	go d.ca.Run(ctx, 1)
	go d.headers.Run(ctx, 1)
}

// Ready reports whether the front-proxy CA and the header names are known;
// until they are, every request is refused as unauthenticated.
func (d *Delegating) Ready() bool {
	_, ok := d.ca.VerifyOptions()
	return ok && len(d.headers.UsernameHeaders()) > 0
}

// errNotReady explains a Delegating that never became Ready.
var errNotReady = errors.New("the front-proxy CA and request headers of " + authConfigMapNamespace + "/" + authConfigMapName +
	" are not known: is kube-apiserver run with --requestheader-client-ca-file, and may the operator read that ConfigMap " +
	"(RoleBinding to extension-apiserver-authentication-reader in kube-system)?")
