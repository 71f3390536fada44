package queryapi_test

import (
	"context"
	"encoding/base64"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/internal/certs"
	"github.com/kubetwin/kubetwin/internal/queryapi/queryapitest"
)

// TestAPIServiceVerifiesOperatorCertificate: the query API serves the
// certificate the operator's certificate manager issues, and the manager
// keeps the APIService's caBundle (clearing insecureSkipTLSVerify), so
// kube-apiserver verifies the server: with another CA in the caBundle the
// query fails, once the manager restores its own the query answers again.
func TestAPIServiceVerifiesOperatorCertificate(t *testing.T) {
	p := startPlane(t)
	ctx := context.Background()
	p.namespace(t, "fleet")
	p.twinFixture(t, "fleet", "hot-1", `{"plant": "Redmond43"}`, `{"telemetry": {"temperature": 95.5}}`, "Connected")
	p.twinFixture(t, "fleet", "cold-1", `{"plant": "Redmond43"}`, `{"telemetry": {"temperature": 20}}`, "")

	// newManager is the operator's manager for the query API (cmd/manager:
	// queryAPICertOptions): the Service's name as kube-apiserver dials it.
	newManager := func(secret, apiService string) (*certs.CertManager, string) {
		t.Helper()
		cm, err := certs.NewCertManager(certs.CertOptions{
			Purpose: "query-api", Client: p.admin, SecretNamespace: queryapitest.ServiceNamespace, SecretName: secret,
			Hosts:          []string{queryapitest.ServiceName + "." + queryapitest.ServiceNamespace + ".svc"},
			APIServiceName: apiService,
		})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cm.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		s := &corev1.Secret{}
		if err := p.admin.Get(ctx, client.ObjectKey{Namespace: queryapitest.ServiceNamespace, Name: secret}, s); err != nil {
			t.Fatal(err)
		}
		return cm, string(s.Data[certs.CABundleKey])
	}
	cm, bundle := newManager("kubetwin-query-api-server-cert", queryapitest.APIServiceName) // the APIService does not exist yet

	// Registered as the chart used to: insecureSkipTLSVerify, no caBundle.
	api, err := queryapitest.Serve(ctx, p.env.Config, queryapitest.Options{GetCertificate: cm.GetCertificate})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = api.Stop(ctx, p.env.Config) })
	alice := p.user(t, "alice", "fleet", createQueries, listTwins)
	if err := hotTwins(ctx, alice); err != nil {
		t.Fatalf("unverified: %v", err)
	}

	if _, err := cm.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	ca, insecure := p.apiServiceTLS(t)
	if ca != bundle || insecure {
		t.Fatalf("after Sync: caBundle %q (want the Secret's ca.crt %q), insecureSkipTLSVerify %v", ca, bundle, insecure)
	}
	eventually(t, "the query answers through the verified APIService", func() error { return hotTwins(ctx, alice) })

	// Another CA of the same form, which did not sign the server's certificate.
	_, other := newManager("other-query-api-cert", "")
	patch := fmt.Sprintf(`{"spec":{"caBundle":%q}}`, base64.StdEncoding.EncodeToString([]byte(other)))
	as := &unstructured.Unstructured{}
	as.SetGroupVersionKind(schema.GroupVersionKind{Group: "apiregistration.k8s.io", Version: "v1", Kind: "APIService"})
	as.SetName(queryapitest.APIServiceName)
	if err := p.admin.Patch(ctx, as, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
		t.Fatal(err)
	}
	var refused error
	eventually(t, "the query fails with the wrong CA", func() error {
		if refused = hotTwins(ctx, alice); refused == nil {
			return fmt.Errorf("answered although the caBundle holds another CA")
		}
		return nil
	})
	t.Logf("with the wrong CA: %v", refused)

	if _, err := cm.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if ca, _ := p.apiServiceTLS(t); ca != bundle {
		t.Fatalf("caBundle not restored: %q", ca)
	}
	eventually(t, "the query answers once the caBundle is restored", func() error { return hotTwins(ctx, alice) })
}

// hotTwins sends a query as the user of cfg and checks its answer.
func hotTwins(ctx context.Context, cfg *rest.Config) error {
	tq, err := post(ctx, cfg, "fleet", "SELECT * FROM devices WHERE properties.reported.telemetry.temperature > 90")
	if err != nil {
		return err
	}
	if len(tq.Status.Twins) != 1 || tq.Status.Twins[0].Name != "hot-1" {
		return fmt.Errorf("answer names twins %+v, want fleet/hot-1", tq.Status.Twins)
	}
	return nil
}

// apiServiceTLS returns the APIService's caBundle (decoded) and whether it
// skips TLS verification.
func (p *plane) apiServiceTLS(t *testing.T) (string, bool) {
	t.Helper()
	as := &unstructured.Unstructured{}
	as.SetGroupVersionKind(schema.GroupVersionKind{Group: "apiregistration.k8s.io", Version: "v1", Kind: "APIService"})
	if err := p.admin.Get(context.Background(), client.ObjectKey{Name: queryapitest.APIServiceName}, as); err != nil {
		t.Fatal(err)
	}
	ca, _, _ := unstructured.NestedString(as.Object, "spec", "caBundle")
	insecure, _, _ := unstructured.NestedBool(as.Object, "spec", "insecureSkipTLSVerify")
	b, err := base64.StdEncoding.DecodeString(ca)
	if err != nil {
		t.Fatalf("caBundle %q: %v", ca, err)
	}
	return string(b), insecure
}

// eventually polls cond until it returns nil, failing after 30 seconds
// (kube-apiserver's proxy picks up an APIService change asynchronously).
func eventually(t *testing.T, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 30s: %v", what, err)
		}
		time.Sleep(100 * time.Millisecond) // polling interval, not synchronisation
	}
}
