// Package webhook holds the DeviceTwin admission webhooks.
//
// The validating webhook refuses a DeviceTwin whose spec.tags or
// spec.desired break the twin rules (package twin, the same checks and
// messages the MQTT bridge applies to reported patches), whose device id is
// not an IoT Hub device id, or whose device id changes. Refusals are 422
// Invalid errors whose causes carry the field path and the rule, so kubectl
// prints e.g.
//
//	spec.desired.telemetry.intervals: arrays are not allowed in device twins
//
// The CRD schema and its CEL rule already check the spec.deviceId pattern,
// length and immutability; the API server runs them before validating
// webhooks, so for spec.deviceId the webhook is a second line. What only the
// webhook can say is the recursive document rules and that metadata.name,
// when it serves as the device id, is too long.
//
// On update the webhook ratchets: a section (tags, desired) or device id
// that did not change is not checked again, so objects stored before the
// webhook existed can still get labels, finalizers and fixes to the other
// section.
//
// A device id is unique per hub: on create the validating webhook takes
// the id's DeviceIDClaim for the new twin (package deviceid), and refuses
// the twin when another live twin holds the id, naming it:
//
//	spec.deviceId: device id "X" is already held by DeviceTwin ns/name
//
// Two concurrent creates race on creating one claim, so exactly one wins.
// A dry-run create only checks (sideEffects: NoneOnDryRun).
//
// The defaulting webhook sets spec.deviceId to metadata.name on create when
// it is unset (and the name is a valid device id). See docs/admission.md
// for the failure policy and for how this plays with server-side apply.
//
// The CertManager of package internal/certs issues and rotates the serving
// certificate and keeps the caBundle of the webhook configurations current.
package webhook

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"gomodules.xyz/jsonpatch/v2"
	admissionv1 "k8s.io/api/admission/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	crwebhook "sigs.k8s.io/controller-runtime/pkg/webhook"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// Paths the webhooks are served at; config/webhook/manifests.yaml points
// the API server at them.
const (
	ValidatePath = "/validate-kubetwin-io-v1alpha1-devicetwin"
	DefaultPath  = "/mutate-kubetwin-io-v1alpha1-devicetwin"
)

// Register serves v as the validating webhook and the defaulting webhook
// on srv, and the TwinConfiguration validating webhook.
func Register(srv crwebhook.Server, scheme *runtime.Scheme, v Validator) {
	srv.Register(ValidatePath, admission.WithValidator[*v1alpha1.DeviceTwin](scheme, v))
	srv.Register(DefaultPath, &admission.Webhook{Handler: &Defaulter{decoder: admission.NewDecoder(scheme)}})
	srv.Register(ValidateConfigurationPath, admission.WithValidator[*v1alpha1.TwinConfiguration](scheme, ConfigurationValidator{}))
}

// Validator is the validating webhook for DeviceTwins.
type Validator struct {
	// Claims takes the device id of a new twin; nil checks no uniqueness.
	Claims *deviceid.Claims
	// Namespace, when set, is the only namespace whose twins this hub
	// serves (--namespace): twins elsewhere claim no id here.
	Namespace string
	// SecretRefs refuses a spec.authentication.secretRef to a Secret that
	// may not give keys (secretref.go).
	SecretRefs SecretRefs
}

var _ admission.Validator[*v1alpha1.DeviceTwin] = Validator{}

// ValidateCreate refuses a new twin that breaks the rules or whose device
// id another twin holds, and otherwise makes it the holder.
func (v Validator) ValidateCreate(ctx context.Context, t *v1alpha1.DeviceTwin) (admission.Warnings, error) {
	if err := Invalid(t, append(Validate(nil, t), v.SecretRefs.errs(ctx, nil, t)...)); err != nil {
		return nil, err
	}
	return nil, v.claim(ctx, t)
}

// claim takes t's device id (only checks, on dry run).
func (v Validator) claim(ctx context.Context, t *v1alpha1.DeviceTwin) error {
	if v.Claims == nil || (v.Namespace != "" && t.Namespace != v.Namespace) {
		return nil
	}
	var err error
	if req, rerr := admission.RequestFromContext(ctx); rerr == nil && req.DryRun != nil && *req.DryRun {
		err = v.Claims.Check(ctx, t)
	} else {
		err = v.Claims.Claim(ctx, t)
	}
	var held *deviceid.HeldError
	if errors.As(err, &held) {
		return Invalid(t, []*twin.Error{{Path: "spec.deviceId", Rule: held.Error()}})
	}
	if err != nil {
		return apierrors.NewInternalError(fmt.Errorf("claiming device id %q: %w", t.EffectiveDeviceID(), err))
	}
	return nil
}

// ValidateUpdate refuses a change that breaks the rules or the device id,
// or a new secretRef to a Secret that may not give keys.
func (v Validator) ValidateUpdate(ctx context.Context, old, t *v1alpha1.DeviceTwin) (admission.Warnings, error) {
	return nil, Invalid(t, append(Validate(old, t), v.SecretRefs.errs(ctx, old, t)...))
}

// ValidateDelete allows every deletion (the webhook is not registered for
// DELETE).
func (Validator) ValidateDelete(context.Context, *v1alpha1.DeviceTwin) (admission.Warnings, error) {
	return nil, nil
}

