package hubapi

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// deviceJSON is IoT Hub's device identity, as the registry API returns it.
type deviceJSON struct {
	DeviceID                   string             `json:"deviceId"`
	GenerationID               string             `json:"generationId"`
	ETag                       string             `json:"etag"`
	ConnectionState            string             `json:"connectionState"`
	Status                     string             `json:"status"`
	StatusReason               *string            `json:"statusReason"`
	ConnectionStateUpdatedTime string             `json:"connectionStateUpdatedTime"`
	StatusUpdatedTime          string             `json:"statusUpdatedTime"`
	LastActivityTime           string             `json:"lastActivityTime"`
	CloudToDeviceMessageCount  int                `json:"cloudToDeviceMessageCount"`
	Authentication             authenticationJSON `json:"authentication"`
	Capabilities               capabilitiesJSON   `json:"capabilities"`
}

type authenticationJSON struct {
	SymmetricKey   symmetricKeyJSON `json:"symmetricKey"`
	X509Thumbprint thumbprintJSON   `json:"x509Thumbprint"`
	Type           string           `json:"type"`
}

type symmetricKeyJSON struct {
	PrimaryKey   *string `json:"primaryKey"`
	SecondaryKey *string `json:"secondaryKey"`
}

type thumbprintJSON struct {
	PrimaryThumbprint   *string `json:"primaryThumbprint"`
	SecondaryThumbprint *string `json:"secondaryThumbprint"`
}

type capabilitiesJSON struct {
	IotEdge bool `json:"iotEdge"`
}

// deviceInput is what a PUT /devices/{id} body may say. Everything else
// the SDKs send (generationId, etag, connectionState...) is ignored.
type deviceInput struct {
	DeviceID       *string `json:"deviceId"`
	Status         string  `json:"status"`
	Authentication *struct {
		Type         string            `json:"type"`
		SymmetricKey *symmetricKeyJSON `json:"symmetricKey"`
		// X509Thumbprint must hold no thumbprint.
		X509Thumbprint *thumbprintJSON `json:"x509Thumbprint"`
	} `json:"authentication"`
	Capabilities *capabilitiesJSON `json:"capabilities"`
}

// deviceRequest is a checked PUT /devices/{id} body.
type deviceRequest struct {
	// status is "enabled", "disabled" or "" (create: enabled; update: keep).
	status v1alpha1.DeviceStatus
	// primary and secondary are the keys asked for, "" for none (create:
	// generate; update: keep).
	primary, secondary string
}

