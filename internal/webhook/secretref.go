package webhook

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/deviceauth"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// SecretRefs refuses early a spec.authentication.secretRef that names a
// Secret no twin may take keys from (deviceauth.CheckSecretRef: another
// twin's key Secret, or one without the device-keys label). It sees
// Secrets through Reader, the manager's cache, which holds only labelled
// ones: a Secret it cannot see is let through, and the controller, the
// real guard, reports it (SecretNotFound, SecretRefNotAllowed) and takes
// no key from it.
type SecretRefs struct {
	// Reader reads Secrets; nil checks nothing.
	Reader client.Reader
}

// Check returns the error of t's secretRef, or nil. old is the stored
// twin on update: a reference that did not change is not checked again.
func (s SecretRefs) Check(ctx context.Context, old, t *v1alpha1.DeviceTwin) *twin.Error {
	ref := secretRefName(t)
	if s.Reader == nil || ref == "" || (old != nil && secretRefName(old) == ref) {
		return nil
	}
	sec := &corev1.Secret{}
	if err := s.Reader.Get(ctx, types.NamespacedName{Namespace: t.Namespace, Name: ref}, sec); err != nil {
		return nil // not visible here, or the cache failed: the controller decides
	}
	if err := deviceauth.CheckSecretRef(sec); err != nil {
		return &twin.Error{Path: "spec.authentication.secretRef.name", Rule: err.Error()}
	}
	return nil
}

// errs is Check's error as a list for Invalid.
func (s SecretRefs) errs(ctx context.Context, old, t *v1alpha1.DeviceTwin) []*twin.Error {
	if err := s.Check(ctx, old, t); err != nil {
		return []*twin.Error{err}
	}
	return nil
}

func secretRefName(t *v1alpha1.DeviceTwin) string {
	if a := t.Spec.Authentication; a != nil && a.SecretRef != nil {
		return a.SecretRef.Name
	}
	return ""
}