// Validate returns the rules t breaks, at most one per part (device id,
// tags, desired), each with its field path. old is the stored twin on
// update and nil on create; parts equal to old's are not checked again.
func Validate(old, t *v1alpha1.DeviceTwin) []*twin.Error {
	var errs []*twin.Error
	add := func(err error) {
		if err == nil {
			return
		}
		var e *twin.Error
		if !errors.As(err, &e) {
			e = &twin.Error{Rule: err.Error()}
		}
		errs = append(errs, e)
	}
	switch {
	case old != nil && old.EffectiveDeviceID() != t.EffectiveDeviceID():
		add(&twin.Error{Path: "spec.deviceId", Rule: fmt.Sprintf(
			"the device id is immutable: it is %q (spec.deviceId, else metadata.name)", old.EffectiveDeviceID())})
	case t.Spec.DeviceID != "":
		if old == nil || old.Spec.DeviceID != t.Spec.DeviceID {
			add(twin.ValidateDeviceID("spec.deviceId", t.Spec.DeviceID))
		}
	case old == nil && t.Name != "":
		if err := twin.ValidateDeviceID("metadata.name", t.Name); err != nil {
			var e *twin.Error
			errors.As(err, &e)
			add(&twin.Error{Path: e.Path, Rule: e.Rule + " (metadata.name is the device id when spec.deviceId is unset; set spec.deviceId)"})
		}
	}
	if old == nil || !sameJSON(old.Spec.Tags, t.Spec.Tags) {
		_, err := twin.ParseSection(twin.Tags, "spec.tags", raw(t.Spec.Tags))
		add(err)
	}
	if old == nil || !sameJSON(old.Spec.Desired, t.Spec.Desired) {
		_, err := twin.ParseSection(twin.Desired, "spec.desired", raw(t.Spec.Desired))
		add(err)
	}
	return errs
}

// Invalid returns nil for no errors, else the 422 Invalid error the API
// server passes on to the client: its message lists "path: rule" for each
// error and its causes carry the field paths, as for the API server's own
// validation.
func Invalid(t *v1alpha1.DeviceTwin, errs []*twin.Error) error {
	return invalid("DeviceTwin", t.Name, errs)
}

// invalid is Invalid for an object of any kind of the group.
func invalid(kind, name string, errs []*twin.Error) error {
	if len(errs) == 0 {
		return nil
	}
	causes := make([]metav1.StatusCause, len(errs))
	msgs := make([]string, len(errs))
	for i, e := range errs {
		causes[i] = metav1.StatusCause{Type: metav1.CauseTypeFieldValueInvalid, Field: e.Path, Message: e.Rule}
		msgs[i] = e.Error()
	}
	msg := msgs[0]
	if len(msgs) > 1 {
		msg = "[" + strings.Join(msgs, ", ") + "]"
	}
	gk := v1alpha1.GroupVersion.WithKind(kind).GroupKind()
	return &apierrors.StatusError{ErrStatus: metav1.Status{
		Status:  metav1.StatusFailure,
		Code:    http.StatusUnprocessableEntity,
		Reason:  metav1.StatusReasonInvalid,
		Message: fmt.Sprintf("%s %q is invalid: %s", gk.String(), name, msg),
		Details: &metav1.StatusDetails{Group: gk.Group, Kind: gk.Kind, Name: name, Causes: causes},
	}}
}

func raw(j *apiextensionsv1.JSON) []byte {
	if j == nil {
		return nil
	}
	return j.Raw
}

// sameJSON reports whether two optional JSON fields hold the same bytes.
// The API server encodes the old and the new object the same way, so equal
// content gives equal bytes; a false "changed" only costs a check.
func sameJSON(a, b *apiextensionsv1.JSON) bool {
	return string(raw(a)) == string(raw(b))
}

// Defaulter is the defaulting webhook: on create it sets spec.deviceId to
// metadata.name when spec.deviceId is unset and the name is a valid device
// id, with one JSON patch operation and nothing else. A name generated from
// metadata.generateName is not known yet when mutating webhooks run, so
// such twins keep an unset spec.deviceId (their device id is still their
// name).
type Defaulter struct {
	decoder admission.Decoder
}

// Handle answers one admission request.
func (d *Defaulter) Handle(_ context.Context, req admission.Request) admission.Response {
	if req.Operation != admissionv1.Create {
		return admission.Allowed("")
	}
	t := &v1alpha1.DeviceTwin{}
	if err := d.decoder.Decode(req, t); err != nil {
		return admission.Errored(http.StatusBadRequest, err)
	}
	if t.Spec.DeviceID != "" || t.Name == "" || twin.ValidateDeviceID("", t.Name) != nil {
		return admission.Allowed("")
	}
	var top struct {
		Spec json.RawMessage `json:"spec"`
	}
	if err := json.Unmarshal(req.Object.Raw, &top); err != nil {
		return admission.Errored(http.StatusBadRequest, err)
	}
	if s := strings.TrimSpace(string(top.Spec)); s == "" || s == "null" {
		return admission.Patched("", jsonpatch.NewOperation("add", "/spec", map[string]any{"deviceId": t.Name}))
	}
	return admission.Patched("", jsonpatch.NewOperation("add", "/spec/deviceId", t.Name))
}
