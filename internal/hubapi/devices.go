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
// ones for those left empty. It is 409 DeviceAlreadyExists when a twin
// has the id. If the keys cannot be stored the twin is deleted again.
func (h *Handler) createDevice(ctx context.Context, req *request) (reply, *apiError) {
	in, aerr := h.readDevice(req)
	if aerr != nil {
		return reply{}, aerr
	}
	id := req.deviceID
	if _, aerr := h.resolve(ctx, id); aerr == nil {
		return reply{}, errorf(http.StatusConflict, CodeDeviceAlreadyExists, fmt.Sprintf("device %q already exists", id))
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
		return reply{}, fromAPI("creating the device's DeviceTwin", err)
	}
	if aerr := h.writeKeys(ctx, t, in.primary, in.secondary); aerr != nil {
		// Leave nothing half-made: the twin goes, and its Secret with it.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if err := h.opts.Client.Delete(dctx, t, client.Preconditions{UID: &t.UID}); err != nil && !apierrors.IsNotFound(err) {
			h.log.Error(err, "deleting the DeviceTwin of a device whose keys could not be stored", "deviceId", id, "twin", client.ObjectKeyFromObject(t).String())
		}
		return reply{}, aerr
	}
	t = h.awaitWrite(ctx, t, false)
	return reply{status: http.StatusOK, body: h.device(t, in.primary, in.secondary)}, nil
}

// nameTaken explains why the twin name of a new device is in use.
func (h *Handler) nameTaken(ctx context.Context, t *v1alpha1.DeviceTwin, id string) *apiError {
	other := &v1alpha1.DeviceTwin{}
	err := h.opts.APIReader.Get(ctx, client.ObjectKeyFromObject(t), other)
	if err == nil && other.EffectiveDeviceID() == id {
		return errorf(http.StatusConflict, CodeDeviceAlreadyExists, fmt.Sprintf("device %q already exists", id))
	}
	msg := fmt.Sprintf("the DeviceTwin %s/%s that device %q would get exists", t.Namespace, t.Name, id)
	if err == nil {
		msg += fmt.Sprintf(" and belongs to device %q", other.EffectiveDeviceID())
	}
	return errorf(http.StatusConflict, CodeConflict, msg)
}

// errSecretTaken is a key Secret that is not the twin's.
var errSecretTaken = errors.New("secret taken")

// writeKeys makes the twin's key Secret (<twin>-device-key, controlled by
// the twin and labelled kubetwin.io/device-keys=true, the same Secret the
// operator keeps) hold the keys and the device's connection string. The
// operator may create that Secret first, with keys of its own: it is then
// updated, and the operator keeps the keys it finds there.
func (h *Handler) writeKeys(ctx context.Context, t *v1alpha1.DeviceTwin, primary, secondary string) *apiError {
	key := types.NamespacedName{Namespace: t.Namespace, Name: v1alpha1.KeySecretName(t.Name)}
	want := map[string][]byte{
		v1alpha1.PrimaryKeyKey:   []byte(primary),
		v1alpha1.SecondaryKeyKey: []byte(secondary),
		v1alpha1.ConnectionStringKey: []byte(sas.ConnectionString{
			HostName: h.opts.HubHostname, DeviceID: t.EffectiveDeviceID(), SharedAccessKey: primary}.String()),
	}
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		s := &corev1.Secret{}
		err := h.opts.APIReader.Get(ctx, key, s)
		switch {
		case apierrors.IsNotFound(err):
			s = &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name}, Type: corev1.SecretTypeOpaque}
			if err := h.labelAndOwn(s, t); err != nil {
				return err
			}
			s.Data = want
			err := h.opts.Client.Create(ctx, s, client.FieldOwner(FieldManager))
			if apierrors.IsAlreadyExists(err) {
				// The operator was first: read it again and update it.
				return apierrors.NewConflict(corev1.Resource("secrets"), key.Name, err)
			}
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
		if sameData(s.Data, data) && s.Labels[v1alpha1.DeviceKeysLabel] == "true" {
			return nil
		}
		s.Data = data
		if err := h.labelAndOwn(s, t); err != nil {
			return err
		}
		err = h.opts.Client.Update(ctx, s, client.FieldOwner(FieldManager))
		if apierrors.IsNotFound(err) {
			// Deleted meanwhile (by the garbage collector): create it.
			return apierrors.NewConflict(corev1.Resource("secrets"), key.Name, err)
		}
		return err
	})
	switch {
	case err == nil:
		return nil
	case errors.Is(err, errSecretTaken):
		return errorf(http.StatusConflict, CodeConflict, fmt.Sprintf(
			"the Secret %s that holds the keys of device %q exists and is not its DeviceTwin's: delete or rename it", key, t.EffectiveDeviceID()))
	}
	return fromAPI("storing the device's keys", err)
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

