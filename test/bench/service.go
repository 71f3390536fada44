package main

// Phase (e), service API: the operator's IoT Hub service REST API
// (internal/hubapi) used the way a back end with an Azure IoT service SDK
// uses it, against the API server's own rate on the same twins.
//
// The handler and its HTTPS server run in the operator's manager, added
// with internal/operator.AddServiceAPI as cmd/manager adds them: reads from
// the manager's cache (with the device id index the reconciler registers),
// writes through the manager's client, the shared access policies from
// hubapi.EnsurePolicies, and AwaitReconcile set. The server listens on 127.0.0.1:0 with a self-signed certificate
// the client trusts. Every request carries the SDKs' token
// (SharedAccessSignature sr=<hub>&sig=...&skn=service&se=..., signed once
// for an hour with the "service" policy's key, as the SDKs cache it) and
// ?api-version=2021-04-12.
//
// --service-twins twins (tags spread over servicePlants plants, desired
// {"setpoint": 0, "mode": "eco"}) are created with the device twins,
// before the operator starts. While the operator runs (after phase (c)),
// --service-concurrency workers in a closed loop (each sends its next
// request when the previous one is answered) run, each workload for
// --service-duration (the two queries for a quarter of it each):
//
//   - reads: GET /twins/{id}; every 200 must carry the twin's deviceId;
//   - updates: PATCH /twins/{id} with If-Match "*" and
//     {"properties":{"desired":{"setpoint":k}}}, k a global sequence; a
//     worker owns its twins (no two writes of one twin are in flight), so
//     afterwards every twin's spec.desired.setpoint, read with the
//     non-caching client, must be the last k that got a 200 for it (or one
//     sent after it whose request failed: it may have been applied);
//   - queries: POST /devices/query with a selective tag query (one plant;
//     one page), and the full fleet (SELECT * FROM devices: every twin of
//     the namespace the service API serves, --registry-namespace; the
//     device phase's twins are in another) in pages of 100 following
//     x-ms-continuation; the answer must be exactly the twins expected,
//     each once.
//
// Once the operator has stopped, the baselines repeat each workload on the
// same twins, with the same concurrency and length, straight against the
// API server with a non-caching client that has no client-side rate limit:
// GETs, JSON merge patches of spec.desired, a List with the label
// selector the query planner derives, and a List of every DeviceTwin in
// pages of 100.
//
// What the update ratio means: a service API update is more than a patch.
// It reads the twin from the cache, sends a merge patch with a
// resourceVersion precondition, waits until the cache shows the write
// (so the client reads its own write), then, with AwaitReconcile, until
// the operator has reconciled that generation, whose status write is a
// second API-server write, and replies with that copy, so the etag it
// returns stays valid for the client's next write. So each update costs
// the API server 1 + "status writes per update" writes (reported), plus
// the operator's CPU on the same machine. When the API server is the
// bottleneck (its CPU cores are shown for both windows; "operator" is this
// process, the bench's HTTP clients included) the ratio tends
// to 1 / (1 + status writes per update), about 0.5: the price of the
// status, not of the API layer. When it is not, the closed loop's rate is
// concurrency / latency, and the ratio measures the chain of round trips
// (two writes, two watch deliveries) instead; more concurrency then buys
// more updates/s. Reads and queries are served from the cache, so they
// may beat the API server.
//
// Non-2xx replies are counted by status and shown apart (429 and 5xx are
// load, not wrong answers); a 200 with a wrong body, any other 4xx, a twin
// not holding its last acknowledged setpoint or a wrong query answer is a
// mismatch, and the run exits 1.

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubapi"
	kubetwin "github.com/kubetwin/kubetwin/internal/operator"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/testutil/selfsigned"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

const (
	// serviceNS holds the service phase's twins and the policies Secret.
	serviceNS = "bench-service"
	// serviceHub is the hub host name: the resource (sr) of the tokens.
	serviceHub = "bench-hub.kubetwin.test"
	// servicePolicySecret names the shared access policies Secret.
	servicePolicySecret = "kubetwin-service-policies"
	// serviceAPIVersion is the api-version the service SDKs send.
	serviceAPIVersion = "2021-04-12"
	// servicePlants is how many plants the twins are spread over (twin i
	// is in plant i mod servicePlants): the selective query picks one.
	servicePlants = 20
	// servicePageSize is the x-ms-max-item-count of the queries.
	servicePageSize = 100
)

var (
	servicePlant     = servicePlantName(7)
	serviceSelective = fmt.Sprintf("SELECT * FROM devices WHERE tags.location.plant = '%s'", servicePlant)
	serviceFullQuery = "SELECT * FROM devices"
)

func serviceTwinName(i int) string  { return fmt.Sprintf("svc-%04d", i) }
func servicePlantName(p int) string { return fmt.Sprintf("svc-plant-%02d", p) }

