package operator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/manager"
)

// The label the replica whose embedded broker listens puts on its own Pod.
// The hub Service (MQTT, and port 443 with MQTT over WebSockets) selects it,
// so devices reach only that replica; every other Service (webhook,
// metrics) selects every replica, which stay Ready.
const (
	BrokerLabel       = "kubetwin.io/broker"
	BrokerLabelActive = "active"
)

// Broker is what BrokerLabeler needs of the embedded broker (*bus.Embedded).
type Broker interface {
	// Ready is closed once the broker listens.
	Ready() <-chan struct{}
	// Connected reports whether the broker is running.
	Connected() bool
}

// BrokerLabeler labels the operator's own Pod with BrokerLabel once the
// embedded broker listens, and removes the label when it stops. It runs on
// the leader only, as the broker does. A replica that loses leadership
// exits (controller-runtime's default), so a label left behind goes with its
// Pod, or, when the container restarts in the same Pod, is removed by
// Unlabel before the new process is Ready.
type BrokerLabeler struct {
	client client.Client
	pod    types.NamespacedName
	broker Broker
	log    logr.Logger
	// retry is the first wait after a failed patch; it doubles up to maxRetry.
	retry, maxRetry time.Duration
	labelled        atomic.Bool
}

var (
	_ manager.Runnable               = (*BrokerLabeler)(nil)
	_ manager.LeaderElectionRunnable = (*BrokerLabeler)(nil)
	_ healthz.Checker                = (*BrokerLabeler)(nil).ReadyCheck
)

// NewBrokerLabeler returns a labeler of pod for broker; c writes Pods (it
// needs only patch on pods in pod's namespace).
func NewBrokerLabeler(c client.Client, pod types.NamespacedName, broker Broker, log logr.Logger) *BrokerLabeler {
	return &BrokerLabeler{client: c, pod: pod, broker: broker, log: log, retry: time.Second, maxRetry: 30 * time.Second}
}

// AddBrokerLabeler removes a label an earlier process left on pod (retrying
// for a while: the API server may not answer yet), then adds a
// BrokerLabeler to mgr and its ready check "broker".
func AddBrokerLabeler(ctx context.Context, mgr ctrl.Manager, pod types.NamespacedName, broker Broker) (*BrokerLabeler, error) {
	l := NewBrokerLabeler(mgr.GetClient(), pod, broker, ctrl.Log.WithName("broker-label"))
	if err := RetryStartup(ctx, "removing the label "+BrokerLabel+" from pod "+pod.String(), func() error {
		return l.Unlabel(ctx)
	}); err != nil {
		return nil, err
	}
	if err := mgr.Add(l); err != nil {
		return nil, fmt.Errorf("adding the broker labeler: %w", err)
	}
	if err := mgr.AddReadyzCheck("broker", l.ReadyCheck); err != nil {
		return nil, fmt.Errorf("adding the broker ready check: %w", err)
	}
	return l, nil
}

// NeedLeaderElection returns true: only the leader runs the broker.
func (l *BrokerLabeler) NeedLeaderElection() bool { return true }

// Start waits until the broker listens, labels the Pod, and removes the
// label when ctx ends. Patches that fail are retried with backoff; a Pod
// that does not exist, or RBAC that forbids the patch, is an error that
// stops the manager, since devices could not reach the broker.
func (l *BrokerLabeler) Start(ctx context.Context) error {
	select {
	case <-l.broker.Ready():
	case <-ctx.Done():
		return nil
	}
	for wait := l.retry; ; wait = min(2*wait, l.maxRetry) {
		err := l.patch(ctx, BrokerLabelActive)
		if err == nil {
			break
		}
		if apierrors.IsNotFound(err) || apierrors.IsForbidden(err) {
			return fmt.Errorf("labelling pod %s %s=%s, which routes devices to this replica's broker: %w",
				l.pod, BrokerLabel, BrokerLabelActive, err)
		}
		l.log.Error(err, "labelling the pod failed; retrying", "pod", l.pod.String(), "retryIn", wait)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
	l.labelled.Store(true)
	l.log.Info("pod labelled: the hub Service routes devices to this replica", "pod", l.pod.String(), "label", BrokerLabel+"="+BrokerLabelActive)
	<-ctx.Done()
	// Best effort: the Pod is going away, or the process exits after losing
	// leadership; Unlabel at the next start covers a failure here.
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := l.Unlabel(uctx); err != nil {
		l.log.Error(err, "removing the broker label failed", "pod", l.pod.String())
	}
	return nil
}

// Unlabel removes BrokerLabel from the Pod (a no-op when it has none).
func (l *BrokerLabeler) Unlabel(ctx context.Context) error {
	l.labelled.Store(false)
	return l.patch(ctx, "")
}

// patch sets the label to value, or removes it when value is "".
func (l *BrokerLabeler) patch(ctx context.Context, value string) error {
	var v any
	if value != "" {
		v = value
	}
	body, err := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{BrokerLabel: v}}})
	if err != nil {
		return err
	}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: l.pod.Namespace, Name: l.pod.Name}}
	return l.client.Patch(ctx, pod, client.RawPatch(types.MergePatchType, body))
}

// ReadyCheck fails while the Pod carries the label but the broker does not
// run (between its stop and the label's removal), so the hub Service drops
// the Pod. A replica without the label is Ready: it serves the admission
// webhook, which must stay available while leadership moves.
func (l *BrokerLabeler) ReadyCheck(*http.Request) error {
	if l.labelled.Load() && !l.broker.Connected() {
		return errors.New("this replica is labelled " + BrokerLabel + "=" + BrokerLabelActive + " but its MQTT broker is not running")
	}
	return nil
}

// Labelled reports whether the labeler has labelled the Pod.
func (l *BrokerLabeler) Labelled() bool { return l.labelled.Load() }