// deviceKeys returns the device's keys: those of the Secret
// spec.authentication.secretRef names, else those of its key Secret if
// that is the twin's; "" for a key there is none of. Secrets come from
// the cache; with live, a Secret the cache lacks is read from the API
// server (it may be new, or lack the label the cache selects on).
func (h *Handler) deviceKeys(ctx context.Context, t *v1alpha1.DeviceTwin, live bool) (primary, secondary string, err error) {
	get := func(name string) (*corev1.Secret, error) {
		key := types.NamespacedName{Namespace: t.Namespace, Name: name}
		s := &corev1.Secret{}
		err := h.opts.Reader.Get(ctx, key, s)
		if apierrors.IsNotFound(err) && live {
			err = h.opts.APIReader.Get(ctx, key, s)
		}
		return s, err
	}
	if a := t.Spec.Authentication; a != nil && a.SecretRef != nil {
		s, err := get(a.SecretRef.Name)
		if err == nil {
			return string(s.Data[v1alpha1.PrimaryKeyKey]), string(s.Data[v1alpha1.SecondaryKeyKey]), nil
		}
		if !apierrors.IsNotFound(err) {
			return "", "", err
		}
	}
	s, err := get(v1alpha1.KeySecretName(t.Name))
	switch {
	case apierrors.IsNotFound(err):
		return "", "", nil
	case err != nil:
		return "", "", err
	case !metav1.IsControlledBy(s, t):
		return "", "", nil
	}
	return string(s.Data[v1alpha1.PrimaryKeyKey]), string(s.Data[v1alpha1.SecondaryKeyKey]), nil
}

// device renders a device identity.
func (h *Handler) device(t *v1alpha1.DeviceTwin, primary, secondary string) deviceJSON {
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
		ETag:                       hubtwin.ETag(t.ResourceVersion),
		ConnectionState:            str("connectionState"),
		Status:                     str("status"),
		ConnectionStateUpdatedTime: str("connectionStateUpdatedTime"),
		StatusUpdatedTime:          hubtwin.ZeroTime,
		LastActivityTime:           str("lastActivityTime"),
		Authentication: authenticationJSON{
			SymmetricKey: symmetricKeyJSON{PrimaryKey: optional(primary), SecondaryKey: optional(secondary)},
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
	primary, secondary, err := h.deviceKeys(ctx, t, true)
	if err != nil {
		return reply{}, fromAPI("reading the device's keys", err)
	}
	return reply{status: http.StatusOK, body: h.device(t, primary, secondary)}, nil
}

// listDevices serves GET /devices: the devices in device id order, at most
// MaxListDevices (or ?top=n, if fewer). Where twins share a device id only
// the one that owns it is listed. Keys come from the cache.
func (h *Handler) listDevices(ctx context.Context, req *request) (reply, *apiError) {
	limit := MaxListDevices
	if v := req.r.URL.Query().Get("top"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return reply{}, badRequest(fmt.Sprintf("top: %q is not a whole number from 1 to %d", v, MaxListDevices))
		}
		limit = min(n, MaxListDevices)
	}
	var list v1alpha1.DeviceTwinList
	if err := h.opts.Reader.List(ctx, &list, client.UnsafeDisableDeepCopy); err != nil {
		return reply{}, fromAPI("listing the twins", err)
	}
	owners := deviceOwners(list.Items)
	twins := make([]*v1alpha1.DeviceTwin, 0, len(owners))
	for _, t := range owners {
		twins = append(twins, t)
	}
	slices.SortFunc(twins, func(a, b *v1alpha1.DeviceTwin) int {
		return strings.Compare(a.EffectiveDeviceID(), b.EffectiveDeviceID())
	})
	twins = twins[:min(len(twins), limit)]
	out := make([]deviceJSON, 0, len(twins))
	for _, t := range twins {
		primary, secondary, err := h.deviceKeys(ctx, t, false)
		if err != nil {
			return reply{}, fromAPI("reading the devices' keys", err)
		}
		out = append(out, h.device(t, primary, secondary))
	}
	return reply{status: http.StatusOK, body: out}, nil
}

