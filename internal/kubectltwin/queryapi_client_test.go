package kubectltwin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apiserver/pkg/authentication/authenticator"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/client-go/rest"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/queryapi"
	"github.com/kubetwin/kubetwin/internal/queryapi/wire"
	"github.com/kubetwin/kubetwin/internal/twinscan/twinscantest"
)

// olderSpec is TwinQuerySpec before answers in parts: an operator of then
// refuses spec.paged as an unknown field.
type olderSpec struct {
	Query string `json:"query"`
}

// TestQueryAPIExecuteParts runs QueryAPI.Execute against the query API's
// handler, over a fleet whose SELECT * is larger than the handler's bound,
// and against the same handler behind an operator older than parts:
//   - a current operator is asked for parts from the first request, so
//     no request is refused and answered again, and the answer is whole,
//     in deviceId order;
//   - an older operator refuses spec.paged: the SELECT * is asked for
//     again without it, and its refusal as too large is the error (the
//     command then lists); an answer within its bound is taken as it is.
func TestQueryAPIExecuteParts(t *testing.T) {
	fleet := twinscantest.Fleet(300)
	ctx := context.Background()
	h := queryapi.NewHandler(queryapi.Options{
		Twins: func(context.Context, string) ([]*v1alpha1.DeviceTwin, error) { return fleet, nil },
		Authenticator: authenticator.RequestFunc(func(*http.Request) (*authenticator.Response, bool, error) {
			return &authenticator.Response{User: &user.DefaultInfo{Name: "alice"}}, true, nil
		}),
		Authorizer: authorizer.AuthorizerFunc(func(context.Context, authorizer.Attributes) (authorizer.Decision, string, error) {
			return authorizer.DecisionAllow, "", nil
		}),
		MaxResponseBytes: 64 << 10, // about 50 twins of this fleet
		Log:              logr.Discard(),
	})
	var requests, refused atomic.Int32
	older := false
	failAt := int32(0) // the request to fail with 500 (0: none)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := requests.Add(1)
		body, _ := io.ReadAll(r.Body)
		if n == failAt && r.Method == http.MethodPost {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		if older {
			var tq struct {
				metav1.TypeMeta   `json:",inline"`
				metav1.ObjectMeta `json:"metadata,omitempty"`
				Spec              olderSpec            `json:"spec"`
				Status            wire.TwinQueryStatus `json:"status"`
			}
			dec := json.NewDecoder(bytes.NewReader(body))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&tq); err != nil {
				refused.Add(1)
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusBadRequest)
				_ = json.NewEncoder(w).Encode(metav1.Status{TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"},
					Status: metav1.StatusFailure, Code: http.StatusBadRequest, Reason: metav1.StatusReasonBadRequest,
					Message: `the request body must be a TwinQuery {"apiVersion": "` + wire.GroupVersion + `", "kind": "TwinQuery", "spec": {"query": "SELECT ..."}}: ` + err.Error()})
				return
			}
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		h.ServeHTTP(w, r)
	}))
	defer srv.Close()
	api, err := NewQueryAPI(&rest.Config{Host: srv.URL}, wire.Group)
	if err != nil {
		t.Fatal(err)
	}
	execute := func(text string) (*Answer, error) {
		t.Helper()
		q, err := query.Parse(text)
		if err != nil {
			t.Fatal(err)
		}
		requests.Store(0)
		refused.Store(0)
		return api.Execute(ctx, "scale", q)
	}

	ans, err := execute("SELECT * FROM devices")
	if err != nil {
		t.Fatal(err)
	}
	if len(ans.Items) != len(fleet) || len(ans.Twins) != len(fleet) {
		t.Fatalf("%d items and %d twins, want %d", len(ans.Items), len(ans.Twins), len(fleet))
	}
	for i, tw := range ans.Twins {
		if tw.Name != fleet[i].Name || tw.Doc["deviceId"] != fleet[i].Status.DeviceID {
			t.Fatalf("item %d is %s (%v), want %s", i, tw.Name, tw.Doc["deviceId"], fleet[i].Name)
		}
	}
	if ans.Parts < 3 || int(requests.Load()) != ans.Parts {
		t.Errorf("the answer took %d requests for %d parts; want at least 3 parts, one request each", requests.Load(), ans.Parts)
	}

	// Streamed to a sink: the same items, part by part; a part that fails
	// after the sink has written items is an error that says so, and the
	// command does not list (executeAPI returns it as it is).
	var got []json.RawMessage
	api.KeepRaw = true
	api.Sink = func(items []json.RawMessage) error {
		got = append(got, items...)
		return nil
	}
	ans, err = execute("SELECT * FROM devices")
	if err != nil || ans.Streamed != len(fleet) || len(got) != len(fleet) || ans.Raw != nil || ans.Items != nil {
		t.Fatalf("streamed: %v; %d streamed, the sink took %d of %d", err, ans.Streamed, len(got), len(fleet))
	}
	for i, raw := range got {
		var doc struct{ DeviceID string }
		if err := json.Unmarshal(raw, &doc); err != nil || doc.DeviceID != fleet[i].Status.DeviceID {
			t.Fatalf("streamed item %d: %s (%v), want %s", i, raw, err, fleet[i].Status.DeviceID)
		}
	}
	got, failAt = nil, 4 // after two discovery requests and the first part
	q, _ := query.Parse("SELECT * FROM devices")
	requests.Store(0)
	_, why, err := executeAPI(ctx, &rest.Config{Host: srv.URL}, "scale", q, api.Sink)
	var after *afterOutputError
	if !errors.As(err, &after) || len(got) == 0 || why != "" {
		t.Errorf("a part failing after the sink took %d items: error %v (%T), why %q; want an *afterOutputError", len(got), err, err, why)
	}
	got, failAt = nil, 1
	requests.Store(0)
	_, err = api.Execute(ctx, "scale", q)
	if err == nil || errors.As(err, &after) || len(got) != 0 {
		t.Errorf("the first part failing: error %v (%T), the sink took %d items; want a plain error and none", err, err, len(got))
	}
	failAt, api.KeepRaw, api.Sink = 0, false, nil

	older = true
	_, err = execute("SELECT * FROM devices")
	if got := apierrors.ReasonForError(err); got != wire.ReasonResponseTooLarge || refused.Load() != 1 || requests.Load() != 2 {
		t.Errorf("older operator, an answer over its bound: %d requests, %d refused, error %v; want the second refused as %s",
			requests.Load(), refused.Load(), err, wire.ReasonResponseTooLarge)
	}
	ans, err = execute("SELECT TOP 10 * FROM devices")
	if err != nil || len(ans.Items) != 10 || ans.Parts != 1 || requests.Load() != 2 {
		t.Errorf("older operator, TOP 10: %v, %d requests, error %v; want 10 items in one part, the second request", ans, requests.Load(), err)
	}
}