// readDevice reads and checks the body of PUT /devices/{id}.
func (h *Handler) readDevice(req *request) (deviceRequest, *apiError) {
	data, aerr := h.readBody(req)
	if aerr != nil {
		return deviceRequest{}, aerr
	}
	var in deviceInput
	if err := json.Unmarshal(data, &in); err != nil {
		return deviceRequest{}, badRequest("the request body is not a device: " + err.Error())
	}
	if in.DeviceID != nil && *in.DeviceID != "" && *in.DeviceID != req.deviceID {
		return deviceRequest{}, badRequest(fmt.Sprintf("deviceId: %q does not match the device id of the path %q", *in.DeviceID, req.deviceID))
	}
	var out deviceRequest
	switch v1alpha1.DeviceStatus(in.Status) {
	case "", v1alpha1.DeviceEnabled, v1alpha1.DeviceDisabled:
		out.status = v1alpha1.DeviceStatus(in.Status)
	default:
		return deviceRequest{}, badRequest(fmt.Sprintf("status: %q is not a device status (enabled or disabled)", in.Status))
	}
	if c := in.Capabilities; c != nil && c.IotEdge {
		return deviceRequest{}, badRequest("capabilities.iotEdge: IoT Edge devices are not supported")
	}
	if a := in.Authentication; a != nil {
		if a.Type != "" && a.Type != hubtwin.AuthenticationTypeSAS {
			return deviceRequest{}, badRequest(fmt.Sprintf("authentication.type: %q is not supported: devices authenticate with symmetric keys (sas)", a.Type))
		}
		if x := a.X509Thumbprint; x != nil && (deref(x.PrimaryThumbprint) != "" || deref(x.SecondaryThumbprint) != "") {
			return deviceRequest{}, badRequest("authentication.x509Thumbprint: X.509 authentication is not supported: devices authenticate with symmetric keys (sas)")
		}
		if k := a.SymmetricKey; k != nil {
			out.primary, out.secondary = strings.TrimSpace(deref(k.PrimaryKey)), strings.TrimSpace(deref(k.SecondaryKey))
			for _, f := range []struct{ name, key string }{{"primaryKey", out.primary}, {"secondaryKey", out.secondary}} {
				if f.key == "" {
					continue
				}
				if _, err := sas.DecodeKey(f.key); err != nil {
					return deviceRequest{}, badRequest("authentication.symmetricKey." + f.name + ": " + err.Error())
				}
			}
		}
	}
	return out, nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// createDevice serves PUT /devices/{id} without If-Match: it creates the
// device's DeviceTwin in Options.Namespace (named by [TwinName], with
// spec.deviceId the id) and its key Secret with the keys given, or new
// ones for those left empty. It is 409 DeviceAlreadyExists when a twin in
// any namespace holds the id (ids are unique per hub): seen in the cache
// first, and as the admission webhook's refusal when the cache is behind
// or two creates race. If the keys cannot be stored the twin is deleted
// again.
func (h *Handler) createDevice(ctx context.Context, req *request) (reply, *apiError) {
	in, aerr := h.readDevice(req)
	if aerr != nil {
		return reply{}, aerr
	}
	id := req.deviceID
	if other, aerr := h.holder(ctx, id); aerr == nil {
		return reply{}, h.alreadyExists(id, other.Namespace, other.Name)
	} else if aerr.code != CodeDeviceNotFound {
		return reply{}, aerr
	}
	if in.primary == "" {
		in.primary = sas.NewKey()
	}
	if in.secondary == "" {
		in.secondary = sas.NewKey()
	}
	if in.status == "" {
		in.status = v1alpha1.DeviceEnabled
	}
	t := &v1alpha1.DeviceTwin{
		ObjectMeta: metav1.ObjectMeta{Namespace: h.opts.Namespace, Name: TwinName(id)},
		Spec:       v1alpha1.DeviceTwinSpec{DeviceID: id, Status: in.status},
	}
	if err := h.opts.Client.Create(ctx, t, client.FieldOwner(FieldManager)); err != nil {
		if apierrors.IsAlreadyExists(err) {
			return reply{}, h.nameTaken(ctx, t, id)
		}
		if ns, name, ok := heldBy(err); ok {
			return reply{}, h.alreadyExists(id, ns, name)
		}
		return reply{}, fromAPI("creating the device's DeviceTwin", err)
	}
	version, aerr := h.writeKeys(ctx, t, in.primary, in.secondary, nil)
	if aerr != nil {
		// Leave nothing half-made: the twin goes, and its Secret with it.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if err := h.opts.Client.Delete(dctx, t, client.Preconditions{UID: &t.UID}); err != nil && !apierrors.IsNotFound(err) {
			h.log.Error(err, "deleting the DeviceTwin of a device whose keys could not be stored", "deviceId", id, "twin", client.ObjectKeyFromObject(t).String())
		}
		return reply{}, aerr
	}
	t = h.awaitWrite(ctx, t, false)
	h.awaitKeys(ctx, t, version)
	h.awaitHolder(ctx, t)
	return reply{status: http.StatusOK, body: h.device(t, deviceKeySet{in.primary, in.secondary, version})}, nil
}

// alreadyExists is the 409 for a device id that the DeviceTwin ns/name
// holds. The holder is named only when it is in the served namespace:
// the caller may see nothing outside it.
func (h *Handler) alreadyExists(id, ns, name string) *apiError {
	msg := fmt.Sprintf("device %q already exists (its id is held by DeviceTwin %s/%s)", id, ns, name)
	if ns != h.opts.Namespace {
		msg = fmt.Sprintf("device %q already exists: its id is held by a DeviceTwin outside namespace %s, which this hub serves (device ids are unique per hub)",
			id, h.opts.Namespace)
	}
	return errorf(http.StatusConflict, CodeDeviceAlreadyExists, msg)
}

// heldByText is the admission webhook's refusal of a device id another
// twin holds: `spec.deviceId: device id "X" is already held by DeviceTwin
// ns/name`.
const heldByText = " is already held by DeviceTwin "

