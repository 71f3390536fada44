package main

// Phase (d), queries: the kubectl plugin (cmd/kubectl-twin) against kubectl
// itself over a fleet of --query-twins DeviceTwins, both run as processes
// (so both pay for process start-up, kubeconfig loading and printing):
//
//   - selective: a tag query the plugin pushes down to a label selector,
//     against `kubectl get devicetwins -l location.plant=Plant-17 -o json`;
//   - residual: a condition on reported properties that no selector can
//     express (the plugin lists every twin and filters them itself), against
//     the full `kubectl get devicetwins -o json`, the list a kubectl user
//     would have to filter afterwards.
//
// The fleet is created directly through the API, as the operator would
// leave it: tags mirrored into labels with twin.MirrorLabels, and a status
// with reported properties (and their $metadata) written through the status
// subresource. The phase runs after the operator has stopped, so nothing
// reconciles these twins. The plugin's answers are checked against a full
// scan evaluated in this process with internal/query.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/kubectltwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/twin"
)

const (
	// queryNS holds the query phase's fleet.
	queryNS = "bench-query"
	// queryPlants is how many plants the fleet is spread over (uniformly at
	// random): the selective query picks one, so it matches about 1%.
	queryPlants = 100
	// queryPlant is the plant the selective query asks for.
	queryPlant = "Plant-17"
	// queryHotPercent is the share of twins (in %) whose reported
	// temperature is above queryHotAbove: what the residual query matches.
	queryHotPercent = 1
	queryHotAbove   = 90
	// queryCreateParallel is how many twins are created at a time.
	queryCreateParallel = 32
)

var (
	querySelective = fmt.Sprintf("SELECT * FROM devices WHERE tags.location.plant = '%s'", queryPlant)
	queryResidual  = fmt.Sprintf("SELECT * FROM devices WHERE properties.reported.telemetry.temperature > %d", queryHotAbove)
)

// queryTwinName is the name (and device id) of the fleet's twin i.
func queryTwinName(i int) string { return fmt.Sprintf("q-%05d", i) }

// queryTwinDocs returns the tags and reported properties of the fleet's
// twin i: deterministic (seeded by i), so a rerun builds the same fleet
// whatever order the workers create it in. The twins are kept lean (a
// few tags, a few reported properties, no desired properties, $metadata
// or conditions): kubectl's full list, the residual baseline, costs about
// in proportion to the bytes it prints, and the whole bench must stay short.
func queryTwinDocs(i int) (tags, reported twin.Doc, connected bool) {
	r := rand.New(rand.NewPCG(uint64(i), 0x6b75626574776e))
	regions := []string{"eu-west", "eu-north", "us-east", "us-west", "ap-south"}
	kinds := []string{"thermostat", "chiller", "boiler", "pump"}
	conn := []string{"wifi", "wired", "cellular"}
	tags = twin.Doc{
		"location": twin.Doc{
			"plant":  fmt.Sprintf("Plant-%02d", r.IntN(queryPlants)),
			"region": regions[r.IntN(len(regions))],
		},
		"customer":   fmt.Sprintf("customer-%02d", r.IntN(40)),
		"deviceType": kinds[r.IntN(len(kinds))],
	}
	// Temperatures: 18.0..89.9 for most twins, 90.5..99.4 for about
	// queryHotPercent% of them.
	temp := 18 + float64(r.IntN(720))/10
	if r.IntN(100) < queryHotPercent {
		temp = queryHotAbove + 0.5 + float64(r.IntN(90))/10
	}
	reported = twin.Doc{
		"telemetry": twin.Doc{
			"temperature": json.Number(fmt.Sprintf("%.1f", temp)),
			"humidity":    json.Number(fmt.Sprint(20 + r.IntN(60))),
		},
		"firmware":     twin.Doc{"version": fmt.Sprintf("1.%d.%d", r.IntN(5), r.IntN(10))},
		"connectivity": twin.Doc{"type": conn[r.IntN(len(conn))]},
	}
	return tags, reported, r.IntN(10) < 7
}

// queryStats are the timings of one command over the repetitions.
type queryStats struct {
	times []time.Duration
	items int // items in the (last) answer
	bytes int // size of the (last) output
}

func (s *queryStats) medianP90() (float64, float64) {
	t := slices.Clone(s.times)
	slices.Sort(t)
	return ms(percentile(t, 50)), ms(percentile(t, 90))
}

