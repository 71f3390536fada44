package webhook_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	ktcerts "github.com/kubetwin/kubetwin/internal/certs"
	"github.com/kubetwin/kubetwin/internal/twin/twintest"
	"github.com/kubetwin/kubetwin/internal/webhook"
)

const (
	ruleArray  = "arrays are not allowed in device twins"
	allowedIDs = "(allowed: ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ ')"
)

func newNamespace(t *testing.T) string {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "t-"}}
	if err := k8s.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
	return ns.Name
}

// newTwin returns a DeviceTwin with the given device id and sections (raw
// JSON; "" leaves a field unset).
func newTwin(ns, name, id, tags, desired string) *v1alpha1.DeviceTwin {
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	tw.Spec.DeviceID = id
	if tags != "" {
		tw.Spec.Tags = &apiextensionsv1.JSON{Raw: []byte(tags)}
	}
	if desired != "" {
		tw.Spec.Desired = &apiextensionsv1.JSON{Raw: []byte(desired)}
	}
	return tw
}

func getTwin(t *testing.T, ns, name string) (*v1alpha1.DeviceTwin, error) {
	t.Helper()
	tw := &v1alpha1.DeviceTwin{}
	err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, tw)
	return tw, err
}

// cause is a field path and rule a refusal must carry in its details.
type cause struct{ field, rule string }

// expectRefused checks err is a 422 Invalid whose message has every want
// and whose details carry every cause.
func expectRefused(g Gomega, err error, want []string, causes []cause) {
	g.ExpectWithOffset(1, err).To(HaveOccurred(), "the API server accepted it")
	g.ExpectWithOffset(1, apierrors.IsInvalid(err)).To(BeTrue(), "not a 422 Invalid: %v", err)
	for _, w := range want {
		g.ExpectWithOffset(1, err.Error()).To(ContainSubstring(w))
	}
	var se *apierrors.StatusError
	g.ExpectWithOffset(1, errors.As(err, &se)).To(BeTrue())
	for _, c := range causes {
		g.ExpectWithOffset(1, se.ErrStatus.Details).NotTo(BeNil())
		g.ExpectWithOffset(1, se.ErrStatus.Details.Causes).To(ContainElement(metav1.StatusCause{
			Type: metav1.CauseTypeFieldValueInvalid, Field: c.field, Message: c.rule,
		}), "causes of %v", err)
	}
}

// badCreate is a manifest the API server must refuse.
type badCreate struct {
	name string
	twin *v1alpha1.DeviceTwin // namespace filled in by the test
	want []string             // substrings of the message
	// causes are checked for the webhook's refusals (the API server's own
	// schema errors have their own wording).
	causes []cause
}

// webhookCase is a refusal by the validating webhook: the message names
// the path and the rule, and so does the cause.
func webhookCase(name string, tw *v1alpha1.DeviceTwin, path, rule string) badCreate {
	return badCreate{name: name, twin: tw, want: []string{path + ": " + rule}, causes: []cause{{path, rule}}}
}