// heldBy reads the holder ns/name from an API error that refuses a
// DeviceTwin because another twin holds its device id.
func heldBy(err error) (ns, name string, ok bool) {
	_, rest, found := strings.Cut(apiMessage(err), heldByText)
	if !found {
		return "", "", false
	}
	ref, _, _ := strings.Cut(rest, " ")
	ns, name, ok = strings.Cut(strings.TrimRight(ref, ".,;]\"\n"), "/")
	return ns, name, ok && ns != "" && name != ""
}

// nameTaken explains why the twin name of a new device is in use.
func (h *Handler) nameTaken(ctx context.Context, t *v1alpha1.DeviceTwin, id string) *apiError {
	other := &v1alpha1.DeviceTwin{}
	err := h.opts.APIReader.Get(ctx, client.ObjectKeyFromObject(t), other)
	if err == nil && other.EffectiveDeviceID() == id {
		return h.alreadyExists(id, other.Namespace, other.Name)
	}
	msg := fmt.Sprintf("the DeviceTwin %s/%s that device %q would get exists", t.Namespace, t.Name, id)
	if err == nil {
		msg += fmt.Sprintf(" and belongs to device %q", other.EffectiveDeviceID())
	}
	return errorf(http.StatusConflict, CodeConflict, msg)
}

var (
	// errSecretTaken is a key Secret that is not the twin's.
	errSecretTaken = errors.New("secret taken")
	// errKeysChanged is a key Secret that is not at the version a
	// precondition names.
	errKeysChanged = errors.New("keys changed")
)

// writeKeys makes the twin's key Secret (<twin>-device-key, controlled by
// the twin and labelled kubetwin.io/device-keys=true, the same Secret the
// operator keeps) hold the keys and the device's connection string, and
// returns the Secret's new resourceVersion. The operator may create that
// Secret first, with keys of its own: it is then updated, and the operator
// keeps the keys it finds there.
//
// With ifVersion (from an If-Match etag) the write happens only if the
// Secret is still at that resourceVersion ("": there is none), and is
// preconditioned on it, so of two concurrent rotations from the same etag
// one fails with 412.
func (h *Handler) writeKeys(ctx context.Context, t *v1alpha1.DeviceTwin, primary, secondary string, ifVersion *string) (string, *apiError) {
	key := types.NamespacedName{Namespace: t.Namespace, Name: v1alpha1.KeySecretName(t.Name)}
	want := map[string][]byte{
		v1alpha1.PrimaryKeyKey:   []byte(primary),
		v1alpha1.SecondaryKeyKey: []byte(secondary),
		v1alpha1.ConnectionStringKey: []byte(sas.ConnectionString{
			HostName: h.opts.HubHostname, DeviceID: t.EffectiveDeviceID(), SharedAccessKey: primary}.String()),
	}
	version := ""
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		s := &corev1.Secret{}
		err := h.opts.APIReader.Get(ctx, key, s)
		if ifVersion != nil && (err == nil || apierrors.IsNotFound(err)) && managedVersion(s, t) != *ifVersion {
			return errKeysChanged
		}
		switch {
		case apierrors.IsNotFound(err):
			s = &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name}, Type: corev1.SecretTypeOpaque}
			if err := h.labelAndOwn(s, t); err != nil {
				return err
			}
			s.Data = want
			err := h.opts.Client.Create(ctx, s, client.FieldOwner(FieldManager))
			switch {
			case apierrors.IsAlreadyExists(err) && ifVersion != nil:
				return errKeysChanged
			case apierrors.IsAlreadyExists(err):
				// The operator was first: read it again and update it.
				return apierrors.NewConflict(corev1.Resource("secrets"), key.Name, err)
			}
			version = s.ResourceVersion
			return err
		case err != nil:
			return err
		case !metav1.IsControlledBy(s, t):
			if !staleOwner(s, t) {
				return errSecretTaken
			}
			// Left by a deleted twin of the same name that the garbage
			// collector has not removed yet: it is this twin's now.
			s.OwnerReferences = slices.DeleteFunc(s.OwnerReferences, func(r metav1.OwnerReference) bool {
				return r.Controller != nil && *r.Controller
			})
		}
		data := make(map[string][]byte, len(s.Data)+len(want))
		for k, v := range s.Data {
			data[k] = v
		}
		for k, v := range want {
			data[k] = v
		}
		if sameData(s.Data, data) && managedVersion(s, t) != "" {
			version = s.ResourceVersion
			return nil
		}
		s.Data = data
		if err := h.labelAndOwn(s, t); err != nil {
			return err
		}
		// The update carries the resourceVersion read: a concurrent
		// write makes it fail.
		err = h.opts.Client.Update(ctx, s, client.FieldOwner(FieldManager))
		switch {
		case (apierrors.IsConflict(err) || apierrors.IsNotFound(err)) && ifVersion != nil:
			return errKeysChanged
		case apierrors.IsNotFound(err):
			// Deleted meanwhile (by the garbage collector): create it.
			return apierrors.NewConflict(corev1.Resource("secrets"), key.Name, err)
		}
		version = s.ResourceVersion
		return err
	})
	switch {
	case err == nil:
		return version, nil
	case errors.Is(err, errKeysChanged):
		return "", keysChanged(t.EffectiveDeviceID())
	case errors.Is(err, errSecretTaken):
		return "", errorf(http.StatusConflict, CodeConflict, fmt.Sprintf(
			"the Secret %s that holds the keys of device %q exists and is not its DeviceTwin's: delete or rename it", key, t.EffectiveDeviceID()))
	}
	return "", fromAPI("storing the device's keys", err)
}