// runQueryPhase is phase (d).
func runQueryPhase(ctx context.Context, env *envtest.Environment, k8s client.Client, cfg config, res *results) error {
	n := cfg.queryTwins
	res.QueryTwins, res.QueryRepetitions = n, cfg.queryReps
	kubectl := filepath.Join(os.Getenv("KUBEBUILDER_ASSETS"), "kubectl")
	if st, err := os.Stat(kubectl); err != nil || st.IsDir() {
		return fmt.Errorf("no kubectl binary in KUBEBUILDER_ASSETS (%s): hack/controlplane.sh builds one", kubectl)
	}
	tmp, err := os.MkdirTemp("", "kubetwin-bench-query-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(tmp) }()

	// The plugin is built while the fleet is created (neither is measured).
	plugin := filepath.Join(tmp, "kubectl-twin")
	built := make(chan error, 1)
	go func() { built <- buildPlugin(ctx, plugin) }()

	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: queryNS}}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating namespace %s: %w", queryNS, err)
	}
	t0 := time.Now()
	if err := createQueryFleet(ctx, k8s, n); err != nil {
		return err
	}
	res.QueryCreateSec = time.Since(t0).Seconds()
	if err := <-built; err != nil {
		return err
	}

	// A kubeconfig for both programs: a cluster administrator, as in
	// test/e2e/suite_test.go. kubectl gets its own discovery cache.
	kubeconfig, err := adminKubeconfig(env, tmp, "bench-query")
	if err != nil {
		return err
	}
	common := []string{"--kubeconfig", kubeconfig, "-n", queryNS}
	kubectlArgs := append([]string{"get", "devicetwins", "-o", "json", "--cache-dir", filepath.Join(tmp, "kube-cache")}, common...)

	// What the answers must be: a full scan, evaluated here.
	sel, err := query.Parse(querySelective)
	if err != nil {
		return err
	}
	resid, err := query.Parse(queryResidual)
	if err != nil {
		return err
	}
	selIDs, residIDs, scanned, err := queryFullScan(ctx, cfg, sel, resid)
	if err != nil {
		return fmt.Errorf("full scan: %w", err)
	}
	if scanned != n {
		return fmt.Errorf("full scan: %d twins in %s, want %d", scanned, queryNS, n)
	}
	res.QuerySelectiveExpected, res.QueryResidualExpected = len(selIDs), len(residIDs)
	sp, rp := sel.Plan(), resid.Plan()
	progress("query: full scan of %d twins: the selective query matches %d, the residual query %d", scanned, len(selIDs), len(residIDs))
	progress("  plugin's plan, selective: label selector %q, residual %q", sp.LabelSelector, sp.Residual)
	progress("  plugin's plan, residual:  label selector %q (lists every twin), residual %q", rp.LabelSelector, rp.Residual)

	label := "location.plant=" + queryPlant
	cmds := []struct {
		name  string
		bin   string
		args  []string
		want  []string // names / device ids expected (nil: only count)
		count int
		ids   func([]byte) ([]string, error)
		stats *queryStats
	}{
		{"kubectl get -l " + label, kubectl, append(slices.Clone(kubectlArgs), "-l", label), selIDs, len(selIDs), kubectlNames, &queryStats{}},
		{"kubectl-twin query (selective)", plugin, append([]string{"query", querySelective, "-o", "json"}, common...), selIDs, len(selIDs), pluginIDs, &queryStats{}},
		{"kubectl get (full list)", kubectl, slices.Clone(kubectlArgs), nil, n, kubectlNames, &queryStats{}},
		{"kubectl-twin query (residual)", plugin, append([]string{"query", queryResidual, "-o", "json"}, common...), residIDs, len(residIDs), pluginIDs, &queryStats{}},
	}
	// check compares an answer with the full scan; a wrong answer is
	// counted (the run then exits 1), not fatal.
	check := func(i int, out []byte) error {
		c := cmds[i]
		ids, err := c.ids(out)
		if err != nil {
			return fmt.Errorf("%s: output: %w", c.name, err)
		}
		c.stats.items, c.stats.bytes = len(ids), len(out)
		wrong := ""
		if len(ids) != c.count {
			wrong = fmt.Sprintf("%d twins, the full scan says %d", len(ids), c.count)
		} else if c.want != nil {
			slices.Sort(ids)
			if !slices.Equal(ids, c.want) {
				wrong = fmt.Sprintf("other twins than the full scan (%d, as many as it)", len(ids))
			}
		}
		if wrong != "" {
			res.QueryMismatches++
			progress("  WRONG ANSWER: %s returned %s", c.name, wrong)
		}
		return nil
	}
	progress("query: %d repetitions (after a warm-up of the selective pair) of: %s", cfg.queryReps, strings.Join(func() []string {
		var s []string
		for _, c := range cmds {
			s = append(s, c.name)
		}
		return s
	}(), "; "))
	for rep := -1; rep < cfg.queryReps; rep++ {
		// Alternate which program goes first, so neither always runs
		// right after the other's big list.
		order := []int{0, 1, 2, 3}
		if rep%2 != 0 {
			order = []int{1, 0, 3, 2}
		}
		if rep < 0 {
			// The warm-up (kubectl's discovery cache, both binaries in
			// the page cache) needs only the cheap pair.
			order = []int{0, 1}
		}
		var line []string
		for _, i := range order {
			c := cmds[i]
			d, out, err := timeProcess(ctx, c.bin, c.args)
			if err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			if err := check(i, out); err != nil {
				return err
			}
			if rep >= 0 {
				c.stats.times = append(c.stats.times, d)
			}
			line = append(line, fmt.Sprintf("%s %.0f ms", c.name, ms(d)))
		}
		what := "warm-up"
		if rep >= 0 {
			what = fmt.Sprintf("repetition %d", rep+1)
		}
		progress("  %s: %s", what, strings.Join(line, ", "))
	}

	res.QuerySelectiveKubectlMs, res.QuerySelectiveKubectlP90Ms = cmds[0].stats.medianP90()
	res.QuerySelectivePluginMs, res.QuerySelectivePluginP90Ms = cmds[1].stats.medianP90()
	res.QueryResidualKubectlMs, res.QueryResidualKubectlP90Ms = cmds[2].stats.medianP90()
	res.QueryResidualPluginMs, res.QueryResidualPluginP90Ms = cmds[3].stats.medianP90()
	res.QuerySelectiveKubectlItems, res.QuerySelectiveMatched = cmds[0].stats.items, cmds[1].stats.items
	res.QueryResidualKubectlItems, res.QueryResidualMatched = cmds[2].stats.items, cmds[3].stats.items
	res.QueryResidualKubectlBytes, res.QueryResidualPluginBytes = cmds[2].stats.bytes, cmds[3].stats.bytes
	if res.QuerySelectiveKubectlMs > 0 {
		res.QuerySelectiveRatio = res.QuerySelectivePluginMs / res.QuerySelectiveKubectlMs
	}
	if res.QueryResidualKubectlMs > 0 {
		res.QueryResidualRatio = res.QueryResidualPluginMs / res.QueryResidualKubectlMs
	}
	progress("  selective: plugin %.0f ms, kubectl -l %.0f ms (median): ratio %.2f; residual: plugin %.0f ms, kubectl full list %.0f ms: ratio %.2f",
		res.QuerySelectivePluginMs, res.QuerySelectiveKubectlMs, res.QuerySelectiveRatio,
		res.QueryResidualPluginMs, res.QueryResidualKubectlMs, res.QueryResidualRatio)
	return nil
}