// serviceTwinTags are the tags of service twin i.
func serviceTwinTags(i int) twin.Doc {
	return twin.Doc{
		"location": twin.Doc{"plant": servicePlantName(i % servicePlants), "building": fmt.Sprintf("b%d", i%3)},
		"customer": fmt.Sprintf("customer-%02d", i%7),
	}
}

// createServiceTwins creates the n service twins with tags and desired
// properties, 32 at a time.
func createServiceTwins(ctx context.Context, k8s client.Client, n int) error {
	progress("service: creating %d twins with tags and desired properties in namespace %s", n, serviceNS)
	start := time.Now()
	desired := twin.Encode(twin.Doc{"setpoint": json.Number("0"), "mode": "eco"})
	err := forEachParallel(ctx, n, 32, func(i int) error {
		t := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: serviceNS, Name: serviceTwinName(i)}}
		t.Spec.Tags = &apiextensionsv1.JSON{Raw: twin.Encode(serviceTwinTags(i))}
		t.Spec.Desired = &apiextensionsv1.JSON{Raw: desired}
		if err := k8s.Create(ctx, t); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating %s/%s: %w", serviceNS, t.Name, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	progress("  service twins: %d created in %.1fs", n, time.Since(start).Seconds())
	return nil
}

// serviceAPI is the service API served by the operator's manager, and a
// client of it.
type serviceAPI struct {
	srv     *hubapi.Server
	baseURL string // set once the server listens
	token   string // the Authorization header
	httpc   *http.Client
	reqID   atomic.Int64
}

// addServiceAPI ensures the policies Secret, signs the token and adds the
// service API's server to mgr (before it starts), as
// cmd/manager/serviceapi.go does.
func addServiceAPI(ctx context.Context, mgr ctrl.Manager, cfg config) (*serviceAPI, error) {
	tlsCfg, pool, err := selfSignedTLS()
	if err != nil {
		return nil, fmt.Errorf("certificate: %w", err)
	}
	policies := types.NamespacedName{Namespace: serviceNS, Name: servicePolicySecret}
	srv, err := kubetwin.AddServiceAPI(ctx, mgr, kubetwin.ServiceAPIOptions{
		Addr: "127.0.0.1:0", TLSConfig: tlsCfg, Hostname: serviceHub, Namespace: serviceNS,
		Policies: policies, AwaitReconcile: kubetwin.AwaitReconcile,
	})
	if err != nil {
		return nil, err
	}
	// The service policy's key, read as a back end's operator would.
	live, err := client.New(mgr.GetConfig(), client.Options{Scheme: scheme})
	if err != nil {
		return nil, err
	}
	sec := &corev1.Secret{}
	if err := live.Get(ctx, policies, sec); err != nil {
		return nil, err
	}
	key, err := sas.DecodeKey(string(sec.Data[hubapi.PolicyService+hubapi.PrimaryKeySuffix]))
	if err != nil {
		return nil, fmt.Errorf("the %s policy's key: %w", hubapi.PolicyService, err)
	}
	conns := cfg.serviceConcurrency + 4
	return &serviceAPI{
		srv:   srv,
		token: sas.Sign(serviceHub, key, time.Now().Add(time.Hour), hubapi.PolicyService),
		httpc: &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{
			TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
			MaxIdleConns:        conns,
			MaxIdleConnsPerHost: conns,
			IdleConnTimeout:     time.Minute,
		}},
	}, nil
}

// selfSignedTLS returns a server TLS configuration for 127.0.0.1 and the
// pool that trusts it.
func selfSignedTLS() (*tls.Config, *x509.CertPool, error) {
	cert, pool, err := selfsigned.New(serviceHub)
	if err != nil {
		return nil, nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}}, pool, nil
}

// do sends one request as the service SDKs do and returns the status, the
// reply's headers and body (status 0: the request failed).
func (s *serviceAPI) do(ctx context.Context, method, path string, hdr map[string]string, body []byte) (int, http.Header, []byte, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, s.baseURL+path+"?api-version="+serviceAPIVersion, rd)
	if err != nil {
		return 0, nil, nil, err
	}
	req.Header.Set("Authorization", s.token)
	req.Header.Set("Request-Id", strconv.FormatInt(s.reqID.Add(1), 10))
	req.Header.Set("User-Agent", "kubetwin-bench")
	if body != nil {
		req.Header.Set("Content-Type", "application/json; charset=utf-8")
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := s.httpc.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, nil, err
	}
	return resp.StatusCode, resp.Header, data, nil
}

// loadStats is what a closed-loop workload measured.
type loadStats struct {
	ok      int64
	lat     []time.Duration // of the 2xx calls, sorted
	byCode  map[int]int64   // non-2xx replies by status; 0: the request failed
	elapsed time.Duration
	first   error // the first failure
}

func (s *loadStats) rate() float64 {
	if s.elapsed <= 0 {
		return 0
	}
	return float64(s.ok) / s.elapsed.Seconds()
}

