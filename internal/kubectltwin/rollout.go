package kubectltwin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// ConfigurationResource is the plural resource name of TwinConfigurations.
const ConfigurationResource = "twinconfigurations"

const rolloutStatusLong = `Follow the rollout of a TwinConfiguration until it is done: every targeted twin that the
configuration wins has its content in spec.desired and reports it back.

The progress bar shows the twins in sync (#), the twins that have the content but do not report
it yet (=) and the targeted twins still waiting (.), then the counts, the rollout's health
metric against its limit, and the reason of the Ready condition. When the output is not a
terminal, a line is printed each time the status changes.

Exits 0 once the configuration is Ready; 1 when its rollout halts (its health metric went over
maxUnhealthy), when it is invalid, when it is deleted, or when --timeout passes first. A paused
rollout is waited for (resume it with spec.rollout.paused: false).`

const rolloutStatusExample = `  # Wait for a configuration to reach its devices, at most 5 minutes
  kubectl twin rollout status telemetry-30s --timeout 5m`

// newRolloutCommand returns "rollout" and its subcommand "status".
func newRolloutCommand(o *options) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rollout",
		Short: "Follow the rollout of a TwinConfiguration",
		Args:  cobra.NoArgs,
		Run:   func(cmd *cobra.Command, _ []string) { _ = cmd.Help() },
	}
	var timeout time.Duration
	status := &cobra.Command{
		Use:     "status NAME",
		Short:   "Show a TwinConfiguration's rollout with a progress bar until it is done",
		Long:    rolloutStatusLong,
		Example: rolloutStatusExample,
		Args:    args(1, 1, "exactly one NAME (a TwinConfiguration) is required"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.allNamespaces {
				return usageError{cmd: cmd, err: errors.New("a TwinConfiguration is in one namespace: use -n, not -A")}
			}
			if timeout < 0 {
				return usageError{cmd: cmd, err: fmt.Errorf("--timeout must not be negative, got %s", timeout)}
			}
			ns, err := o.namespace()
			if err != nil {
				return err
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			p := &progress{w: o.streams.Out, tty: isTerminal(o.streams.Out)}
			return FollowRollout(ctx, restSource{c: c, ns: ns, name: args[0]}, args[0], p)
		},
	}
	status.Flags().DurationVar(&timeout, "timeout", 0,
		"How long to wait for the rollout (e.g. 5m); 0 waits until it is done or halts.")
	cmd.AddCommand(status)
	for _, c := range cmd.Commands() {
		c.SetUsageTemplate(subcommandUsage)
	}
	return cmd
}

// configurationSource lists and watches one TwinConfiguration.
type configurationSource interface {
	// list returns the list holding the configuration (empty when there
	// is none), with the resourceVersion to watch from.
	list(ctx context.Context) (*v1alpha1.TwinConfigurationList, error)
	// watch watches the configuration from resourceVersion rv.
	watch(ctx context.Context, rv string) (watch.Interface, error)
}

// restSource is a configurationSource over the API server.
type restSource struct {
	c        rest.Interface
	ns, name string
}

func (s restSource) opts(rv string, watch bool) *metav1.ListOptions {
	return &metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", s.name).String(),
		ResourceVersion: rv, Watch: watch}
}

func (s restSource) list(ctx context.Context) (*v1alpha1.TwinConfigurationList, error) {
	list := &v1alpha1.TwinConfigurationList{}
	err := s.c.Get().Namespace(s.ns).Resource(ConfigurationResource).VersionedParams(s.opts("", false), metav1.ParameterCodec).
		Do(ctx).Into(list)
	return list, err
}

func (s restSource) watch(ctx context.Context, rv string) (watch.Interface, error) {
	return s.c.Get().Namespace(s.ns).Resource(ConfigurationResource).VersionedParams(s.opts(rv, true), metav1.ParameterCodec).
		Watch(ctx)
}

// FollowRollout shows the rollout of the TwinConfiguration name as src
// lists and watches it, until it is Ready (nil), halts, is invalid or is
// deleted (an error saying so), or ctx ends (an error with the last
// status seen). When the watch ends it lists and watches again.
func FollowRollout(ctx context.Context, src configurationSource, name string, p *progress) error {
	err := followRollout(ctx, src, name, p)
	p.end()
	switch {
	case err == nil:
		fmt.Fprintf(p.w, "configuration %q successfully rolled out\n", name)
	case ctx.Err() != nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)):
		if p.last == "" {
			return fmt.Errorf("timed out waiting for configuration %s", name)
		}
		return fmt.Errorf("timed out waiting for configuration %s: %s", name, p.last)
	}
	return err
}

func followRollout(ctx context.Context, src configurationSource, name string, p *progress) error {
	gr := schema.GroupResource{Group: v1alpha1.GroupVersion.Group, Resource: ConfigurationResource}
	for {
		list, err := src.list(ctx)
		if err != nil {
			return ctxErr(ctx, err)
		}
		if len(list.Items) == 0 {
			return apierrors.NewNotFound(gr, name)
		}
		if done, err := p.show(&list.Items[0]); done || err != nil {
			return err
		}
		w, err := src.watch(ctx, list.ResourceVersion)
		if err != nil {
			return ctxErr(ctx, err)
		}
		done, err := followWatch(ctx, w, name, p)
		w.Stop()
		if done || err != nil {
			return err
		}
	}
}

