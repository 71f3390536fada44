package main

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"
)

// TestDefaultMemoryLimitFollowsTheChart: bench-scale's default soft
// memory limit is the operator's in production, 90% of the chart's
// resources.limits.memory; this fails when the chart's value changes
// without chartMemoryLimit.
func TestDefaultMemoryLimitFollowsTheChart(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "..", "charts", "kubetwin", "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var values struct {
		Resources struct {
			Limits struct {
				Memory string `json:"memory"`
			} `json:"limits"`
		} `json:"resources"`
	}
	if err := yaml.Unmarshal(raw, &values); err != nil {
		t.Fatal(err)
	}
	mem := values.Resources.Limits.Memory
	if mem == "" {
		t.Fatal("charts/kubetwin/values.yaml sets no resources.limits.memory")
	}
	q, err := resource.ParseQuantity(mem)
	if err != nil {
		t.Fatalf("resources.limits.memory %q: %v", mem, err)
	}
	if want := q.Value() * 9 / 10; defaultScaleMemoryLimit != want {
		t.Fatalf("default --scale-memory-limit is %d bytes (90%% of %s); the chart's limit %s makes it %d: set chartMemoryLimit",
			defaultScaleMemoryLimit, chartMemoryLimit, mem, want)
	}
	c, err := parseFlags([]string{"--scale", "10"})
	if err != nil {
		t.Fatal(err)
	}
	if int64(c.scale.memoryLimit) != defaultScaleMemoryLimit {
		t.Fatalf("--scale-memory-limit defaults to %d, want %d", c.scale.memoryLimit, defaultScaleMemoryLimit)
	}
}

func TestScaleMemoryLimitFlag(t *testing.T) {
	for _, tc := range []struct {
		arg     string
		want    int64
		wantErr string
	}{
		{arg: "922Mi", want: 922 << 20},
		{arg: "966367641", want: 966367641},
		{arg: "1G", want: 1e9},
		{arg: "0", want: 0},
		{arg: "-1Gi", wantErr: `"-1Gi" is negative`},
		{arg: "lots", wantErr: `"lots" is not a quantity of bytes`},
		{arg: "", wantErr: "is not a quantity of bytes"},
	} {
		c, err := parseFlags([]string{"--scale", "10", "--scale-memory-limit", tc.arg})
		switch {
		case tc.wantErr != "":
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "scale-memory-limit") {
				t.Errorf("--scale-memory-limit %q: error %v, want one naming the flag and saying %s", tc.arg, err, tc.wantErr)
			}
		case err != nil:
			t.Errorf("--scale-memory-limit %q: %v", tc.arg, err)
		case int64(c.scale.memoryLimit) != tc.want:
			t.Errorf("--scale-memory-limit %q = %d bytes, want %d", tc.arg, c.scale.memoryLimit, tc.want)
		}
	}
}

func TestGCShareSince(t *testing.T) {
	base := gcCPU{gc: 1, total: 100, idle: 50}
	// 40 s of CPU, 30 of them idle: 10 s busy, 2 s of it in the GC.
	if got := (gcCPU{gc: 3, total: 140, idle: 80}).shareSince(base); got != 20 {
		t.Fatalf("GC share %.2f%%, want 20%%", got)
	}
	if got := base.shareSince(base); got != 0 {
		t.Fatalf("GC share with nothing run %.2f%%, want 0", got)
	}
}

// TestWaitCollected: the check that a stopped operator was collected
// tells a retained object from a dropped one.
func TestWaitCollected(t *testing.T) {
	type big [1 << 16]byte
	kept := &big{}
	refs := operatorRefs{mgr: weakOf(kept), cache: weakOf(&big{})}
	if _, ok := waitCollected(refs, 300*time.Millisecond); ok {
		t.Fatal("an object still referenced was reported collected")
	}
	if refs.cache.Value() != nil {
		t.Fatal("the unreferenced object was not collected")
	}
	runtime.KeepAlive(kept)
	refs = operatorRefs{mgr: weakOf(&big{}), cache: weakOf(&big{})}
	if _, ok := waitCollected(refs, 10*time.Second); !ok {
		t.Fatal("nothing references the objects, yet they were not collected within 10s")
	}
}