func (s *loadStats) failed() int64 {
	var n int64
	for _, v := range s.byCode {
		n += v
	}
	return n
}

// codes renders the non-2xx counts: "none" or "429: 3, error: 1".
func codes(m map[int]int64) string {
	if len(m) == 0 {
		return "none"
	}
	var keys []int
	for k := range m {
		keys = append(keys, k)
	}
	sort.Ints(keys)
	var parts []string
	for _, k := range keys {
		name := strconv.Itoa(k)
		if k == 0 {
			name = "error"
		}
		parts = append(parts, fmt.Sprintf("%s: %d", name, m[k]))
	}
	return strings.Join(parts, ", ")
}

// codeMap is m with string keys, for the JSON line.
func codeMap(m map[int]int64) map[string]int64 {
	out := map[string]int64{}
	for k, v := range m {
		name := strconv.Itoa(k)
		if k == 0 {
			name = "error"
		}
		out[name] = v
	}
	return out
}

// closedLoop runs workers workers for d; worker w calls op(w, n) for its
// n-th call (from 0) as soon as the previous one returned, until d has
// passed. op returns the HTTP status of the call (0 when it failed
// without one) and an error describing a failure.
func closedLoop(ctx context.Context, workers int, d time.Duration, op func(ctx context.Context, w, n int) (int, error)) loadStats {
	type workerStats struct {
		ok     int64
		lat    []time.Duration
		byCode map[int]int64
		first  error
	}
	per := make([]workerStats, workers)
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(d)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ws := &per[w]
			ws.byCode = map[int]int64{}
			for n := 0; time.Now().Before(deadline) && ctx.Err() == nil; n++ {
				t0 := time.Now()
				code, err := op(ctx, w, n)
				if code >= 200 && code < 300 {
					ws.ok++
					ws.lat = append(ws.lat, time.Since(t0))
					continue
				}
				ws.byCode[code]++
				if ws.first == nil {
					ws.first = err
					if err == nil {
						ws.first = fmt.Errorf("status %d", code)
					}
				}
			}
		}()
	}
	wg.Wait()
	st := loadStats{elapsed: time.Since(start), byCode: map[int]int64{}}
	for _, ws := range per {
		st.ok += ws.ok
		st.lat = append(st.lat, ws.lat...)
		for k, v := range ws.byCode {
			st.byCode[k] += v
		}
		if st.first == nil {
			st.first = ws.first
		}
	}
	slices.Sort(st.lat)
	return st
}

// apiStatus is the HTTP status of an API-server call's error (200 for
// none, 0 when there was no reply).
func apiStatus(err error) int {
	if err == nil {
		return http.StatusOK
	}
	var st apierrors.APIStatus
	if errors.As(err, &st) && st.Status().Code != 0 {
		return int(st.Status().Code)
	}
	return 0
}

// serviceDoc is the part of a twin document the checks read.
type serviceDoc struct {
	DeviceID   string `json:"deviceId"`
	Properties struct {
		Desired struct {
			Setpoint json.Number `json:"setpoint"`
		} `json:"desired"`
	} `json:"properties"`
}

// serviceCounters are the mismatches the service phase found.
type serviceCounters struct {
	reads, updates, queries atomic.Int64
	shown                   atomic.Int64
}

// show prints the first few mismatches.
func (c *serviceCounters) show(format string, args ...any) {
	if c.shown.Add(1) <= 10 {
		progress("  MISMATCH: "+format, args...)
	}
}

// unexpected reports whether a non-2xx status is a wrong answer rather
// than load: any 4xx but 429.
func unexpected(code int) bool {
	return code >= 400 && code < 500 && code != http.StatusTooManyRequests
}