// buildPlugin builds cmd/kubectl-twin into out.
func buildPlugin(ctx context.Context, out string) error {
	crds, err := findCRDs()
	if err != nil {
		return err
	}
	root := filepath.Dir(filepath.Dir(filepath.Dir(crds))) // <root>/config/crd/bases
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go") //nolint:staticcheck // fallback only
	}
	start := time.Now()
	bctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(bctx, goBin, "build", "-o", out, "./cmd/kubectl-twin")
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build -o %s ./cmd/kubectl-twin: %v\n%s", out, err, b)
	}
	progress("query: built the plugin (go build ./cmd/kubectl-twin) in %.1fs", time.Since(start).Seconds())
	return nil
}

// createQueryFleet creates the fleet's n twins, queryCreateParallel at a
// time: each with its labels, then its status through the status
// subresource (a create ignores status).
func createQueryFleet(ctx context.Context, k8s client.Client, n int) error {
	progress("query: creating %d twins in namespace %s (labels mirrored from tags, then status with reported properties), %d at a time",
		n, queryNS, queryCreateParallel)
	start := time.Now()
	c0 := sampleCPU()
	now := time.Now().UTC().Truncate(time.Second)
	var done atomic.Int64
	defer reportEvery(5*time.Second, func() { progress("  query twins: %d/%d created", done.Load(), n) })()
	err := forEachParallel(ctx, n, queryCreateParallel, func(i int) error {
		if err := createQueryTwin(ctx, k8s, i, now); err != nil {
			return err
		}
		done.Add(1)
		return nil
	})
	if err != nil {
		return err
	}
	el := time.Since(start)
	progress("  query twins: %d created in %.1fs (%.0f/s); CPU cores: %s", n, el.Seconds(), float64(n)/el.Seconds(), coresString(coresBetween(c0, sampleCPU())))
	return nil
}

