package hubapi

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// secretReader serves one Secret; while gate is set, Get waits for it to
// be closed.
type secretReader struct {
	client.Reader
	mu     sync.Mutex
	secret *corev1.Secret
	gate   chan struct{}
}

func (r *secretReader) Get(ctx context.Context, _ client.ObjectKey, obj client.Object, _ ...client.GetOption) error {
	r.mu.Lock()
	gate, s := r.gate, r.secret.DeepCopy()
	r.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	s.DeepCopyInto(obj.(*corev1.Secret))
	return nil
}

func (r *secretReader) set(s *corev1.Secret, gate chan struct{}) {
	r.mu.Lock()
	r.secret, r.gate = s, gate
	r.mu.Unlock()
}

func policySecretData(key string) *corev1.Secret {
	return &corev1.Secret{Data: map[string][]byte{"p.primaryKey": []byte(key), "p.rights": []byte("ServiceConnect")}}
}

// TestPolicyStoreRereadWaitsForRunningRead: a request whose signature does
// not verify against the copy waits for the read under way (a stale copy
// started it) rather than take the copy that lacks the new key, even when
// the copy is younger than minRefetch.
func TestPolicyStoreRereadWaitsForRunningRead(t *testing.T) {
	const keyA, keyB = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=", "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA="
	rd := &secretReader{}
	v1 := policySecretData(keyA)
	v1.ResourceVersion = "1"
	rd.set(v1, nil)
	now := time.Now()
	var clockMu sync.Mutex
	s := &policyStore{reader: rd, key: types.NamespacedName{Namespace: "ns", Name: "p"}, ttl: 200 * time.Millisecond,
		timeout: 10 * time.Second, log: logr.Discard(), now: func() time.Time { clockMu.Lock(); defer clockMu.Unlock(); return now }}
	ctx := context.Background()
	if set, err := s.get(ctx); err != nil || set.version != "1" {
		t.Fatalf("first get = %+v, %v", set, err)
	}

	clockMu.Lock()
	now = now.Add(500 * time.Millisecond) // stale (ttl), but younger than minRefetch
	clockMu.Unlock()
	v2 := policySecretData(keyB)
	v2.ResourceVersion = "2"
	gate := make(chan struct{})
	rd.set(v2, gate)
	if set, err := s.get(ctx); err != nil || set.version != "1" {
		t.Fatalf("get of a stale copy = %+v, %v; want the copy at once", set, err)
	}
	got := make(chan *policySet, 1)
	go func() {
		set, err := s.reread(ctx)
		if err != nil {
			t.Error(err)
		}
		got <- set
	}()
	select {
	case set := <-got:
		t.Fatalf("reread returned version %q while a read was under way, want it to wait for the new copy", set.version)
	case <-time.After(200 * time.Millisecond):
	}
	close(gate)
	if set := <-got; set == nil || set.version != "2" {
		t.Fatalf("reread = %+v, want version 2", set)
	}
}