// runServicePhase is phase (e) against the service API, with the operator
// running; the baselines come later (runServiceBaselines).
func runServicePhase(ctx context.Context, k8s client.Client, svc *serviceAPI, cfg config, res *results) error {
	n, conc, d := cfg.serviceTwins, cfg.serviceConcurrency, cfg.serviceDuration
	qd := d / 4
	res.ServiceTwins, res.ServiceConcurrency, res.ServiceDurationSec, res.ServiceQueryDurationSec = n, conc, d.Seconds(), qd.Seconds()
	var bad serviceCounters

	// What the queries must answer: the twins of the selected plant, and
	// every twin of the namespace the service API serves, each once.
	var selWant []string
	for i := 0; i < n; i++ {
		if i%servicePlants == 7 {
			selWant = append(selWant, serviceTwinName(i))
		}
	}
	fullWant, err := allDeviceIDs(ctx, k8s)
	if err != nil {
		return err
	}
	res.ServiceFleet, res.ServiceSelectiveExpected = len(fullWant), len(selWant)
	q, err := query.Parse(serviceSelective)
	if err != nil {
		return err
	}
	progress("service: API at %s; %d twins, %d workers; the fleet has %d twins; the selective query's plan: label selector %q",
		svc.baseURL, n, conc, len(fullWant), q.Plan().LabelSelector)

	// Warm-up (not measured): reads in parallel open the connections.
	if err := forEachParallel(ctx, 4*conc, conc, func(i int) error {
		code, _, body, err := svc.do(ctx, http.MethodGet, "/twins/"+url.PathEscape(serviceTwinName(i%n)), nil, nil)
		if code != http.StatusOK {
			return fmt.Errorf("warm-up read of %s: %d %s %v", serviceTwinName(i%n), code, clipBody(body), err)
		}
		return nil
	}); err != nil {
		return err
	}

	// Reads: worker w reads twins w, w+conc, ... in turn.
	progress("service: GET /twins/{id}, %d in flight, for %s", conc, d)
	reads := closedLoop(ctx, conc, d, func(ctx context.Context, w, k int) (int, error) {
		id := serviceTwinName((w + k*conc) % n)
		code, _, body, err := svc.do(ctx, http.MethodGet, "/twins/"+url.PathEscape(id), nil, nil)
		if code == http.StatusOK {
			var doc serviceDoc
			if err := json.Unmarshal(body, &doc); err != nil || doc.DeviceID != id {
				bad.reads.Add(1)
				bad.show("GET /twins/%s: 200 with deviceId %q (%v)", id, doc.DeviceID, err)
			}
		} else if unexpected(code) {
			bad.reads.Add(1)
			bad.show("GET /twins/%s: %d %s", id, code, clipBody(body))
		}
		return code, err
	})
	if err := ctx.Err(); err != nil {
		return err
	}
	setLoad(&reads, &res.ServiceReadsPerSec, &res.ServiceReadP50Ms, &res.ServiceReadP99Ms, &res.ServiceReadNon2xx)
	progress("  %d reads: %.0f/s, p50 %.1f ms, p99 %.1f ms; non-2xx: %s", reads.ok, reads.rate(), res.ServiceReadP50Ms, res.ServiceReadP99Ms, codes(reads.byCode))

	// Updates: worker w owns twins w, w+workers, ...: one write of a twin
	// in flight at a time, so "the last 200" of a twin is well defined.
	uw := min(conc, n)
	lastOK := make([]int64, n)      // the setpoint of the last 200 (0: none)
	uncertain := make([][]int64, n) // setpoints sent after it whose request failed
	owned := func(w, k int) int {   // worker w's k-th twin
		cnt := (n - w + uw - 1) / uw // twins w, w+uw, ... below n
		return w + (k%cnt)*uw
	}
	var seq atomic.Int64
	s0, _ := statusWrites()
	c0 := sampleCPU()
	progress("service: PATCH /twins/{id} (If-Match *, desired.setpoint), %d in flight, for %s", uw, d)
	updates := closedLoop(ctx, uw, d, func(ctx context.Context, w, k int) (int, error) {
		i := owned(w, k)
		id := serviceTwinName(i)
		sp := seq.Add(1)
		body := fmt.Appendf(nil, `{"properties":{"desired":{"setpoint":%d}}}`, sp)
		code, _, reply, err := svc.do(ctx, http.MethodPatch, "/twins/"+url.PathEscape(id), map[string]string{"If-Match": "*"}, body)
		switch {
		case code == http.StatusOK:
			lastOK[i], uncertain[i] = sp, nil
			var doc serviceDoc
			if err := json.Unmarshal(reply, &doc); err != nil || doc.DeviceID != id || doc.Properties.Desired.Setpoint.String() != strconv.FormatInt(sp, 10) {
				bad.updates.Add(1)
				bad.show("PATCH /twins/%s setpoint %d: 200 with deviceId %q, setpoint %q (%v)", id, sp, doc.DeviceID, doc.Properties.Desired.Setpoint, err)
			}
		case code >= 200 && code < 300:
			lastOK[i], uncertain[i] = sp, nil // not expected: PATCH answers 200
		default:
			uncertain[i] = append(uncertain[i], sp)
			if unexpected(code) {
				bad.updates.Add(1)
				bad.show("PATCH /twins/%s: %d %s", id, code, clipBody(reply))
			}
		}
		return code, err
	})
	if err := ctx.Err(); err != nil {
		return err
	}
	s1, _ := statusWrites()
	res.CPUServiceUpdates = coresBetween(c0, sampleCPU())
	setLoad(&updates, &res.ServiceUpdatesPerSec, &res.ServiceUpdateP50Ms, &res.ServiceUpdateP99Ms, &res.ServiceUpdateNon2xx)
	if updates.ok > 0 {
		res.ServiceStatusWritesPerUpdate = float64(s1-s0) / float64(updates.ok)
	}
	progress("  %d updates: %.0f/s, p50 %.1f ms, p99 %.1f ms; non-2xx: %s; operator status writes meanwhile: %d (%.2f per update); CPU cores: %s",
		updates.ok, updates.rate(), res.ServiceUpdateP50Ms, res.ServiceUpdateP99Ms, codes(updates.byCode), s1-s0, res.ServiceStatusWritesPerUpdate,
		coresString(res.CPUServiceUpdates))

	// Every twin must hold the last setpoint that got a 200 (0, the
	// initial one, when none did), read from the API server.
	var list v1alpha1.DeviceTwinList
	if err := k8s.List(ctx, &list, client.InNamespace(serviceNS)); err != nil {
		return fmt.Errorf("listing the service twins: %w", err)
	}
	got := map[string]string{}
	for i := range list.Items {
		t := &list.Items[i]
		var desired struct {
			Setpoint json.Number `json:"setpoint"`
		}
		if t.Spec.Desired != nil {
			_ = json.Unmarshal(t.Spec.Desired.Raw, &desired)
		}
		got[t.Name] = desired.Setpoint.String()
	}
	for i := 0; i < n; i++ {
		name := serviceTwinName(i)
		ok := got[name] == strconv.FormatInt(lastOK[i], 10)
		for _, u := range uncertain[i] {
			ok = ok || got[name] == strconv.FormatInt(u, 10)
		}
		if !ok {
			res.ServiceSetpointMismatches++
			bad.show("%s/%s: spec.desired.setpoint is %q, the last acknowledged update set %d (failed updates after it: %v)",
				serviceNS, name, got[name], lastOK[i], uncertain[i])
		}
	}
	progress("  setpoints checked (non-caching List): %d of %d twins do not hold their last acknowledged update", res.ServiceSetpointMismatches, n)

	// Queries: every reply must be exactly the twins expected, each once.
	for _, ql := range []struct {
		what, q string
		want    []string
		median  *float64
		p90     *float64
		perSec  *float64
		non2xx  *map[string]int64
		pages   *int
	}{
		{"selective", serviceSelective, selWant, &res.ServiceSelectiveMs, &res.ServiceSelectiveP90Ms, &res.ServiceSelectivePerSec, &res.ServiceSelectiveNon2xx, &res.ServiceSelectivePages},
		{"full fleet", serviceFullQuery, fullWant, &res.ServiceFullMs, &res.ServiceFullP90Ms, &res.ServiceFullPerSec, &res.ServiceFullNon2xx, &res.ServiceFullPages},
	} {
		progress("service: POST /devices/query %q (%s, pages of %d), %d in flight, for %s", ql.q, ql.what, servicePageSize, conc, qd)
		var pages atomic.Int64
		st := closedLoop(ctx, conc, qd, func(ctx context.Context, _, _ int) (int, error) {
			code, ids, np, body, err := svc.query(ctx, ql.q)
			switch {
			case code == http.StatusOK:
				pages.Store(int64(np))
				if wrong := sameIDs(ids, ql.want); wrong != "" {
					bad.queries.Add(1)
					bad.show("query %q: %s", ql.q, wrong)
				}
			case unexpected(code):
				bad.queries.Add(1)
				bad.show("query %q: %d %s", ql.q, code, clipBody(body))
			}
			return code, err
		})
		if err := ctx.Err(); err != nil {
			return err
		}
		*ql.median, *ql.p90 = ms(percentile(st.lat, 50)), ms(percentile(st.lat, 90))
		*ql.perSec, *ql.non2xx, *ql.pages = st.rate(), codeMap(st.byCode), int(pages.Load())
		progress("  %d queries (%d twins, %d pages each): %.1f/s (%.0f/min), median %.1f ms, p90 %.1f ms; non-2xx: %s",
			st.ok, len(ql.want), pages.Load(), st.rate(), 60*st.rate(), *ql.median, *ql.p90, codes(st.byCode))
		logFirst(&st)
	}
	logFirst(&reads)
	logFirst(&updates)
	res.ServiceReadMismatches, res.ServiceUpdateMismatches, res.ServiceQueryMismatches = int(bad.reads.Load()), int(bad.updates.Load()), int(bad.queries.Load())
	return nil
}