// keysChanged is the 412 for an etag whose keys are not current.
func keysChanged(id string) *apiError {
	return preconditionFailed(fmt.Sprintf("the etag is not current: the keys of device %q have changed since it was read", id))
}

// managedVersion is the resourceVersion of s if it is t's managed key
// Secret (labelled kubetwin.io/device-keys=true and controlled by t), ""
// for any other Secret: only that Secret's keys are the device's.
func managedVersion(s *corev1.Secret, t *v1alpha1.DeviceTwin) string {
	if s.Labels[v1alpha1.DeviceKeysLabel] != "true" || !metav1.IsControlledBy(s, t) {
		return ""
	}
	return s.ResourceVersion
}

// staleOwner reports whether s is controlled by an earlier DeviceTwin of
// t's name (another UID): that twin is gone, as t has its name.
func staleOwner(s *corev1.Secret, t *v1alpha1.DeviceTwin) bool {
	ref := metav1.GetControllerOfNoCopy(s)
	return ref != nil && ref.Kind == "DeviceTwin" && ref.APIVersion == v1alpha1.GroupVersion.String() &&
		ref.Name == t.Name && ref.UID != t.UID
}

// labelAndOwn labels s as a device-key Secret controlled by t.
func (h *Handler) labelAndOwn(s *corev1.Secret, t *v1alpha1.DeviceTwin) error {
	if s.Labels == nil {
		s.Labels = map[string]string{}
	}
	s.Labels[v1alpha1.DeviceKeysLabel] = "true"
	s.Labels["app.kubernetes.io/managed-by"] = "kubetwin"
	return controllerutil.SetControllerReference(t, s, h.opts.Client.Scheme())
}

// deviceKeySet is what a client may learn of a device's keys.
type deviceKeySet struct {
	// primary and secondary are the keys, "" for none.
	primary, secondary string
	// version is the resourceVersion of the key Secret ("" for none): part
	// of the device's etag, so that If-Match covers the keys.
	version string
}

// deviceKeys returns the device's keys from its managed key Secret
// (<twin>-device-key, labelled kubetwin.io/device-keys=true and
// controlled by the twin); none when there is no such Secret. Never from
// the Secret spec.authentication.secretRef names: a twin editor can point
// that at any Secret of the namespace, and the operator copies the keys
// of an allowed one into the managed Secret anyway. The Secret comes from
// the cache; with live, one the cache lacks is read from the API server
// (it may be new).
func (h *Handler) deviceKeys(ctx context.Context, t *v1alpha1.DeviceTwin, live bool) (deviceKeySet, error) {
	key := types.NamespacedName{Namespace: t.Namespace, Name: v1alpha1.KeySecretName(t.Name)}
	s := &corev1.Secret{}
	err := h.opts.Reader.Get(ctx, key, s)
	if apierrors.IsNotFound(err) && live {
		err = h.opts.APIReader.Get(ctx, key, s)
	}
	switch {
	case apierrors.IsNotFound(err):
		return deviceKeySet{}, nil
	case err != nil:
		return deviceKeySet{}, err
	case managedVersion(s, t) == "":
		return deviceKeySet{}, nil
	}
	return deviceKeySet{primary: string(s.Data[v1alpha1.PrimaryKeyKey]), secondary: string(s.Data[v1alpha1.SecondaryKeyKey]),
		version: s.ResourceVersion}, nil
}