// createQueryTwin creates twin i as the operator would leave it: labels
// mirrored from its tags, then (a create ignores status) its status,
// through a merge patch of the status subresource.
func createQueryTwin(ctx context.Context, k8s client.Client, i int, now time.Time) error {
	tags, reported, connected := queryTwinDocs(i)
	name := queryTwinName(i)
	t := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: queryNS, Name: name, Labels: twin.MirrorLabels(tags)}}
	t.Spec.Tags = &apiextensionsv1.JSON{Raw: twin.Encode(tags)}
	if err := k8s.Create(ctx, t); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating %s/%s: %w", queryNS, name, err)
	}
	state := v1alpha1.ConnectionStateDisconnected
	if connected {
		state = v1alpha1.ConnectionStateConnected
	}
	status := map[string]any{
		"deviceId":         name,
		"reported":         json.RawMessage(twin.Encode(reported)),
		"reportedVersion":  1,
		"connectionState":  state,
		"lastActivityTime": now.Format(time.RFC3339),
	}
	patch, err := json.Marshal(map[string]any{"status": status})
	if err != nil {
		return err
	}
	if err := k8s.Status().Patch(ctx, t, client.RawPatch(types.MergePatchType, patch)); err != nil {
		return fmt.Errorf("writing the status of %s/%s: %w", queryNS, name, err)
	}
	return nil
}

// queryFullScan lists every twin of the fleet (no selector) and answers
// both queries over all of them with internal/query: the sorted device
// ids each matches, and how many twins there are.
func queryFullScan(ctx context.Context, cfg config, sel, resid *query.Query) (selIDs, residIDs []string, scanned int, err error) {
	c, err := kubectltwin.NewClient(cfg.restCfg)
	if err != nil {
		return nil, nil, 0, err
	}
	var docs []map[string]any
	_, err = kubectltwin.ListTwins(ctx, c, kubectltwin.ListOptions{Namespace: queryNS, ChunkSize: kubectltwin.DefaultChunkSize},
		func(items []v1alpha1.DeviceTwin) error {
			for i := range items {
				docs = append(docs, hubtwin.FromDeviceTwin(&items[i]))
			}
			return nil
		})
	if err != nil {
		return nil, nil, 0, err
	}
	ids := func(q *query.Query) ([]string, error) {
		r, err := q.Run(docs)
		if err != nil {
			return nil, err
		}
		var out []string
		for _, it := range r.Items {
			id, _ := it["deviceId"].(string)
			out = append(out, id)
		}
		slices.Sort(out)
		return out, nil
	}
	if selIDs, err = ids(sel); err != nil {
		return nil, nil, 0, err
	}
	if residIDs, err = ids(resid); err != nil {
		return nil, nil, 0, err
	}
	return selIDs, residIDs, len(docs), nil
}

// timeProcess runs bin with args and returns its wall time (start to exit)
// and standard output.
func timeProcess(ctx context.Context, bin string, args []string) (time.Duration, []byte, error) {
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(cctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	d := time.Since(start)
	if err != nil {
		return d, nil, fmt.Errorf("%v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return d, stdout.Bytes(), nil
}

// kubectlNames returns the names of the items of kubectl's -o json list
// (the fleet's names are its device ids).
func kubectlNames(out []byte) ([]string, error) {
	var list struct {
		Items []struct {
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		} `json:"items"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return nil, err
	}
	names := make([]string, len(list.Items))
	for i, it := range list.Items {
		names[i] = it.Metadata.Name
	}
	return names, nil
}

// pluginIDs returns the device ids of the plugin's -o json answer (a JSON
// array of twin documents).
func pluginIDs(out []byte) ([]string, error) {
	var docs []struct {
		DeviceID *string `json:"deviceId"`
	}
	if err := json.Unmarshal(out, &docs); err != nil {
		return nil, err
	}
	ids := make([]string, len(docs))
	for i, d := range docs {
		if d.DeviceID == nil {
			return nil, errors.New("a twin document without deviceId")
		}
		ids[i] = *d.DeviceID
	}
	return ids, nil
}