// logFirst prints the first failure of a workload, if any.
func logFirst(st *loadStats) {
	if st.first != nil {
		progress("  %d calls failed (%s), the first with: %v", st.failed(), codes(st.byCode), st.first)
	}
}

// setLoad stores a workload's rate, p50 and p99 in ms and non-2xx counts.
func setLoad(st *loadStats, rate, p50, p99 *float64, non2xx *map[string]int64) {
	*rate, *p50, *p99 = st.rate(), ms(percentile(st.lat, 50)), ms(percentile(st.lat, 99))
	*non2xx = codeMap(st.byCode)
}

// sameIDs compares an answer's device ids with the sorted, distinct ids
// expected: "" when they are the same, each once, else what differs.
func sameIDs(got, want []string) string {
	got = slices.Clone(got)
	slices.Sort(got)
	if slices.Equal(got, want) {
		return ""
	}
	var dups, missing, extra int
	seen := map[string]int{}
	for _, id := range got {
		seen[id]++
		if seen[id] == 2 {
			dups++
		}
	}
	for _, id := range want {
		if seen[id] == 0 {
			missing++
		}
		delete(seen, id)
	}
	extra = len(seen)
	return fmt.Sprintf("%d twins, want %d: %d repeated, %d missing, %d unexpected", len(got), len(want), dups, missing, extra)
}

