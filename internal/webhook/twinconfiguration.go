package webhook

import (
	"context"
	"errors"
	"fmt"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// ValidateConfigurationPath is where the TwinConfiguration validating
// webhook is served; config/webhook/manifests.yaml points the API server at it.
const ValidateConfigurationPath = "/validate-kubetwin-io-v1alpha1-twinconfiguration"

// TargetAll is the targetCondition that selects every twin of the namespace.
const TargetAll = "*"

// ConfigurationValidator is the validating webhook for TwinConfigurations.
type ConfigurationValidator struct{}

var _ admission.Validator[*v1alpha1.TwinConfiguration] = ConfigurationValidator{}

// ValidateCreate refuses a configuration that breaks the rules.
func (ConfigurationValidator) ValidateCreate(_ context.Context, c *v1alpha1.TwinConfiguration) (admission.Warnings, error) {
	return nil, InvalidConfiguration(c, ValidateConfiguration(c))
}

// ValidateUpdate refuses a change that breaks the rules.
func (ConfigurationValidator) ValidateUpdate(_ context.Context, _, c *v1alpha1.TwinConfiguration) (admission.Warnings, error) {
	return nil, InvalidConfiguration(c, ValidateConfiguration(c))
}

// ValidateDelete allows every deletion.
func (ConfigurationValidator) ValidateDelete(context.Context, *v1alpha1.TwinConfiguration) (admission.Warnings, error) {
	return nil, nil
}

// ValidateConfiguration returns what c breaks, each with its field path: a
// target condition or metric query that does not parse (with its line and
// column), content that breaks the DeviceTwin spec.desired rules (with
// the same messages, under spec.content.desired), and a rollout that names
// no metric of spec.metrics or has bad bounds. The operator runs it too, as
// the webhook may not be installed.
func ValidateConfiguration(c *v1alpha1.TwinConfiguration) []*twin.Error {
	var errs []*twin.Error
	add := func(path string, err error) {
		if err == nil {
			return
		}
		var e *twin.Error
		if errors.As(err, &e) {
			errs = append(errs, e)
			return
		}
		errs = append(errs, &twin.Error{Path: path, Rule: err.Error()})
	}
	s := &c.Spec
	if s.TargetCondition != "" {
		_, err := ParseTargetCondition(s.TargetCondition)
		add("spec.targetCondition", err)
	}
	if s.Selector != nil {
		_, err := metav1.LabelSelectorAsSelector(s.Selector)
		add("spec.selector", err)
	}
	if s.TargetCondition == "" && s.Selector == nil {
		add("spec", errors.New("set exactly one of spec.targetCondition and spec.selector"))
	}
	var raw []byte
	if s.Content.Desired != nil {
		raw = s.Content.Desired.Raw
	}
	_, err := twin.ParseSection(twin.Desired, "spec.content.desired", raw)
	add("spec.content.desired", err)
	seen := map[string]bool{}
	for i, m := range s.Metrics {
		path := fmt.Sprintf("spec.metrics[%d].query", i)
		if seen[m.Name] {
			add(fmt.Sprintf("spec.metrics[%d].name", i), fmt.Errorf("metric %q is defined twice", m.Name))
		}
		seen[m.Name] = true
		_, err := ParseMetricQuery(m.Query)
		add(path, err)
	}
	if r := s.Rollout; r != nil {
		if err := checkIntOrPercent(r.MaxInFlight, 1); err != nil {
			add("spec.rollout.maxInFlight", err)
		}
		if r.MaxUnhealthy != nil {
			if err := checkIntOrPercent(*r.MaxUnhealthy, 0); err != nil {
				add("spec.rollout.maxUnhealthy", err)
			}
		}
		if r.HealthMetric != "" && !seen[r.HealthMetric] {
			add("spec.rollout.healthMetric", fmt.Errorf("no metric named %q in spec.metrics", r.HealthMetric))
		}
	}
	return errs
}

// checkIntOrPercent accepts a number of at least min, or a percentage
// "N%" with N from min to 100.
func checkIntOrPercent(v intstr.IntOrString, min int) error {
	if v.Type == intstr.Int {
		if int(v.IntVal) < min {
			return fmt.Errorf("must be at least %d", min)
		}
		return nil
	}
	n, err := intstr.GetScaledValueFromIntOrPercent(&v, 100, false)
	if err != nil || !strings.HasSuffix(v.StrVal, "%") {
		return fmt.Errorf("must be a number or a percentage such as \"10%%\", not %q", v.StrVal)
	}
	if n < min || n > 100 {
		return fmt.Errorf("must be a percentage from %d%% to 100%%, not %q", min, v.StrVal)
	}
	return nil
}

// ParseTargetCondition parses a target condition (a WHERE clause without
// WHERE); nil stands for TargetAll. An error names the line and column in
// the condition as written.
func ParseTargetCondition(cond string) (*query.Query, error) {
	if strings.TrimSpace(cond) == TargetAll {
		return nil, nil
	}
	return query.ParseCondition(cond)
}

// ParseMetricQuery parses a metric query: a query over twins (SELECT
// deviceId FROM devices WHERE ...), whose count is the metric; TOP,
// aggregates and GROUP BY are refused.
func ParseMetricQuery(text string) (*query.Query, error) {
	q, err := query.Parse(text)
	if err != nil {
		return nil, err
	}
	if _, top := q.Top(); top || !q.PerTwin() || hasGroupBy(q) {
		return nil, errors.New("a metric counts twins: write SELECT deviceId FROM devices WHERE ..., without TOP, aggregates or GROUP BY")
	}
	return q, nil
}

// hasGroupBy reports whether q has a GROUP BY: its canonical text ends with
// one (a string literal holding the words would be quoted).
func hasGroupBy(q *query.Query) bool {
	s := q.String()
	i := strings.LastIndex(s, " GROUP BY ")
	return i >= 0 && !strings.ContainsAny(s[i:], `'"`)
}

// TargetSelector returns the label selector that narrows the twins a
// configuration may target: spec.selector, or what the query planner
// pushes down from the target condition (everything for TargetAll). The
// condition itself must still be checked on each twin.
func TargetSelector(c *v1alpha1.TwinConfiguration, q *query.Query) (labels.Selector, error) {
	if c.Spec.Selector != nil {
		return metav1.LabelSelectorAsSelector(c.Spec.Selector)
	}
	if q == nil {
		return labels.Everything(), nil
	}
	return labels.Parse(q.Plan().LabelSelector)
}

// InvalidConfiguration returns nil for no errors, else the 422 Invalid
// error listing "path: rule" for each, as Invalid does for DeviceTwins.
func InvalidConfiguration(c *v1alpha1.TwinConfiguration, errs []*twin.Error) error {
	return invalid("TwinConfiguration", c.Name, errs)
}
