package controllers

import (
	"bytes"
	"slices"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// equalStatus is equality.Semantic.DeepEqual on statuses (times compared as
// instants, nil and empty slices alike) without its reflection, which
// allocated some 1.6 KB per reconcile. TestEqualStatusAsSemanticDeepEqual
// keeps the two in step, and fails when a field is added.
func equalStatus(a, b v1alpha1.DeviceTwinStatus) bool {
	return a.DeviceID == b.DeviceID &&
		equalJSON(a.Reported, b.Reported) &&
		a.ReportedVersion == b.ReportedVersion &&
		a.DesiredVersion == b.DesiredVersion &&
		a.DeviceDesiredVersion == b.DeviceDesiredVersion &&
		equalJSON(a.PublishedDesired, b.PublishedDesired) &&
		equalJSON(a.Delta, b.Delta) &&
		a.DeltaCount == b.DeltaCount &&
		equalMetadata(a.Metadata, b.Metadata) &&
		a.ConnectionState == b.ConnectionState &&
		equalTime(a.ConnectionStateUpdatedTime, b.ConnectionStateUpdatedTime) &&
		equalTime(a.LastActivityTime, b.LastActivityTime) &&
		a.ObservedGeneration == b.ObservedGeneration &&
		slices.EqualFunc(a.Conditions, b.Conditions, equalCondition)
}

func equalJSON(a, b *apiextensionsv1.JSON) bool {
	if a == nil || b == nil {
		return a == b
	}
	return bytes.Equal(a.Raw, b.Raw)
}

func equalMetadata(a, b *v1alpha1.TwinMetadata) bool {
	if a == nil || b == nil {
		return a == b
	}
	return equalJSON(a.Desired, b.Desired) && equalJSON(a.Reported, b.Reported)
}

func equalTime(a, b *metav1.Time) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.UTC() == b.UTC()
}

func equalCondition(a, b metav1.Condition) bool {
	return a.Type == b.Type && a.Status == b.Status && a.ObservedGeneration == b.ObservedGeneration &&
		a.LastTransitionTime.UTC() == b.LastTransitionTime.UTC() && a.Reason == b.Reason && a.Message == b.Message
}