// query runs a query to its end, following x-ms-continuation, and returns
// the status (of the first failed page, else 200), the device ids of every
// page, the number of pages, and the body of a failed page.
func (s *serviceAPI) query(ctx context.Context, q string) (int, []string, int, []byte, error) {
	body, err := json.Marshal(map[string]string{"query": q})
	if err != nil {
		return 0, nil, 0, nil, err
	}
	var ids []string
	cont := ""
	for pages := 1; ; pages++ {
		hdr := map[string]string{hubapi.HeaderMaxItemCount: strconv.Itoa(servicePageSize)}
		if cont != "" {
			hdr[hubapi.HeaderContinuation] = cont
		}
		code, h, data, err := s.do(ctx, http.MethodPost, "/devices/query", hdr, body)
		if code != http.StatusOK {
			return code, nil, pages, data, err
		}
		var docs []serviceDoc
		if err := json.Unmarshal(data, &docs); err != nil {
			return code, nil, pages, data, fmt.Errorf("page %d: %w", pages, err)
		}
		for _, d := range docs {
			ids = append(ids, d.DeviceID)
		}
		if cont = h.Get(hubapi.HeaderContinuation); cont == "" {
			return code, ids, pages, nil, nil
		}
		if pages > 100000 {
			return 0, nil, pages, nil, errors.New("more than 100000 pages: the continuation does not end")
		}
	}
}

// allDeviceIDs lists every DeviceTwin of serviceNS (the namespace the
// service API serves) from the API server and returns their device ids, sorted.
func allDeviceIDs(ctx context.Context, k8s client.Client) ([]string, error) {
	var list v1alpha1.DeviceTwinList
	if err := k8s.List(ctx, &list, client.InNamespace(serviceNS)); err != nil {
		return nil, fmt.Errorf("listing the twins of %s: %w", serviceNS, err)
	}
	ids := make([]string, 0, len(list.Items))
	for i := range list.Items {
		if list.Items[i].DeletionTimestamp.IsZero() {
			ids = append(ids, list.Items[i].EffectiveDeviceID())
		}
	}
	slices.Sort(ids)
	return ids, nil
}