func badCreates() []badCreate {
	var cases []badCreate
	// The twin rules in spec.desired, with the messages the bridge gives
	// for the same content in a reported patch.
	for i, b := range twintest.BadContent() {
		cases = append(cases, webhookCase("desired: "+b.Name, newTwin("", fmt.Sprintf("desired-%02d", i), "", "", b.JSON), "spec.desired"+b.At, b.Rule))
	}
	// The same rules in spec.tags.
	for i, b := range twintest.BadContent()[:3] {
		cases = append(cases, webhookCase("tags: "+b.Name, newTwin("", fmt.Sprintf("tags-%02d", i), "", b.JSON, ""), "spec.tags"+b.At, b.Rule))
	}
	return append(cases,
		webhookCase("tags: key with ' '", newTwin("", "tags-space", "", `{"site name":"north"}`, ""), "spec.tags", `key "site name" must not contain ' '`),
		webhookCase("desired: key starting with '$'", newTwin("", "dollar-version", "", "", `{"$version":3}`), "spec.desired", `key "$version" must not contain '$'`),
		webhookCase("desired: null", newTwin("", "null-value", "", "", `{"mode":null}`), "spec.desired.mode", "null is only allowed in a patch, where it deletes the key"),
		webhookCase("tags of 8 KB + 1", newTwin("", "tags-8k1", "", twintest.Sized(3, 8193), ""), "spec.tags", "tags is 8193 bytes, more than the 8192 allowed"),
		webhookCase("desired of 32 KB + 1", newTwin("", "desired-32k1", "", "", twintest.Sized(9, 32769)), "spec.desired", "desired is 32769 bytes, more than the 32768 allowed"),
		webhookCase("metadata.name of 129 characters as the device id", newTwin("", strings.Repeat("n", 129), "", "", ""), "metadata.name",
			"device id is 129 characters, more than the 128 allowed (metadata.name is the device id when spec.deviceId is unset; set spec.deviceId)"),
		badCreate{
			name:   "tags and desired both bad: both reported",
			twin:   newTwin("", "both-bad", "", `{"a":[1]}`, `{"b.c":1}`),
			want:   []string{"spec.tags.a: " + ruleArray, `spec.desired: key "b.c" must not contain '.'`},
			causes: []cause{{"spec.tags.a", ruleArray}, {"spec.desired", `key "b.c" must not contain '.'`}},
		},
		// Device ids: the CRD schema refuses them before webhooks run.
		badCreate{name: "device id with '/'", twin: newTwin("", "bad-id-slash", "bay/3", "", ""),
			want: []string{`spec.deviceId: Invalid value: "bay/3": spec.deviceId in body should match`}},
		badCreate{name: "device id with a space", twin: newTwin("", "bad-id-space", "my device", "", ""),
			want: []string{`spec.deviceId: Invalid value: "my device": spec.deviceId in body should match`}},
		badCreate{name: "device id of 129 characters", twin: newTwin("", "bad-id-long", strings.Repeat("d", 129), "", ""),
			want: []string{"spec.deviceId: Too long: may not be more than 128"}},
	)
}

// Every bad manifest is refused with its own message, and nothing is stored.
func TestBadManifestsRefused(t *testing.T) {
	apiServer(t)
	ns := newNamespace(t)
	cases := badCreates()
	if len(cases) < 25 {
		t.Fatalf("only %d bad manifests", len(cases))
	}
	seen := map[string]bool{}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			tw := tc.twin.DeepCopy()
			tw.Namespace = ns
			g.Expect(seen[tw.Name]).To(BeFalse(), "duplicate name %s", tw.Name)
			seen[tw.Name] = true
			err := k8s.Create(context.Background(), tw)
			t.Log(err)
			expectRefused(g, err, tc.want, tc.causes)
			_, err = getTwin(t, ns, tw.Name)
			g.Expect(apierrors.IsNotFound(err)).To(BeTrue(), "stored after all: %v", err)
		})
	}
}

// Content exactly at each limit is accepted and stored as sent.
func TestLimitsAccepted(t *testing.T) {
	apiServer(t)
	ns := newNamespace(t)
	deep10, _ := twintest.Nested(10, `"bottom"`)
	specials := "A-:.+%_#*?!(),=@;$'z"
	cases := map[string]*v1alpha1.DeviceTwin{
		"key of 1024 bytes":     newTwin(ns, "key-1024", "", "", `{"`+strings.Repeat("k", 1024)+`":1}`),
		"10 levels of nesting":  newTwin(ns, "depth-10", "", deep10, deep10),
		"string of 4096 bytes":  newTwin(ns, "string-4096", "", "", `{"s":"`+strings.Repeat("x", 4096)+`"}`),
		"2^52 and -2^52":        newTwin(ns, "int-2-52", "", `{"max":4503599627370496}`, `{"max":4503599627370496,"min":-4503599627370496,"f":1.5}`),
		"tags of 8 KB":          newTwin(ns, "tags-8k", "", twintest.Sized(2, 8192), ""),
		"desired of 32 KB":      newTwin(ns, "desired-32k", "", "", twintest.Sized(8, 32768)),
		"tags and desired full": newTwin(ns, "both-full", "", twintest.Sized(2, 8192), twintest.Sized(8, 32768)),
		"device id of 128":      newTwin(ns, "id-128", strings.Repeat("D", 128), "", ""),
		"every special char":    newTwin(ns, "id-specials", specials, "", ""),
		"name of 128 as the id": newTwin(ns, strings.Repeat("n", 128), "", "", ""),
		"unusual keys":          newTwin(ns, "keys", "", `{"température":"é","a-b_c:d/e#f":true,"emoji😀":"x","empty":{}}`, ""),
		"empty sections":        newTwin(ns, "empty", "", `{}`, `{}`),
		"no spec":               newTwin(ns, "nospec", "", "", ""),
	}
	for name, tw := range cases {
		t.Run(name, func(t *testing.T) {
			g := NewWithT(t)
			sent := tw.DeepCopy()
			g.Expect(k8s.Create(context.Background(), tw)).To(Succeed())
			got, err := getTwin(t, ns, tw.Name)
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(jsonOf(got.Spec.Tags)).To(Equal(jsonOf(sent.Spec.Tags)))
			g.Expect(jsonOf(got.Spec.Desired)).To(Equal(jsonOf(sent.Spec.Desired)))
			g.Expect(got.EffectiveDeviceID()).To(Equal(sent.EffectiveDeviceID()))
		})
	}
}

