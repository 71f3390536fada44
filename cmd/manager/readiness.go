package main

import (
	"context"
	"os"

	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/operator"
)

// ownPod is the operator's Pod, from the downward API's POD_NAME and
// POD_NAMESPACE; ok is false outside a Pod.
func ownPod() (pod types.NamespacedName, ok bool) {
	pod = types.NamespacedName{Namespace: os.Getenv("POD_NAMESPACE"), Name: os.Getenv("POD_NAME")}
	return pod, pod.Namespace != "" && pod.Name != ""
}

// setupBrokerLabel makes the leader label its own Pod once the embedded
// broker listens (operator.BrokerLabeler), for the hub Service, which
// selects that label: only the leader runs the broker, while every replica
// stays Ready to serve the admission webhook. Nothing is labelled with an
// external broker or outside a Pod.
func setupBrokerLabel(ctx context.Context, mgr ctrl.Manager, b bus.Bus) error {
	e, ok := b.(*bus.Embedded)
	if !ok {
		return nil
	}
	pod, ok := ownPod()
	if !ok {
		ctrl.Log.WithName("setup").Info("not labelling the broker's pod: POD_NAME or POD_NAMESPACE is unset (not running in a Pod?)",
			"label", operator.BrokerLabel)
		return nil
	}
	_, err := operator.AddBrokerLabeler(ctx, mgr, pod, e)
	return err
}