func clipBody(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

// runServiceBaselines measures, once the operator has stopped, the
// baselines of phase (e) on the same twins with the same concurrency and
// lengths, through a non-caching client without client-side rate limit.
func runServiceBaselines(ctx context.Context, cfg config, res *results) error {
	n, conc, d := cfg.serviceTwins, cfg.serviceConcurrency, cfg.serviceDuration
	qd := d / 4
	rc := rest.CopyConfig(cfg.restCfg)
	rc.QPS, rc.Burst = -1, 0 // no client-side rate limit: the API server's own rate
	raw, err := client.New(rc, client.Options{Scheme: scheme})
	if err != nil {
		return err
	}
	// Warm-up (not measured).
	if err := forEachParallel(ctx, 4*conc, conc, func(i int) error {
		return raw.Get(ctx, client.ObjectKey{Namespace: serviceNS, Name: serviceTwinName(i % n)}, &v1alpha1.DeviceTwin{})
	}); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}

	progress("service baseline (operator stopped): GET devicetwins/{name} from the API server, %d in flight, for %s", conc, d)
	var badReads atomic.Int64
	reads := closedLoop(ctx, conc, d, func(ctx context.Context, w, k int) (int, error) {
		name := serviceTwinName((w + k*conc) % n)
		t := &v1alpha1.DeviceTwin{}
		err := raw.Get(ctx, client.ObjectKey{Namespace: serviceNS, Name: name}, t)
		if err == nil && t.Name != name {
			badReads.Add(1)
		}
		return apiStatus(err), err
	})
	if err := ctx.Err(); err != nil {
		return err
	}
	setLoad(&reads, &res.BaseReadsPerSec, &res.BaseReadP50Ms, &res.BaseReadP99Ms, &res.BaseReadNon2xx)
	progress("  %d reads: %.0f/s, p50 %.1f ms, p99 %.1f ms; non-2xx: %s", reads.ok, reads.rate(), res.BaseReadP50Ms, res.BaseReadP99Ms, codes(reads.byCode))
	logFirst(&reads)

	uw := min(conc, n)
	var seq atomic.Int64
	seq.Store(1 << 40)
	progress("service baseline: JSON merge patches of spec.desired.setpoint, %d in flight, for %s", uw, d)
	c0 := sampleCPU()
	updates := closedLoop(ctx, uw, d, func(ctx context.Context, w, k int) (int, error) {
		cnt := (n - w + uw - 1) / uw
		t := &v1alpha1.DeviceTwin{}
		t.Namespace, t.Name = serviceNS, serviceTwinName(w+(k%cnt)*uw)
		patch := fmt.Appendf(nil, `{"spec":{"desired":{"setpoint":%d}}}`, seq.Add(1))
		err := raw.Patch(ctx, t, client.RawPatch(types.MergePatchType, patch))
		return apiStatus(err), err
	})
	if err := ctx.Err(); err != nil {
		return err
	}
	res.CPUServiceBaseUpdates = coresBetween(c0, sampleCPU())
	setLoad(&updates, &res.BaseUpdatesPerSec, &res.BaseUpdateP50Ms, &res.BaseUpdateP99Ms, &res.BaseUpdateNon2xx)
	progress("  %d patches: %.0f/s, p50 %.1f ms, p99 %.1f ms; non-2xx: %s; CPU cores: %s", updates.ok, updates.rate(),
		res.BaseUpdateP50Ms, res.BaseUpdateP99Ms, codes(updates.byCode), coresString(res.CPUServiceBaseUpdates))
	logFirst(&updates)

	q, err := query.Parse(serviceSelective)
	if err != nil {
		return err
	}
	sel, err := labels.Parse(q.Plan().LabelSelector)
	if err != nil {
		return fmt.Errorf("the selective query's label selector %q: %w", q.Plan().LabelSelector, err)
	}
	var badLists atomic.Int64
	for _, bl := range []struct {
		what   string
		list   func(ctx context.Context) (int, error)
		want   int
		median *float64
		p90    *float64
		non2xx *map[string]int64
	}{
		{"List -l " + sel.String() + " (namespace " + serviceNS + ")", func(ctx context.Context) (int, error) {
			var l v1alpha1.DeviceTwinList
			err := raw.List(ctx, &l, client.InNamespace(serviceNS), client.MatchingLabelsSelector{Selector: sel})
			return len(l.Items), err
		}, res.ServiceSelectiveExpected, &res.BaseSelectiveMs, &res.BaseSelectiveP90Ms, &res.BaseSelectiveNon2xx},
		{fmt.Sprintf("List of every twin of %s, pages of %d", serviceNS, servicePageSize), func(ctx context.Context) (int, error) {
			items, cont := 0, ""
			for {
				var l v1alpha1.DeviceTwinList
				if err := raw.List(ctx, &l, client.InNamespace(serviceNS), client.Limit(servicePageSize), client.Continue(cont)); err != nil {
					return items, err
				}
				items += len(l.Items)
				if cont = l.Continue; cont == "" {
					return items, nil
				}
			}
		}, res.ServiceFleet, &res.BaseFullMs, &res.BaseFullP90Ms, &res.BaseFullNon2xx},
	} {
		progress("service baseline: %s, %d in flight, for %s", bl.what, conc, qd)
		st := closedLoop(ctx, conc, qd, func(ctx context.Context, _, _ int) (int, error) {
			items, err := bl.list(ctx)
			if err == nil && items != bl.want {
				if badLists.Add(1) == 1 {
					progress("  %s returned %d twins, want %d", bl.what, items, bl.want)
				}
			}
			return apiStatus(err), err
		})
		if err := ctx.Err(); err != nil {
			return err
		}
		*bl.median, *bl.p90, *bl.non2xx = ms(percentile(st.lat, 50)), ms(percentile(st.lat, 90)), codeMap(st.byCode)
		progress("  %d lists: %.1f/s, median %.1f ms, p90 %.1f ms; non-2xx: %s", st.ok, st.rate(), *bl.median, *bl.p90, codes(st.byCode))
		logFirst(&st)
	}
	if n := badReads.Load() + badLists.Load(); n > 0 {
		// Not the operator's fault, but the comparison is void.
		return fmt.Errorf("the baseline's answers were wrong %d times (reads %d, lists %d)", n, badReads.Load(), badLists.Load())
	}

	ratio := func(a, b float64) float64 {
		if b <= 0 {
			return 0
		}
		return a / b
	}
	res.ServiceReadRatio = ratio(res.ServiceReadsPerSec, res.BaseReadsPerSec)
	res.ServiceUpdateRatio = ratio(res.ServiceUpdatesPerSec, res.BaseUpdatesPerSec)
	res.ServiceSelectiveRatio = ratio(res.ServiceSelectiveMs, res.BaseSelectiveMs)
	res.ServiceFullRatio = ratio(res.ServiceFullMs, res.BaseFullMs)
	progress("  service API / API server: reads %.2f, updates %.2f (rates); queries: selective %.2f, full fleet %.2f (median latencies)",
		res.ServiceReadRatio, res.ServiceUpdateRatio, res.ServiceSelectiveRatio, res.ServiceFullRatio)
	return nil
}