// liveKeyVersion is the resourceVersion of the twin's managed key Secret
// on the API server, "" when there is none.
func (h *Handler) liveKeyVersion(ctx context.Context, t *v1alpha1.DeviceTwin) (string, *apiError) {
	s := &corev1.Secret{}
	err := h.opts.APIReader.Get(ctx, types.NamespacedName{Namespace: t.Namespace, Name: v1alpha1.KeySecretName(t.Name)}, s)
	switch {
	case apierrors.IsNotFound(err):
		return "", nil
	case err != nil:
		return "", fromAPI("reading the device's keys", err)
	}
	return managedVersion(s, t), nil
}

// awaitKeys waits, at most Options.CacheWait, until the cache holds the
// twin's key Secret at version or newer, so a GET after the reply shows
// the keys (and etag) written.
func (h *Handler) awaitKeys(ctx context.Context, t *v1alpha1.DeviceTwin, version string) {
	if h.opts.CacheWait < 0 || version == "" {
		return
	}
	key := types.NamespacedName{Namespace: t.Namespace, Name: v1alpha1.KeySecretName(t.Name)}
	h.poll(ctx, h.opts.CacheWait, func() bool {
		s := &corev1.Secret{}
		return h.opts.Reader.Get(ctx, key, s) == nil && atLeast(s.ResourceVersion, version)
	})
}

// awaitHolder waits, at most Options.CacheWait, until the id of the new
// twin t resolves to it (its claim, made at admission or by the operator,
// is in the cache), so a GET after the reply finds the device.
func (h *Handler) awaitHolder(ctx context.Context, t *v1alpha1.DeviceTwin) {
	if h.opts.CacheWait < 0 {
		return
	}
	h.poll(ctx, h.opts.CacheWait, func() bool {
		got, err := h.opts.Resolve(ctx, t.EffectiveDeviceID())
		return err == nil && got != nil && got.UID == t.UID
	})
}

// deviceETag is a device's etag: it covers the twin and its key Secret,
// so an If-Match on PUT /devices/{id} fails when either changed.
func deviceETag(twinVersion, keysVersion string) string {
	return hubtwin.ETag(twinVersion + "/" + keysVersion)
}

// devicePrecondition is what an If-Match header on /devices/{id} asks
// for: the twin's resourceVersion (in precondition) and the key Secret's.
type devicePrecondition struct {
	precondition
	keysVersion string
}

// parseDeviceIfMatch reads If-Match for a device. A twin's etag (from
// GET /twins) is not a device's: it matches nothing.
func parseDeviceIfMatch(hdr http.Header) devicePrecondition {
	p := parseIfMatch(hdr)
	if p.any || p.rv == "" {
		return devicePrecondition{precondition: p}
	}
	twinVersion, keysVersion, ok := strings.Cut(p.rv, "/")
	if !ok {
		p.rv = ""
		return devicePrecondition{precondition: p}
	}
	p.rv = twinVersion
	return devicePrecondition{precondition: p, keysVersion: keysVersion}
}

// deviceMismatch rewrites a 412 of the twin's precondition for a device.
func (p devicePrecondition) deviceMismatch(aerr *apiError) *apiError {
	if aerr == nil || aerr.code != CodePreconditionFailed {
		return aerr
	}
	if p.rv == "" {
		return preconditionFailed(fmt.Sprintf("If-Match %q is not an etag of this device: read the device (GET /devices/{id}) for its etag, or send \"*\"", p.etag))
	}
	return preconditionFailed(fmt.Sprintf("the etag %q is not current: the device has changed since it was read", p.etag))
}

// checkKeys fails with 412 when the key Secret is not at the version the
// etag names.
func (h *Handler) checkKeys(ctx context.Context, t *v1alpha1.DeviceTwin, p devicePrecondition) *apiError {
	if p.any {
		return nil
	}
	v, aerr := h.liveKeyVersion(ctx, t)
	if aerr != nil {
		return aerr
	}
	if v != p.keysVersion {
		return keysChanged(t.EffectiveDeviceID())
	}
	return nil
}