// jsonOf decodes an optional JSON field for comparison (numbers exact).
func jsonOf(j *apiextensionsv1.JSON) any {
	if j == nil {
		return "<unset>"
	}
	dec := json.NewDecoder(strings.NewReader(string(j.Raw)))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return err.Error()
	}
	return v
}

// Bad updates are refused and leave the twin as it was.
func TestBadUpdatesRefused(t *testing.T) {
	apiServer(t)
	ns := newNamespace(t)
	ctx := context.Background()
	g := NewWithT(t)
	g.Expect(k8s.Create(ctx, newTwin(ns, "pump", "pump-7", `{"site":"north"}`, `{"mode":"eco"}`))).To(Succeed())
	gen := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, GenerateName: "gen-"}}
	g.Expect(k8s.Create(ctx, gen)).To(Succeed())
	g.Expect(gen.Spec.DeviceID).To(BeEmpty(), "a generated name is not known to the defaulting webhook")

	cases := []struct {
		name, twin, patch string
		want              []string
		causes            []cause
	}{
		{"array in desired", "pump", `{"spec":{"desired":{"telemetry":{"intervals":[10,20]}}}}`,
			[]string{"spec.desired.telemetry.intervals: " + ruleArray}, []cause{{"spec.desired.telemetry.intervals", ruleArray}}},
		{"forbidden key in tags", "pump", `{"spec":{"tags":{"site.name":"x"}}}`,
			[]string{`spec.tags: key "site.name" must not contain '.'`}, []cause{{"spec.tags", `key "site.name" must not contain '.'`}}},
		{"desired over 32 KB", "pump", `{"spec":{"desired":{"mode":null,` + twintest.Sized(9, 32769)[1:] + `}}`,
			[]string{"spec.desired: desired is 32769 bytes, more than the 32768 allowed"}, []cause{{"spec.desired", "desired is 32769 bytes, more than the 32768 allowed"}}},
		{"changing the device id", "pump", `{"spec":{"deviceId":"pump-8"}}`,
			[]string{"spec.deviceId is immutable"}, nil},
		{"removing the device id", "pump", `{"spec":{"deviceId":null}}`,
			[]string{"spec.deviceId is immutable"}, nil},
		{"setting a device id other than the name", gen.Name, `{"spec":{"deviceId":"other"}}`,
			[]string{"spec.deviceId is immutable (it may only be set to metadata.name when it was unset)"}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			before, err := getTwin(t, ns, tc.twin)
			g.Expect(err).NotTo(HaveOccurred())
			err = k8s.Patch(ctx, before.DeepCopy(), client.RawPatch(types.MergePatchType, []byte(tc.patch)))
			expectRefused(g, err, tc.want, tc.causes)
			after, err := getTwin(t, ns, tc.twin)
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(after.ResourceVersion).To(Equal(before.ResourceVersion), "the twin changed")
		})
	}

	// Good updates pass, including setting the device id of a generated
	// twin to its name.
	for _, p := range []string{`{"spec":{"desired":{"mode":"boost","limits":{"max":4503599627370496}}}}`, `{"spec":{"tags":{"site":null,"floor":3}}}`} {
		g.Expect(k8s.Patch(ctx, newTwin(ns, "pump", "", "", ""), client.RawPatch(types.MergePatchType, []byte(p)))).To(Succeed())
	}
	g.Expect(k8s.Patch(ctx, gen.DeepCopy(), client.RawPatch(types.MergePatchType, []byte(`{"spec":{"deviceId":"`+gen.Name+`"}}`)))).To(Succeed())
}