// printService prints phase (e)'s rows of the table. IoT Hub's reference
// points are IoT Hub's documented throttles for one S3 unit (as in the
// README's table).
func printService(r *results, row func(name, value string)) {
	non2xx := func(m map[string]int64) string {
		if len(m) == 0 {
			return "none"
		}
		var parts []string
		for _, k := range slices.Sorted(maps.Keys(m)) {
			parts = append(parts, fmt.Sprintf("%s: %d", k, m[k]))
		}
		return strings.Join(parts, ", ")
	}
	row("service API (operator running)", fmt.Sprintf("%d twins (fleet %d), %d in flight, %.0fs per workload (queries %.1fs); baselines on the API server, operator stopped",
		r.ServiceTwins, r.ServiceFleet, r.ServiceConcurrency, r.ServiceDurationSec, r.ServiceQueryDurationSec))
	row("twin reads: GET /twins/{id}", fmt.Sprintf("%.0f/s, p50 / p99 %.1f / %.1f ms (IoT Hub S3 unit: 500/s); non-2xx: %s",
		r.ServiceReadsPerSec, r.ServiceReadP50Ms, r.ServiceReadP99Ms, non2xx(r.ServiceReadNon2xx)))
	row("  baseline: GET from the API server", fmt.Sprintf("%.0f/s, p50 / p99 %.1f / %.1f ms; non-2xx: %s",
		r.BaseReadsPerSec, r.BaseReadP50Ms, r.BaseReadP99Ms, non2xx(r.BaseReadNon2xx)))
	row("  ratio service API / API server", fmt.Sprintf("%.2f", r.ServiceReadRatio))
	row("twin updates: PATCH /twins/{id} (If-Match *)", fmt.Sprintf("%.0f/s, p50 / p99 %.1f / %.1f ms (IoT Hub S3 unit: 250/s); non-2xx: %s",
		r.ServiceUpdatesPerSec, r.ServiceUpdateP50Ms, r.ServiceUpdateP99Ms, non2xx(r.ServiceUpdateNon2xx)))
	row("  operator status writes per update", fmt.Sprintf("%.2f  (each reply waits for the cache and the reconcile)", r.ServiceStatusWritesPerUpdate))
	row("  CPU cores used meanwhile", coresString(r.CPUServiceUpdates))
	row("  baseline: merge patches of spec.desired", fmt.Sprintf("%.0f/s, p50 / p99 %.1f / %.1f ms; non-2xx: %s",
		r.BaseUpdatesPerSec, r.BaseUpdateP50Ms, r.BaseUpdateP99Ms, non2xx(r.BaseUpdateNon2xx)))
	row("    CPU cores used meanwhile", coresString(r.CPUServiceBaseUpdates))
	row("  ratio service API / API server", fmt.Sprintf("%.2f  (API-server writes per update: %.2f)", r.ServiceUpdateRatio, 1+r.ServiceStatusWritesPerUpdate))
	row("query: "+serviceSelective[len("SELECT * FROM devices WHERE "):], fmt.Sprintf("%d twins, %d page: median / p90 %.1f / %.1f ms, %.0f/min (IoT Hub S3 unit: 1,000/min); non-2xx: %s",
		r.ServiceSelectiveExpected, r.ServiceSelectivePages, r.ServiceSelectiveMs, r.ServiceSelectiveP90Ms, 60*r.ServiceSelectivePerSec, non2xx(r.ServiceSelectiveNon2xx)))
	row("  baseline: List -l (API server)", fmt.Sprintf("median / p90 %.1f / %.1f ms; non-2xx: %s", r.BaseSelectiveMs, r.BaseSelectiveP90Ms, non2xx(r.BaseSelectiveNon2xx)))
	row("  ratio service API / API server (medians)", fmt.Sprintf("%.2f", r.ServiceSelectiveRatio))
	row("query: full fleet, pages of 100", fmt.Sprintf("%d twins, %d pages: median / p90 %.1f / %.1f ms, %.0f/min; non-2xx: %s",
		r.ServiceFleet, r.ServiceFullPages, r.ServiceFullMs, r.ServiceFullP90Ms, 60*r.ServiceFullPerSec, non2xx(r.ServiceFullNon2xx)))
	row("  baseline: List in pages of 100", fmt.Sprintf("median / p90 %.1f / %.1f ms; non-2xx: %s", r.BaseFullMs, r.BaseFullP90Ms, non2xx(r.BaseFullNon2xx)))
	row("  ratio service API / API server (medians)", fmt.Sprintf("%.2f", r.ServiceFullRatio))
	row("service API mismatches", fmt.Sprintf("reads %d, update replies %d, setpoints %d, query answers %d",
		r.ServiceReadMismatches, r.ServiceUpdateMismatches, r.ServiceSetpointMismatches, r.ServiceQueryMismatches))
}

// serviceMismatches is the number of wrong answers of phase (e).
func (r *results) serviceMismatches() int {
	return r.ServiceReadMismatches + r.ServiceUpdateMismatches + r.ServiceSetpointMismatches + r.ServiceQueryMismatches
}