// device renders a device identity.
func (h *Handler) device(t *v1alpha1.DeviceTwin, keys deviceKeySet) deviceJSON {
	optional := func(s string) *string {
		if s == "" {
			return nil
		}
		return &s
	}
	doc := hubtwin.FromDeviceTwin(t)
	str := func(k string) string { s, _ := doc[k].(string); return s }
	return deviceJSON{
		DeviceID:                   str("deviceId"),
		GenerationID:               string(t.UID),
		ETag:                       deviceETag(t.ResourceVersion, keys.version),
		ConnectionState:            str("connectionState"),
		Status:                     str("status"),
		ConnectionStateUpdatedTime: str("connectionStateUpdatedTime"),
		StatusUpdatedTime:          hubtwin.ZeroTime,
		LastActivityTime:           str("lastActivityTime"),
		Authentication: authenticationJSON{
			SymmetricKey: symmetricKeyJSON{PrimaryKey: optional(keys.primary), SecondaryKey: optional(keys.secondary)},
			Type:         hubtwin.AuthenticationTypeSAS,
		},
	}
}

// getDevice serves GET /devices/{id}: the device identity with its keys.
func (h *Handler) getDevice(ctx context.Context, req *request) (reply, *apiError) {
	t, aerr := h.resolve(ctx, req.deviceID)
	if aerr != nil {
		return reply{}, aerr
	}
	keys, err := h.deviceKeys(ctx, t, true)
	if err != nil {
		return reply{}, fromAPI("reading the device's keys", err)
	}
	return reply{status: http.StatusOK, body: h.device(t, keys)}, nil
}

// listDevices serves GET /devices: the devices of the served namespace in
// device id order, at most MaxListDevices (or ?top=n, if fewer). Only
// twins that hold their device id are listed. Keys come from the cache.
func (h *Handler) listDevices(ctx context.Context, req *request) (reply, *apiError) {
	limit := MaxListDevices
	if v := req.r.URL.Query().Get("top"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return reply{}, badRequest(fmt.Sprintf("top: %q is not a whole number from 1 to %d", v, MaxListDevices))
		}
		limit = min(n, MaxListDevices)
	}
	all, err := h.opts.Twins(ctx, h.opts.Namespace)
	if err != nil {
		return reply{}, fromAPI("listing the twins", err)
	}
	byID := func(a, b *v1alpha1.DeviceTwin) int {
		return cmp.Or(strings.Compare(a.EffectiveDeviceID(), b.EffectiveDeviceID()),
			strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	}
	var twins []*v1alpha1.DeviceTwin
	for t := range inOrder(all, byID, limit+16) {
		if len(twins) == limit {
			break
		}
		if h.holds(ctx, t) {
			twins = append(twins, t)
		}
	}
	out := make([]deviceJSON, 0, len(twins))
	for _, t := range twins {
		keys, err := h.deviceKeys(ctx, t, false)
		if err != nil {
			return reply{}, fromAPI("reading the devices' keys", err)
		}
		out = append(out, h.device(t, keys))
	}
	return reply{status: http.StatusOK, body: out}, nil
}