// The defaulting webhook makes spec.deviceId explicit on create, and a
// server-side apply user who leaves it out does not fight it.
func TestDeviceIDDefaulted(t *testing.T) {
	apiServer(t)
	ns := newNamespace(t)
	ctx := context.Background()
	g := NewWithT(t)

	g.Expect(k8s.Create(ctx, newTwin(ns, "plain", "", "", ""))).To(Succeed())
	tw, err := getTwin(t, ns, "plain")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(tw.Spec.DeviceID).To(Equal("plain"))

	g.Expect(k8s.Create(ctx, newTwin(ns, "explicit", "Pump:7", "", ""))).To(Succeed())
	tw, _ = getTwin(t, ns, "explicit")
	g.Expect(tw.Spec.DeviceID).To(Equal("Pump:7"))

	apply := func(tags string) error {
		u := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "kubetwin.io/v1alpha1", "kind": "DeviceTwin",
			"metadata": map[string]any{"name": "applied", "namespace": ns},
			"spec":     map[string]any{"tags": map[string]any{"site": tags}},
		}}
		return k8s.Apply(ctx, client.ApplyConfigurationFromUnstructured(u), client.FieldOwner("gitops"), client.ForceOwnership)
	}
	g.Expect(apply("north")).To(Succeed())
	tw, _ = getTwin(t, ns, "applied")
	g.Expect(tw.Spec.DeviceID).To(Equal("applied"))
	for _, mf := range tw.ManagedFields {
		if mf.Manager == "gitops" {
			g.Expect(mf.FieldsV1.GetRawString()).NotTo(ContainSubstring("deviceId"), "the applier owns the defaulted field")
		}
	}
	// Applying again without spec.deviceId neither removes it nor fails.
	g.Expect(apply("south")).To(Succeed())
	tw, _ = getTwin(t, ns, "applied")
	g.Expect(tw.Spec.DeviceID).To(Equal("applied"))
	g.Expect(jsonOf(tw.Spec.Tags)).To(Equal(map[string]any{"site": "south"}))
}

// The operator's own service account is not subject to the webhook (its
// label and finalizer writes must never be blocked), status writes never
// go through it, and a twin stored before the webhook (here: by the
// operator) can still be changed where it is valid.
func TestExemptionsAndRatcheting(t *testing.T) {
	apiServer(t)
	ns := newNamespace(t)
	ctx := context.Background()
	g := NewWithT(t)

	crb := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "operator-"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "cluster-admin"},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: "kubetwin-system", Name: "kubetwin-controller-manager"}},
	}
	g.Expect(k8s.Create(ctx, crb)).To(Succeed())
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), crb) })
	cfg := rest.CopyConfig(restConfig)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: operatorUser}
	operator, err := client.New(cfg, client.Options{Scheme: testScheme})
	g.Expect(err).NotTo(HaveOccurred())

	// The operator's writes skip the webhook (RBAC may take a moment).
	g.Eventually(func() error {
		return operator.Create(ctx, newTwin(ns, "legacy", "", `{"site":"north"}`, `{"telemetry":{"intervals":[1,2]}}`))
	}, wait, tick).Should(Succeed())
	tw, err := getTwin(t, ns, "legacy")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(tw.Spec.DeviceID).To(BeEmpty(), "the operator's create went through the defaulting webhook")

	// Anyone else: metadata and the valid section may change (ratcheting)...
	patch := func(p string) error {
		return k8s.Patch(ctx, newTwin(ns, "legacy", "", "", ""), client.RawPatch(types.MergePatchType, []byte(p)))
	}
	g.Expect(patch(`{"metadata":{"labels":{"team":"ops"}}}`)).To(Succeed())
	g.Expect(patch(`{"spec":{"tags":{"site":"south"}}}`)).To(Succeed())
	// ...but a change to the invalid section must make it valid.
	err = patch(`{"spec":{"desired":{"telemetry":{"intervals":[1,2,3]}}}}`)
	expectRefused(g, err, []string{"spec.desired.telemetry.intervals: " + ruleArray}, nil)
	g.Expect(patch(`{"spec":{"desired":{"telemetry":{"intervals":null,"every":10}}}}`)).To(Succeed())

	// Status is not checked by the webhook (the rules name devicetwins only).
	tw, _ = getTwin(t, ns, "legacy")
	tw.Status.Reported = &apiextensionsv1.JSON{Raw: []byte(`{"list":[1,2]}`)}
	g.Expect(k8s.Status().Update(ctx, tw)).To(Succeed())
}

