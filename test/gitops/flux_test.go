package gitops

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/ext"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

// TestKstatus checks what Flux computes for a DeviceTwin without
// healthCheckExprs: kstatus reads the operator's Reconciling and Stalled
// conditions, so a converging twin is InProgress and a refused one Failed.
func TestKstatus(t *testing.T) {
	for _, tc := range twinCases {
		t.Run(tc.name, func(t *testing.T) {
			res, err := status.Compute(unstructuredTwin(t, tc.twin))
			if err != nil {
				t.Fatal(err)
			}
			if string(res.Status) != tc.kstatus {
				t.Errorf("kstatus = %s (%s), want %s", res.Status, res.Message, tc.kstatus)
			}
		})
	}
}

// fluxExprs are the health check expressions of one kind.
type fluxExprs struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Current    string `json:"current"`
	InProgress string `json:"inProgress"`
	Failed     string `json:"failed"`
}

// deviceTwinExprs reads the DeviceTwin health check expressions from
// config/flux/kustomizations.yaml.
func deviceTwinExprs(t *testing.T) fluxExprs {
	t.Helper()
	for _, doc := range strings.Split(readFile(t, "config/flux/kustomizations.yaml"), "\n---\n") {
		var k struct {
			Kind string `json:"kind"`
			Spec struct {
				HealthCheckExprs []fluxExprs `json:"healthCheckExprs"`
			} `json:"spec"`
		}
		if err := yaml.Unmarshal([]byte(doc), &k); err != nil {
			t.Fatal(err)
		}
		for _, e := range k.Spec.HealthCheckExprs {
			if e.APIVersion == "kubetwin.io/v1alpha1" && e.Kind == "DeviceTwin" {
				return e
			}
		}
	}
	t.Fatal("config/flux/kustomizations.yaml has no healthCheckExprs for kubetwin.io/v1alpha1 DeviceTwin")
	return fluxExprs{}
}

// celProgram parses an expression in the environment kustomize-controller
// uses (fluxcd/pkg runtime/cel): parsed, not type-checked, since the object's
// top-level fields are the variables.
func celProgram(expr string) (cel.Program, error) {
	env, err := cel.NewEnv(
		cel.HomogeneousAggregateLiterals(),
		cel.EagerlyValidateDeclarations(true),
		cel.DefaultUTCTimeZone(true),
		cel.CrossTypeNumericComparisons(true),
		cel.OptionalTypes(),
		ext.Strings(),
		ext.Sets(),
		ext.Encoders(),
	)
	if err != nil {
		return nil, err
	}
	ast, iss := env.Parse(expr)
	if iss.Err() != nil {
		return nil, iss.Err()
	}
	return env.Program(ast, cel.EvalOptions(cel.OptOptimize), cel.InterruptCheckFrequency(100))
}

// fluxStatus evaluates the expressions as kustomize-controller does: a
// status.observedGeneration that differs from metadata.generation is
// InProgress; then inProgress, failed and current in that order, the first
// true one wins; none true is InProgress. An evaluation error is returned
// (kustomize-controller reports the object as Unknown and keeps waiting).
func fluxStatus(e fluxExprs, u *unstructured.Unstructured) (string, error) {
	obs, found, err := unstructured.NestedInt64(u.Object, "status", "observedGeneration")
	if err != nil {
		return "", err
	}
	if found && obs != u.GetGeneration() {
		return "InProgress", nil
	}
	for _, step := range []struct{ expr, result string }{
		{e.InProgress, "InProgress"}, {e.Failed, "Failed"}, {e.Current, "Current"},
	} {
		if step.expr == "" {
			continue
		}
		prg, err := celProgram(step.expr)
		if err != nil {
			return "", fmt.Errorf("parsing %q: %w", step.expr, err)
		}
		val, _, err := prg.ContextEval(context.Background(), u.Object)
		if err != nil {
			return "", fmt.Errorf("evaluating %q: %w", step.expr, err)
		}
		b, ok := val.(types.Bool)
		if !ok {
			return "", fmt.Errorf("%q is not a boolean", step.expr)
		}
		if b {
			return step.result, nil
		}
	}
	return "InProgress", nil
}

func TestFluxHealthCheckExprs(t *testing.T) {
	e := deviceTwinExprs(t)
	if e.Current == "" {
		t.Fatal("current is required by Flux")
	}
	for _, tc := range twinCases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := fluxStatus(e, unstructuredTwin(t, tc.twin))
			if tc.flux == "" {
				// No status yet: `status` does not exist, the expressions fail to
				// evaluate and Flux keeps waiting (Unknown) until the operator
				// writes the first status, a moment after the twin is created.
				if err == nil {
					t.Errorf("flux = %s, want an evaluation error (Unknown, waiting)", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.flux {
				t.Errorf("flux = %s, want %s", got, tc.flux)
			}
		})
	}
}