// followWatch shows the configurations w sends; it returns done or an
// error when the rollout ends, neither when the watch ends first.
func followWatch(ctx context.Context, w watch.Interface, name string, p *progress) (bool, error) {
	for {
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case ev, ok := <-w.ResultChan():
			if !ok {
				return false, nil
			}
			switch ev.Type {
			case watch.Deleted:
				return false, fmt.Errorf("configuration %s was deleted", name)
			case watch.Error:
				if status := apierrors.FromObject(ev.Object); !apierrors.IsGone(status) && !apierrors.IsResourceExpired(status) {
					return false, status
				}
				return false, nil // too old: list again
			case watch.Added, watch.Modified:
				if c, ok := ev.Object.(*v1alpha1.TwinConfiguration); ok {
					if done, err := p.show(c); done || err != nil {
						return done, err
					}
				}
			}
		}
	}
}

// ctxErr prefers the context's error, so a timeout reads as one.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// rolloutView is what one status of a configuration says about its rollout.
type rolloutView struct {
	targeted, applied, inSync int32
	// health is "<metric> <count>/<max>" when the rollout has a health metric.
	health string
	// reason and message of the Ready condition; observed is false while
	// the operator has not yet seen the current generation.
	reason, message string
	observed        bool
	ready, halted   bool
	paused          bool
}

func viewOf(c *v1alpha1.TwinConfiguration) rolloutView {
	v := rolloutView{targeted: c.Status.TargetedCount, applied: c.Status.AppliedCount, inSync: c.Status.InSyncCount}
	ready := meta.FindStatusCondition(c.Status.Conditions, v1alpha1.ConditionReady)
	v.observed = c.Status.ObservedGeneration == c.Generation && ready != nil && ready.ObservedGeneration == c.Generation
	if ready != nil {
		v.reason, v.message = ready.Reason, ready.Message
	}
	if v.observed {
		v.ready = ready.Status == metav1.ConditionTrue
		stalled := meta.FindStatusCondition(c.Status.Conditions, v1alpha1.ConditionStalled)
		v.halted = stalled != nil && stalled.Status == metav1.ConditionTrue
		v.paused = ready.Reason == v1alpha1.ReasonRolloutPaused
	}
	if r := c.Spec.Rollout; r != nil && r.HealthMetric != "" {
		var count int32
		for _, m := range c.Status.Metrics {
			if m.Name == r.HealthMetric {
				count = m.Count
			}
		}
		limit := intstr.FromInt32(0)
		if r.MaxUnhealthy != nil {
			limit = *r.MaxUnhealthy
		}
		maxN, err := intstr.GetScaledValueFromIntOrPercent(&limit, int(c.Status.AppliedCount), false)
		if err != nil {
			v.health = fmt.Sprintf("%s %d (max %s)", r.HealthMetric, count, limit.String())
		} else {
			v.health = fmt.Sprintf("%s %d/%d", r.HealthMetric, count, maxN)
		}
	}
	return v
}

// progress prints a rollout: a progress bar redrawn in place on a
// terminal, otherwise one line per change.
type progress struct {
	w   io.Writer
	tty bool
	// last is the last line shown; drawn tells whether a bar is on screen.
	last  string
	drawn bool
}

// barWidth is the width of the progress bar, in characters.
const barWidth = 30

// show prints c's status and says whether the rollout is done or failed.
func (p *progress) show(c *v1alpha1.TwinConfiguration) (bool, error) {
	v := viewOf(c)
	line := summary(c.Name, v)
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s %s", bar(v), line)
		p.drawn = true
	} else if line != p.last {
		fmt.Fprintln(p.w, line)
	}
	p.last = line
	switch {
	case v.ready:
		return true, nil
	case v.halted && v.reason == v1alpha1.ReasonInvalidConfiguration:
		return false, fmt.Errorf("configuration %s is invalid: %s", c.Name, v.message)
	case v.halted:
		return false, fmt.Errorf("rollout of configuration %s halted: %s", c.Name, v.message)
	}
	return false, nil
}

// end finishes the bar's line.
func (p *progress) end() {
	if p.drawn {
		fmt.Fprintln(p.w)
		p.drawn = false
	}
}

// summary is the status line of a rollout.
func summary(name string, v rolloutView) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %d/%d in sync, %d/%d applied, %d targeted", name, v.inSync, v.targeted, v.applied, v.targeted, v.targeted)
	if v.health != "" {
		fmt.Fprintf(&b, ", health %s", v.health)
	}
	switch {
	case !v.observed:
		b.WriteString(" (waiting for the operator to observe the current spec)")
	case v.reason != "":
		fmt.Fprintf(&b, " (%s", v.reason)
		if v.paused || v.halted {
			fmt.Fprintf(&b, ": %s", v.message)
		}
		b.WriteString(")")
	}
	return b.String()
}

// bar draws the in-sync (#), applied (=) and waiting (.) twins.
func bar(v rolloutView) string {
	if v.targeted <= 0 {
		return "[" + strings.Repeat(" ", barWidth) + "]"
	}
	cells := func(n int32) int { return int(int64(min(max(n, 0), v.targeted)) * barWidth / int64(v.targeted)) }
	in := cells(v.inSync)
	applied := max(cells(v.applied)-in, 0)
	return "[" + strings.Repeat("#", in) + strings.Repeat("=", applied) + strings.Repeat(".", barWidth-in-applied) + "]"
}

// isTerminal reports whether w is a terminal (a character device).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