// The API server trusts the webhook only through the caBundle the
// CertManager injected: with another CA there, calls fail; a sync puts it
// back.
func TestCABundleInjected(t *testing.T) {
	apiServer(t)
	ns := newNamespace(t)
	ctx := context.Background()
	g := NewWithT(t)

	bundle := certSecretData(t)[ktcerts.CABundleKey]
	v := &admissionregistrationv1.ValidatingWebhookConfiguration{}
	g.Expect(k8s.Get(ctx, client.ObjectKey{Name: configName}, v)).To(Succeed())
	m := &admissionregistrationv1.MutatingWebhookConfiguration{}
	g.Expect(k8s.Get(ctx, client.ObjectKey{Name: configName}, m)).To(Succeed())
	g.Expect(v.Webhooks[0].ClientConfig.CABundle).To(Equal(bundle))
	g.Expect(m.Webhooks[0].ClientConfig.CABundle).To(Equal(bundle))
	g.Expect(*v.Webhooks[0].ClientConfig.URL).To(Equal(webhookURL + webhook.ValidatePath))
	g.Expect(*m.Webhooks[0].ClientConfig.URL).To(Equal(webhookURL + webhook.DefaultPath))
	g.Expect(bundle).NotTo(Equal(env.WebhookInstallOptions.LocalServingCAData), "envtest's CA is still there")
	g.Expect(k8s.Create(ctx, newTwin(ns, "trusted", "", "", `{"a":1}`))).To(Succeed())

	// Someone puts envtest's CA back: the API server no longer trusts the
	// operator's certificate, and with failurePolicy Fail the write fails.
	v.Webhooks[0].ClientConfig.CABundle = env.WebhookInstallOptions.LocalServingCAData
	g.Expect(k8s.Update(ctx, v)).To(Succeed())
	g.Eventually(func() string {
		err := k8s.Create(ctx, newTwin(ns, "untrusted", "", "", ""))
		if err == nil {
			_ = k8s.Delete(ctx, newTwin(ns, "untrusted", "", "", ""))
			return ""
		}
		return err.Error()
	}, wait, tick).Should(And(ContainSubstring("failed calling webhook"), ContainSubstring("x509")))
	_, err := getTwin(t, ns, "untrusted")
	g.Expect(apierrors.IsNotFound(err)).To(BeTrue())

	_, err = certs.Sync(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(k8s.Get(ctx, client.ObjectKey{Name: configName}, v)).To(Succeed())
	g.Expect(v.Webhooks[0].ClientConfig.CABundle).To(Equal(bundle))
	g.Eventually(func() error { return k8s.Create(ctx, newTwin(ns, "trusted-again", "", "", "")) }, wait, tick).Should(Succeed())
}

// When the serving certificate is due, the CertManager's loop replaces it,
// the webhook server picks up the new files without a restart, and the API
// server keeps trusting it.
func TestServingCertificateRotation(t *testing.T) {
	apiServer(t)
	ns := newNamespace(t)
	ctx := context.Background()
	g := NewWithT(t)

	if certClock.Now().After(time.Now().Add(time.Minute)) {
		t.Skip("rotated once in this process already (-count > 1): another rotation would issue a certificate not yet valid in real time")
	}
	first, err := servedCertificate()
	g.Expect(err).NotTo(HaveOccurred())
	// 2/3 of the lifetime: 40 minutes after issue (90 minutes plus the
	// hour of backdating), so the new certificate is valid in real time.
	renew := first.NotBefore.Add(first.NotAfter.Sub(first.NotBefore) * 2 / 3)
	certClock.SetTime(renew)

	g.Eventually(func(g Gomega) {
		c, err := servedCertificate()
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(c.SerialNumber).NotTo(Equal(first.SerialNumber))
	}, 30*time.Second, 200*time.Millisecond).Should(Succeed())
	g.Expect(k8s.Create(ctx, newTwin(ns, "after-rotation", "", "", `{"a":1}`))).To(Succeed())
	err = k8s.Create(ctx, newTwin(ns, "bad-after-rotation", "", "", `{"a":[1]}`))
	expectRefused(g, err, []string{"spec.desired.a: " + ruleArray}, nil)
}