// updateDevice serves PUT /devices/{id} with If-Match ("*" or the device's
// etag, which covers the twin and its keys): it stores the keys of the body
// that differ from the current ones (empty keys keep the current ones),
// then sets spec.status when the body's status differs. Each write is
// preconditioned on the version the etag names, so of two updates from
// the same etag one fails with 412 PreconditionFailed. The two objects
// cannot change atomically: an update of keys and status whose status
// write fails has stored the keys. Keys that come from a Secret named by
// spec.authentication.secretRef are changed there, not here.
func (h *Handler) updateDevice(ctx context.Context, req *request) (reply, *apiError) {
	in, aerr := h.readDevice(req)
	if aerr != nil {
		return reply{}, aerr
	}
	pre := parseDeviceIfMatch(req.r.Header)
	t, aerr := h.current(ctx, req.deviceID, pre.precondition, false)
	if aerr != nil {
		return reply{}, pre.deviceMismatch(aerr)
	}

	keys, err := h.deviceKeys(ctx, t, true)
	if err != nil {
		return reply{}, fromAPI("reading the device's keys", err)
	}
	newPrimary, newSecondary := cmp.Or(in.primary, keys.primary), cmp.Or(in.secondary, keys.secondary)
	if newPrimary != keys.primary || newSecondary != keys.secondary {
		if a := t.Spec.Authentication; a != nil && a.SecretRef != nil {
			return reply{}, badRequest(fmt.Sprintf("authentication.symmetricKey: the keys of device %q come from the Secret %s (spec.authentication.secretRef): change them there",
				req.deviceID, a.SecretRef.Name))
		}
		if newPrimary == "" {
			newPrimary = sas.NewKey()
		}
		if newSecondary == "" {
			newSecondary = sas.NewKey()
		}
		var ifVersion *string
		if !pre.any {
			ifVersion = &pre.keysVersion
		}
		version, aerr := h.writeKeys(ctx, t, newPrimary, newSecondary, ifVersion)
		if aerr != nil {
			return reply{}, aerr
		}
		keys = deviceKeySet{newPrimary, newSecondary, version}
	} else if aerr := h.checkKeys(ctx, t, pre); aerr != nil {
		return reply{}, aerr
	}

	for attempt := 0; in.status != "" && in.status != statusOf(t); attempt++ {
		patch, _ := json.Marshal(map[string]any{
			"metadata": map[string]string{"resourceVersion": t.ResourceVersion},
			"spec":     map[string]string{"status": string(in.status)},
		})
		obj := &v1alpha1.DeviceTwin{}
		obj.Namespace, obj.Name = t.Namespace, t.Name
		err := h.opts.Client.Patch(ctx, obj, client.RawPatch(types.MergePatchType, patch), client.FieldOwner(FieldManager))
		switch {
		case err == nil:
			t = obj
		case apierrors.IsConflict(err) && pre.any && attempt+1 < maxWriteAttempts:
			if t, aerr = h.current(ctx, req.deviceID, pre.precondition, true); aerr != nil {
				return reply{}, aerr
			}
			continue
		case apierrors.IsConflict(err) && !pre.any:
			return reply{}, pre.deviceMismatch(preconditionFailed(""))
		case apierrors.IsNotFound(err):
			return reply{}, deviceNotFound(req.deviceID)
		default:
			return reply{}, fromAPI("updating the device", err)
		}
		break
	}
	t = h.awaitWrite(ctx, t, false)
	h.awaitKeys(ctx, t, keys.version)
	return reply{status: http.StatusOK, body: h.device(t, keys)}, nil
}

// statusOf is the twin's device status: spec.status, enabled when unset.
func statusOf(t *v1alpha1.DeviceTwin) v1alpha1.DeviceStatus {
	return cmp.Or(t.Spec.Status, v1alpha1.DeviceEnabled)
}

// deleteDevice serves DELETE /devices/{id} (If-Match "*" or the device's
// etag, of the twin and its keys): the DeviceTwin is deleted, and its key Secret with it (by owner
// reference). The reply is 204, once the cache no longer lists the twin
// (the operator's finalizer may keep it a little longer).
func (h *Handler) deleteDevice(ctx context.Context, req *request) (reply, *apiError) {
	pre := parseDeviceIfMatch(req.r.Header)
	t, aerr := h.current(ctx, req.deviceID, pre.precondition, false)
	if aerr != nil {
		return reply{}, pre.deviceMismatch(aerr)
	}
	if aerr := h.checkKeys(ctx, t, pre); aerr != nil {
		return reply{}, aerr
	}
	key := client.ObjectKeyFromObject(t)
	uid := t.UID
	cond := client.Preconditions{UID: &uid}
	if !pre.any {
		rv := pre.rv
		cond.ResourceVersion = &rv
	}
	obj := &v1alpha1.DeviceTwin{}
	obj.Namespace, obj.Name = key.Namespace, key.Name
	err := h.opts.Client.Delete(ctx, obj, cond)
	switch {
	case apierrors.IsNotFound(err):
		return reply{}, deviceNotFound(req.deviceID)
	case apierrors.IsConflict(err) && !pre.any:
		return reply{}, pre.deviceMismatch(preconditionFailed(""))
	case apierrors.IsConflict(err):
		// Another twin of that name (deleted and created again meanwhile).
		return reply{}, deviceNotFound(req.deviceID)
	case err != nil:
		return reply{}, fromAPI("deleting the device", err)
	}
	h.awaitGone(ctx, key)
	return reply{status: http.StatusNoContent}, nil
}
