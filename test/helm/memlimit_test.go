package helm

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"
)

// managerContainer renders the chart with args and returns the operator's
// container.
func managerContainer(t *testing.T, args ...string) corev1.Container {
	t.Helper()
	rel := release{name: "kubetwin", namespace: "kubetwin-system", prefix: "kubetwin"}
	d := &appsv1.Deployment{}
	if err := k8sFromUnstructured(find(t, render(t, rel.name, rel.namespace, args...), "Deployment", rel.manager()), d); err != nil {
		t.Fatal(err)
	}
	return d.Spec.Template.Spec.Containers[0]
}

// TestChartMemoryLimit: the operator's container gets the memory limit it
// derives its Go soft memory limit from (cmd/manager/memlimit.go), by
// default the one docs/operations.md states, and a user's resources and
// GOMEMLIMIT reach the container as given.
func TestChartMemoryLimit(t *testing.T) {
	var values struct {
		Resources corev1.ResourceRequirements `json:"resources"`
	}
	raw, err := os.ReadFile(filepath.Join(chart, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(raw, &values); err != nil {
		t.Fatal(err)
	}
	def := values.Resources.Limits.Memory()
	if def.IsZero() {
		t.Fatal("values.yaml sets no resources.limits.memory: the operator would run without a soft memory limit")
	}

	t.Run("defaults", func(t *testing.T) {
		c := managerContainer(t)
		if got := c.Resources.Limits.Memory(); !got.Equal(*def) {
			t.Errorf("limits.memory %v, want values.yaml's %v", got, def)
		}
		if c.Resources.Requests.Memory().IsZero() || c.Resources.Requests.Memory().Cmp(*def) > 0 {
			t.Errorf("requests.memory %v, want some, at most the limit %v", c.Resources.Requests.Memory(), def)
		}
		// The operator takes its default from the cgroup; a GOMEMLIMIT here
		// would override it and stop following resources.limits.memory.
		if slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "GOMEMLIMIT" }) {
			t.Errorf("env %+v sets GOMEMLIMIT by default", c.Env)
		}
	})

	t.Run("docs state the default", func(t *testing.T) {
		ops, err := os.ReadFile(filepath.Join(root, "docs", "operations.md"))
		if err != nil {
			t.Fatal(err)
		}
		soft := strconv.FormatInt(def.Value()*9/10, 10)
		for _, want := range []string{"`resources.limits.memory: " + def.String() + "`", soft + " bytes", "`--memory-limit`", "`kubetwin_memory_limit_bytes`"} {
			if !strings.Contains(string(ops), want) {
				t.Errorf("docs/operations.md does not say %s", want)
			}
		}
	})

	t.Run("yours", func(t *testing.T) {
		c := managerContainer(t, "--set", "resources.limits.memory=3Gi", "--set", "resources.requests.memory=2Gi",
			"--set", "extraEnv[0].name=GOMEMLIMIT", "--set", "extraEnv[0].value=2500MiB")
		if got, want := c.Resources.Limits.Memory(), resource.MustParse("3Gi"); !got.Equal(want) {
			t.Errorf("limits.memory %v, want 3Gi", got)
		}
		if got, want := c.Resources.Requests.Memory(), resource.MustParse("2Gi"); !got.Equal(want) {
			t.Errorf("requests.memory %v, want 2Gi", got)
		}
		if got := c.Resources.Limits.Cpu(); got.IsZero() {
			t.Error("setting the memory limit dropped the CPU limit")
		}
		if !slices.Contains(c.Env, corev1.EnvVar{Name: "GOMEMLIMIT", Value: "2500MiB"}) {
			t.Errorf("env %+v lacks GOMEMLIMIT=2500MiB", c.Env)
		}
	})
}