// deviceOwners returns, for every device id, the twin that owns it among
// those not being deleted.
func deviceOwners(twins []v1alpha1.DeviceTwin) map[string]*v1alpha1.DeviceTwin {
	owners := make(map[string]*v1alpha1.DeviceTwin, len(twins))
	for i := range twins {
		t := &twins[i]
		if !t.DeletionTimestamp.IsZero() {
			continue
		}
		id := t.EffectiveDeviceID()
		if cur, ok := owners[id]; !ok || owns(t, cur) {
			owners[id] = t
		}
	}
	return owners
}

// owns reports whether a owns its device id rather than b: it is older,
// or as old and first by namespace and name (controllers.ResolveDeviceID's
// rule).
func owns(a, b *v1alpha1.DeviceTwin) bool {
	if !a.CreationTimestamp.Equal(&b.CreationTimestamp) {
		return a.CreationTimestamp.Before(&b.CreationTimestamp)
	}
	return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name)) < 0
}

// updateDevice serves PUT /devices/{id} with If-Match ("*" or the device's
// etag): it sets spec.status when the body's status differs, and stores
// the keys of the body that differ from the current ones (empty keys keep
// the current ones). Keys that come from a Secret named by
// spec.authentication.secretRef are changed there, not here.
func (h *Handler) updateDevice(ctx context.Context, req *request) (reply, *apiError) {
	in, aerr := h.readDevice(req)
	if aerr != nil {
		return reply{}, aerr
	}
	pre := parseIfMatch(req.r.Header)
	var t *v1alpha1.DeviceTwin
	for attempt := 0; ; attempt++ {
		base, aerr := h.current(ctx, req.deviceID, pre, attempt > 0)
		if aerr != nil {
			return reply{}, aerr
		}
		t = base
		if in.status == "" || in.status == statusOf(base) {
			break
		}
		patch, _ := json.Marshal(map[string]any{
			"metadata": map[string]string{"resourceVersion": base.ResourceVersion},
			"spec":     map[string]string{"status": string(in.status)},
		})
		obj := &v1alpha1.DeviceTwin{}
		obj.Namespace, obj.Name = base.Namespace, base.Name
		err := h.opts.Client.Patch(ctx, obj, client.RawPatch(types.MergePatchType, patch), client.FieldOwner(FieldManager))
		switch {
		case err == nil:
			t = obj
		case apierrors.IsConflict(err) && pre.any && attempt+1 < maxWriteAttempts:
			continue
		case apierrors.IsConflict(err) && !pre.any:
			return reply{}, preconditionFailed(fmt.Sprintf("the etag %q is not current: the device has changed since it was read", pre.etag))
		case apierrors.IsNotFound(err):
			return reply{}, deviceNotFound(req.deviceID)
		default:
			return reply{}, fromAPI("updating the device", err)
		}
		break
	}

	primary, secondary, err := h.deviceKeys(ctx, t, true)
	if err != nil {
		return reply{}, fromAPI("reading the device's keys", err)
	}
	newPrimary, newSecondary := cmp.Or(in.primary, primary), cmp.Or(in.secondary, secondary)
	if newPrimary != primary || newSecondary != secondary {
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
		if aerr := h.writeKeys(ctx, t, newPrimary, newSecondary); aerr != nil {
			return reply{}, aerr
		}
		primary, secondary = newPrimary, newSecondary
	}
	t = h.awaitWrite(ctx, t, false)
	return reply{status: http.StatusOK, body: h.device(t, primary, secondary)}, nil
}

// statusOf is the twin's device status: spec.status, enabled when unset.
func statusOf(t *v1alpha1.DeviceTwin) v1alpha1.DeviceStatus {
	return cmp.Or(t.Spec.Status, v1alpha1.DeviceEnabled)
}

// deleteDevice serves DELETE /devices/{id} (If-Match "*" or the device's
// etag): the DeviceTwin is deleted, and its key Secret with it (by owner
// reference). The reply is 204, once the cache no longer lists the twin
// (the operator's finalizer may keep it a little longer).
func (h *Handler) deleteDevice(ctx context.Context, req *request) (reply, *apiError) {
	pre := parseIfMatch(req.r.Header)
	t, aerr := h.current(ctx, req.deviceID, pre, false)
	if aerr != nil {
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
		return reply{}, preconditionFailed(fmt.Sprintf("the etag %q is not current: the device has changed since it was read", pre.etag))
	case apierrors.IsConflict(err):
		// Another twin of that name (deleted and created again meanwhile).
		return reply{}, deviceNotFound(req.deviceID)
	case err != nil:
		return reply{}, fromAPI("deleting the device", err)
	}
	h.awaitGone(ctx, key)
	return reply{status: http.StatusNoContent}, nil
}
