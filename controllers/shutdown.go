package controllers

import (
	"context"
	"errors"

	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
)

// QuietOnShutdown wraps a reconciler so that a reconcile cut short by the
// manager's shutdown (its context canceled while a request to the API
// server was in flight: a rolling update, a lost leader election) is not
// reported as a "Reconciler error". Nothing failed: the object is
// reconciled again by the next leader, and a device whose report was being
// written was not acknowledged, so it sends the report again. Such a
// reconcile is logged at V(1) with its error. An error while the context
// is live, or a deadline, is returned as it is.
func QuietOnShutdown(r reconcile.Reconciler) reconcile.Reconciler {
	return quietOnShutdown{r}
}

type quietOnShutdown struct{ reconcile.Reconciler }

func (q quietOnShutdown) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	res, err := q.Reconciler.Reconcile(ctx, req)
	if err != nil && errors.Is(ctx.Err(), context.Canceled) {
		ctrl.LoggerFrom(ctx).V(1).Info("reconcile cut short by shutdown", "error", err.Error())
		return ctrl.Result{}, nil
	}
	return res, err
}
