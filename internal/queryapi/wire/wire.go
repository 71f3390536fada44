// Package wire holds the types of the query.kubetwin.io/v1alpha1 API that
// the operator serves (internal/queryapi) and kubectl-twin calls, without
// the server's dependencies.
//
// The API has one resource, twinqueries: a create-only virtual resource,
// as authentication.k8s.io's TokenReview. A client POSTs a TwinQuery whose
// spec holds an IoT Hub query to
//
//	/apis/query.kubetwin.io/v1alpha1/namespaces/{namespace}/twinqueries  (the twins of one namespace)
//	/apis/query.kubetwin.io/v1alpha1/twinqueries                         (the twins of every namespace)
//
// or, served by the operator of one shard (ShardGroup), to
//
//	/apis/{namespace}.query.kubetwin.io/v1alpha1/namespaces/{namespace}/twinqueries
//
// and gets it back with the answer in its status. Nothing is stored.
//
// The types are served, never stored: no CRD is generated for them.
//
// +kubebuilder:skip
package wire

import (
	"encoding/json"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Names of the API.
const (
	// Group is the API group of an operator that watches every namespace
	// (or of one chosen to answer for the whole cluster).
	Group        = "query.kubetwin.io"
	Version      = "v1alpha1"
	GroupVersion = Group + "/" + Version
	Resource     = "twinqueries"
	Kind         = "TwinQuery"
)

// ShardGroup is the API group of the operator of one shard, which
// watches namespace alone (its --namespace): <namespace>.query.kubetwin.io,
// with the same resource and types. Each shard registers an APIService
// of its own, so every shard of a cluster answers queries from its
// cache, and a client that queries namespace asks this group first.
func ShardGroup(namespace string) string { return namespace + "." + Group }

// GroupVersionOf is group's version of the API, e.g.
// fleet-07.query.kubetwin.io/v1alpha1.
func GroupVersionOf(group string) string { return group + "/" + Version }

// TwinQuery is a query and, in a reply, its answer.
type TwinQuery struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              TwinQuerySpec   `json:"spec"`
	Status            TwinQueryStatus `json:"status,omitempty"`
}

// TwinQuerySpec is the question.
type TwinQuerySpec struct {
	// Query is the IoT Hub query: SELECT ... FROM devices ...
	Query string `json:"query"`
	// Paged says the client reads status.continue: the answer of a
	// SELECT * that is larger than the server sends at once
	// (--query-api-max-response-bytes) comes in parts instead of being
	// refused with ResponseTooLarge. Other queries are answered whole or
	// refused as without it.
	Paged bool `json:"paged,omitempty"`
	// Continue asks for the part after the one whose status.continue it
	// is (the same query, paged). Each part is answered from the cache as
	// it is then: a twin is in the part its place in the order gives it
	// at that time, as with the service API's continuation tokens.
	Continue string `json:"continue,omitempty"`
}

// TwinQueryStatus is the answer, as kubectl-twin's listing path computes
// it: the same items in the same order.
type TwinQueryStatus struct {
	// ItemType is "twin" for SELECT * (the items are twin documents) and
	// "raw" for projections and aggregates.
	ItemType string `json:"itemType,omitempty"`
	// Items are the result's items in order.
	Items []json.RawMessage `json:"items"`
	// Twins, for itemType twin, names the DeviceTwin behind each item.
	Twins []TwinRef `json:"twins,omitempty"`
	// GroupKeys, with GROUP BY, holds the key of each item's group.
	GroupKeys []string `json:"groupKeys,omitempty"`
	// Evaluated is how many twins the condition was evaluated on (those
	// the label selector of the query's plan did not rule out; in a part
	// after the first, those after the previous part's last twin).
	Evaluated int `json:"evaluated"`
	// Continue, when set, says more items follow: send the query again
	// with spec.continue set to it (spec.paged only).
	Continue string `json:"continue,omitempty"`
}

// TwinRef is where the twin of an item lives.
type TwinRef struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// InSync is the status of the twin's InSync condition ("" without it).
	InSync string `json:"inSync,omitempty"`
}

// Reasons of the API's Status errors that clients act on.
const (
	// ReasonResponseTooLarge: the answer is larger than the server sends
	// (--query-api-max-response-bytes); kubectl-twin lists the twins
	// itself instead.
	ReasonResponseTooLarge metav1.StatusReason = "ResponseTooLarge"
	// ReasonNamespaceNotServed: the operator watches other namespaces
	// (--namespace); kubectl-twin lists the twins itself instead.
	ReasonNamespaceNotServed metav1.StatusReason = "NamespaceNotServed"
)
