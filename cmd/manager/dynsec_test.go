package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
)

// TestDynsecKeyKeptAcrossStarts: the first start makes the Secret with a
// random key, later starts (and another replica) read the same key; a
// Secret with a too-short key is refused with an error naming it, and left
// as it is.
func TestDynsecKeyKeptAcrossStarts(t *testing.T) {
	ctx := context.Background()
	c := fake.NewClientBuilder().Build()
	first, err := loadDynsecKey(ctx, c, c, "hub")
	if err != nil {
		t.Fatal(err)
	}
	if len(first) != 32 {
		t.Fatalf("key of %d bytes, want 32", len(first))
	}
	again, err := loadDynsecKey(ctx, c, c, "hub")
	if err != nil || !bytes.Equal(again, first) {
		t.Fatalf("second start: %x, %v; want the first key %x", again, err, first)
	}
	other, err := loadDynsecKey(ctx, c, c, "other")
	if err != nil || bytes.Equal(other, first) {
		t.Fatalf("another claims namespace: %x, %v; want a key of its own", other, err)
	}

	bad := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "short", Name: dynsecKeySecret},
		Data: map[string][]byte{dynsecKeyField: []byte("tiny")}}
	c = fake.NewClientBuilder().WithObjects(bad).Build()
	_, err = loadDynsecKey(ctx, c, c, "short")
	if err == nil || !strings.Contains(err.Error(), "short/kubetwin-dynsec-fingerprint") || !strings.Contains(err.Error(), `"key" is 4 bytes long`) {
		t.Fatalf("too-short key: %v", err)
	}
	var s corev1.Secret
	if err := c.Get(ctx, types.NamespacedName{Namespace: "short", Name: dynsecKeySecret}, &s); err != nil || string(s.Data[dynsecKeyField]) != "tiny" {
		t.Errorf("the refused Secret was changed: %v %q", err, s.Data[dynsecKeyField])
	}
}
