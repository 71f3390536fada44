package device

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	mqttserver "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// allowAll is an auth hook that lets every client connect and use every
// topic (mochi's hooks/auth.AllowHook, without that package's YAML
// dependency).
type allowAll struct{ mqttserver.HookBase }

func (h *allowAll) ID() string { return "allow-all" }

func (h *allowAll) Provides(b byte) bool {
	return b == mqttserver.OnConnectAuthenticate || b == mqttserver.OnACLCheck
}

func (h *allowAll) OnConnectAuthenticate(*mqttserver.Client, packets.Packet) bool { return true }

func (h *allowAll) OnACLCheck(*mqttserver.Client, string, bool) bool { return true }

// twin is the fake operator's record of one DeviceTwin.
type twin struct {
	desired         map[string]any
	desiredVersion  int64
	reported        map[string]any
	reportedVersion int64
}

// request is one device request the fake operator received.
type request struct {
	protocol.Inbound
	payload string
}

// fakeOperator is a tiny kubetwin operator: the broker's inline client,
// subscribed to protocol.OperatorFilters, answering GETs and reported
// patches from an in-memory map of twins.
type fakeOperator struct {
	t   *testing.T
	srv *mqttserver.Server
	url string
	in  chan request

	mu       sync.Mutex
	twins    map[string]*twin
	answered map[string]protocol.Response // device/rid -> response, for resends
	requests []request
	acks     map[string][]int64
	presence map[string][]string
	drop     map[string]int // kind -> number of responses still to drop
	mute     bool           // answer nothing
	tooMany  int            // answer this many more reported patches with 429
}

func newFakeOperator(t *testing.T) *fakeOperator {
	t.Helper()
	srv := mqttserver.New(&mqttserver.Options{
		InlineClient: true,
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err := srv.AddHook(new(allowAll), nil); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddListener(listeners.NewNet("test", ln)); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	op := &fakeOperator{
		t:        t,
		srv:      srv,
		url:      "tcp://" + ln.Addr().String(),
		in:       make(chan request, 1024),
		twins:    map[string]*twin{},
		answered: map[string]protocol.Response{},
		acks:     map[string][]int64{},
		presence: map[string][]string{},
		drop:     map[string]int{},
	}
	for i, f := range protocol.OperatorFilters() {
		err := srv.Subscribe(f, i+1, func(_ *mqttserver.Client, _ packets.Subscription, pk packets.Packet) {
			in, err := protocol.ParseInbound(pk.TopicName)
			if err != nil {
				t.Errorf("device published on a bad topic: %v", err)
				return
			}
			op.in <- request{Inbound: in, payload: string(pk.Payload)}
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case r := <-op.in:
				op.serve(r)
			case <-done:
				return
			}
		}
	}()
	t.Cleanup(func() {
		close(done)
		<-stopped
		_ = srv.Close()
	})
	return op
}

// serve answers one device request.
func (op *fakeOperator) serve(r request) {
	op.mu.Lock()
	op.requests = append(op.requests, r)
	var resp protocol.Response
	answer := false
	switch r.Kind {
	case protocol.KindAck:
		var a protocol.Ack
		if err := json.Unmarshal([]byte(r.payload), &a); err != nil {
			op.t.Errorf("bad ack %q: %v", r.payload, err)
		}
		op.acks[r.DeviceID] = append(op.acks[r.DeviceID], a.Version)
	case protocol.KindPresence:
		op.presence[r.DeviceID] = append(op.presence[r.DeviceID], r.payload)
	case protocol.KindGet, protocol.KindReported:
		answer = !op.mute
		key := r.DeviceID + "/" + r.RequestID
		if prev, ok := op.answered[key]; ok {
			resp = prev // a resend: the same answer, applied once
			break
		}
		if r.Kind == protocol.KindReported && op.tooMany > 0 {
			op.tooMany--
			resp = protocol.Response{Status: protocol.StatusTooMany, Error: "overloaded"}
		} else {
			resp = op.answer(r)
		}
		op.answered[key] = resp
		if op.drop[r.Kind] > 0 {
			op.drop[r.Kind]--
			answer = false
		}
	}
	op.mu.Unlock()
	if answer {
		b, _ := json.Marshal(resp)
		if err := op.srv.Publish(protocol.ResponseTopic(r.DeviceID, r.RequestID), b, false, 1); err != nil {
			op.t.Errorf("publish response: %v", err)
		}
	}
}

// answer computes the response to a new request; op.mu is held.
func (op *fakeOperator) answer(r request) protocol.Response {
	tw, ok := op.twins[r.DeviceID]
	if !ok {
		return protocol.Response{Status: protocol.StatusNotFound, Error: "no DeviceTwin for device id " + r.DeviceID}
	}
	if r.Kind == protocol.KindGet {
		return protocol.Response{
			Status:   protocol.StatusOK,
			Desired:  protocol.WithVersion(tw.desired, tw.desiredVersion),
			Reported: protocol.WithVersion(tw.reported, tw.reportedVersion),
		}
	}
	var patch map[string]any
	if err := json.Unmarshal([]byte(r.payload), &patch); err != nil {
		return protocol.Response{Status: protocol.StatusBadRequest, Error: "reported patch is not a JSON object: " + err.Error()}
	}
	for k := range patch {
		if strings.Contains(k, ".") {
			return protocol.Response{Status: protocol.StatusBadRequest, Error: fmt.Sprintf("reported: key %q must not contain '.'", k)}
		}
	}
	tw.reported = mergePatch(tw.reported, patch)
	tw.reportedVersion++
	return protocol.Response{Status: protocol.StatusNoContent, Version: tw.reportedVersion}
}

func (op *fakeOperator) setTwin(id string, desired map[string]any, version int64) {
	op.mu.Lock()
	defer op.mu.Unlock()
	op.twins[id] = &twin{desired: desired, desiredVersion: version, reported: map[string]any{}, reportedVersion: 1}
}

// changeDesired applies patch to the twin and returns the new version,
// without notifying the device.
func (op *fakeOperator) changeDesired(id string, patch map[string]any) int64 {
	op.mu.Lock()
	defer op.mu.Unlock()
	tw := op.twins[id]
	tw.desired = mergePatch(tw.desired, patch)
	tw.desiredVersion++
	return tw.desiredVersion
}

// publishPatch sends a desired-change notification with version v.
func (op *fakeOperator) publishPatch(id string, v int64, patch map[string]any) {
	op.t.Helper()
	b, _ := json.Marshal(protocol.WithVersion(patch, v))
	if err := op.srv.Publish(protocol.DesiredPatchTopic(id), b, false, 1); err != nil {
		op.t.Fatal(err)
	}
}

// publishDocument sets the retained whole desired document.
func (op *fakeOperator) publishDocument(id string, v int64, doc map[string]any) {
	op.t.Helper()
	b, _ := json.Marshal(protocol.WithVersion(doc, v))
	if err := op.srv.Publish(protocol.DesiredTopic(id), b, true, 1); err != nil {
		op.t.Fatal(err)
	}
}

func (op *fakeOperator) count(id, kind string) int {
	op.mu.Lock()
	defer op.mu.Unlock()
	n := 0
	for _, r := range op.requests {
		if r.DeviceID == id && r.Kind == kind {
			n++
		}
	}
	return n
}

func (op *fakeOperator) requestsOf(id, kind string) []request {
	op.mu.Lock()
	defer op.mu.Unlock()
	var out []request
	for _, r := range op.requests {
		if r.DeviceID == id && r.Kind == kind {
			out = append(out, r)
		}
	}
	return out
}

func (op *fakeOperator) acksOf(id string) []int64 {
	op.mu.Lock()
	defer op.mu.Unlock()
	return append([]int64(nil), op.acks[id]...)
}

func (op *fakeOperator) presenceOf(id string) []string {
	op.mu.Lock()
	defer op.mu.Unlock()
	return append([]string(nil), op.presence[id]...)
}

// retained returns the broker's retained payload on topic.
func (op *fakeOperator) retained(topic string) string {
	for _, pk := range op.srv.Topics.Messages(topic) {
		if pk.TopicName == topic {
			return string(pk.Payload)
		}
	}
	return ""
}

// recorder collects OnDesired updates.
type recorder struct {
	mu      sync.Mutex
	updates []Update
}

func (r *recorder) onDesired(u Update) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.updates = append(r.updates, u)
}

func (r *recorder) versions() []int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var vs []int64
	for _, u := range r.updates {
		vs = append(vs, u.Version)
	}
	return vs
}

func (r *recorder) last() Update {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.updates[len(r.updates)-1]
}

// eventually fails the test unless cond becomes true within 5s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// normalize round-trips v through JSON with UseNumber, so documents built
// in tests compare equal to decoded ones.
func normalize(t *testing.T, v any) any {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var out any
	if err := dec.Decode(&out); err != nil {
		t.Fatal(err)
	}
	return out
}

func assertJSON(t *testing.T, what string, got, want any) {
	t.Helper()
	if g, w := normalize(t, got), normalize(t, want); !reflect.DeepEqual(g, w) {
		t.Fatalf("%s = %v, want %v", what, g, w)
	}
}

func connect(t *testing.T, op *fakeOperator, id string, mod func(*Options)) (*Client, *recorder) {
	t.Helper()
	rec := &recorder{}
	o := Options{BrokerURL: op.url, DeviceID: id, OnDesired: rec.onDesired, Logger: testr.New(t), RequestTimeout: 2 * time.Second}
	if mod != nil {
		mod(&o)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Connect(ctx, o)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, rec
}

func TestConnectGetsTwin(t *testing.T) {
	op := newFakeOperator(t)
	want := map[string]any{"telemetryConfig": map[string]any{"sendFrequencyInSecs": 5}}
	op.setTwin("myDeviceId", want, 3)

	c, rec := connect(t, op, "myDeviceId", nil)

	if n := op.count("myDeviceId", protocol.KindGet); n != 1 {
		t.Fatalf("GET requests = %d, want 1", n)
	}
	desired, v := c.Desired()
	if v != 3 {
		t.Fatalf("desired version = %d, want 3", v)
	}
	assertJSON(t, "desired", desired, want)
	if got := rec.versions(); !reflect.DeepEqual(got, []int64{3}) {
		t.Fatalf("OnDesired versions = %v, want [3]", got)
	}
	if u := rec.last(); u.Patch != nil {
		t.Fatalf("Update.Patch = %v, want nil for the whole document", u.Patch)
	}
	eventually(t, "ack of v3", func() bool { return reflect.DeepEqual(op.acksOf("myDeviceId"), []int64{3}) })

	// Numbers are json.Number.
	n := desired["telemetryConfig"].(map[string]any)["sendFrequencyInSecs"]
	if _, ok := n.(json.Number); !ok {
		t.Fatalf("number decoded as %T, want json.Number", n)
	}

	// The local copy is a copy.
	desired["telemetryConfig"] = "changed"
	again, _ := c.Desired()
	assertJSON(t, "desired after mutating a copy", again, want)

	// Get returns both halves of the twin.
	if _, err := c.Report(context.Background(), map[string]any{"fw": "1.0"}); err != nil {
		t.Fatal(err)
	}
	d, dv, r, rv, err := c.Get(context.Background())
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	assertJSON(t, "Get desired", d, want)
	assertJSON(t, "Get reported", r, map[string]any{"fw": "1.0"})
	if dv != 3 || rv != 2 {
		t.Fatalf("Get versions = %d, %d, want 3, 2", dv, rv)
	}
}

func TestConnectErrors(t *testing.T) {
	op := newFakeOperator(t)
	ctx := context.Background()

	t.Run("no twin", func(t *testing.T) {
		_, err := Connect(ctx, Options{BrokerURL: op.url, DeviceID: "nope", Logger: testr.New(t)})
		var re *RequestError
		if !errors.As(err, &re) || re.Status != protocol.StatusNotFound {
			t.Fatalf("Connect error = %v, want a *RequestError with status 404", err)
		}
		if !strings.Contains(err.Error(), "no DeviceTwin for device id nope") {
			t.Fatalf("Connect error %q does not name the missing twin", err)
		}
	})

	t.Run("operator silent", func(t *testing.T) {
		op.setTwin("lonely", map[string]any{}, 1)
		op.mu.Lock()
		op.mute = true
		op.mu.Unlock()
		defer func() {
			op.mu.Lock()
			op.mute = false
			op.mu.Unlock()
		}()
		start := time.Now()
		_, err := Connect(ctx, Options{BrokerURL: op.url, DeviceID: "lonely", RequestTimeout: 300 * time.Millisecond, Logger: testr.New(t)})
		if !errors.Is(err, ErrNoResponse) {
			t.Fatalf("Connect error = %v, want ErrNoResponse", err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("Connect took %s to give up", d)
		}
	})

	t.Run("connection refused", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		_ = ln.Close()
		_, err = Connect(ctx, Options{BrokerURL: "tcp://" + addr, DeviceID: "x", RequestTimeout: 2 * time.Second})
		if err == nil || !strings.Contains(err.Error(), "refused") || !strings.Contains(err.Error(), addr) {
			t.Fatalf("Connect error = %v, want connection refused naming %s", err, addr)
		}
	})

	t.Run("missing options", func(t *testing.T) {
		if _, err := Connect(ctx, Options{DeviceID: "x"}); err == nil || !strings.Contains(err.Error(), "BrokerURL") {
			t.Fatalf("Connect error = %v, want BrokerURL required", err)
		}
		if _, err := Connect(ctx, Options{BrokerURL: op.url}); err == nil || !strings.Contains(err.Error(), "DeviceID") {
			t.Fatalf("Connect error = %v, want DeviceID required", err)
		}
	})
}

func TestReport(t *testing.T) {
	op := newFakeOperator(t)
	op.setTwin("myDeviceId", map[string]any{}, 1)
	c, _ := connect(t, op, "myDeviceId", nil)
	ctx := context.Background()

	v, err := c.Report(ctx, map[string]any{"connectivity": map[string]any{"type": "cellular"}})
	if err != nil {
		t.Fatalf("Report: %v", err)
	}
	if v != 2 {
		t.Fatalf("reported version = %d, want 2", v)
	}
	reqs := op.requestsOf("myDeviceId", protocol.KindReported)
	assertJSON(t, "reported payload", json.RawMessage(reqs[0].payload), map[string]any{"connectivity": map[string]any{"type": "cellular"}})

	_, err = c.Report(ctx, map[string]any{"bad.key": 1})
	var re *RequestError
	if !errors.As(err, &re) || re.Status != protocol.StatusBadRequest {
		t.Fatalf("Report error = %v, want a *RequestError with status 400", err)
	}
	if !strings.Contains(re.Message, `key "bad.key" must not contain '.'`) || !strings.Contains(err.Error(), re.Message) {
		t.Fatalf("Report error %q / message %q lacks the operator's message", err, re.Message)
	}

	// Concurrent reports each get their own version.
	var wg sync.WaitGroup
	versions := make([]int64, 8)
	errs := make([]error, 8)
	for i := range versions {
		wg.Go(func() {
			versions[i], errs[i] = c.Report(ctx, map[string]any{"n": i})
		})
	}
	wg.Wait()
	seen := map[int64]bool{}
	for i, v := range versions {
		if errs[i] != nil {
			t.Fatalf("concurrent Report %d: %v", i, errs[i])
		}
		if seen[v] {
			t.Fatalf("version %d returned twice: %v", v, versions)
		}
		seen[v] = true
	}
}

func TestReportResendsWithSameRequestID(t *testing.T) {
	op := newFakeOperator(t)
	op.setTwin("dev1", map[string]any{}, 1)
	c, _ := connect(t, op, "dev1", func(o *Options) { o.RequestTimeout = 300 * time.Millisecond })

	op.mu.Lock()
	op.drop[protocol.KindReported] = 1
	op.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	v, err := c.Report(ctx, map[string]any{"temp": 21.5})
	if err != nil {
		t.Fatalf("Report: %v", err)
	}
	if v != 2 {
		t.Fatalf("reported version = %d, want 2 (the patch is stored once)", v)
	}
	reqs := op.requestsOf("dev1", protocol.KindReported)
	if len(reqs) != 2 {
		t.Fatalf("reported requests = %d, want 2 (one resend)", len(reqs))
	}
	if reqs[0].RequestID != reqs[1].RequestID || reqs[0].payload != reqs[1].payload {
		t.Fatalf("resend differs: %+v vs %+v", reqs[0], reqs[1])
	}

	// With no answer at all, Report gives up when ctx ends.
	op.mu.Lock()
	op.mute = true
	op.mu.Unlock()
	short, cancelShort := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancelShort()
	if _, err := c.Report(short, map[string]any{"temp": 22}); !errors.Is(err, ErrNoResponse) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Report error = %v, want ErrNoResponse and DeadlineExceeded", err)
	}
}

func TestReportRetriesWhenOverloaded(t *testing.T) {
	op := newFakeOperator(t)
	op.setTwin("dev2", map[string]any{}, 1)
	c, _ := connect(t, op, "dev2", nil)
	op.mu.Lock()
	op.tooMany = 2
	op.mu.Unlock()

	v, err := c.Report(context.Background(), map[string]any{"load": "high"})
	if err != nil {
		t.Fatalf("Report: %v", err)
	}
	if v != 2 {
		t.Fatalf("reported version = %d, want 2", v)
	}
	reqs := op.requestsOf("dev2", protocol.KindReported)
	if len(reqs) != 3 {
		t.Fatalf("reported requests = %d, want 3 (two refused with 429)", len(reqs))
	}
	if reqs[0].RequestID == reqs[1].RequestID || reqs[1].RequestID == reqs[2].RequestID {
		t.Fatalf("retries after 429 reused a request id: %q %q %q", reqs[0].RequestID, reqs[1].RequestID, reqs[2].RequestID)
	}

	// When ctx ends while the operator keeps refusing, the error says why.
	op.mu.Lock()
	op.tooMany = 1000
	op.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
	defer cancel()
	_, err = c.Report(ctx, map[string]any{"load": "higher"})
	var re *RequestError
	if !errors.As(err, &re) || re.Status != protocol.StatusTooMany || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Report error = %v, want DeadlineExceeded with the last 429", err)
	}
}

func TestDesiredUpdates(t *testing.T) {
	op := newFakeOperator(t)
	id := "dev/with+odd#id"
	op.setTwin(id, map[string]any{"a": 1, "b": map[string]any{"c": 2}}, 1)
	c, rec := connect(t, op, id, nil)

	// A patch merges; null deletes.
	patch := map[string]any{"b": map[string]any{"c": nil, "d": 3}, "e": "x"}
	v := op.changeDesired(id, patch)
	op.publishPatch(id, v, patch)
	eventually(t, "desired v2", func() bool { _, v := c.Desired(); return v == 2 })
	desired, _ := c.Desired()
	assertJSON(t, "desired v2", desired, map[string]any{"a": 1, "b": map[string]any{"d": 3}, "e": "x"})
	u := rec.last()
	if u.Version != 2 || u.Patch == nil {
		t.Fatalf("update = %+v, want v2 with a patch", u)
	}
	if val, ok := u.Patch["b"].(map[string]any)["c"]; !ok || val != nil {
		t.Fatalf("Update.Patch = %v, want b.c: null", u.Patch)
	}

	// Not-newer notifications are ignored: a replay of v2 and an old v1.
	op.publishPatch(id, 2, map[string]any{"a": "replayed"})
	op.publishPatch(id, 1, map[string]any{"a": "old"})
	patch = map[string]any{"f": true}
	v = op.changeDesired(id, patch)
	op.publishPatch(id, v, patch)
	eventually(t, "desired v3", func() bool { _, v := c.Desired(); return v == 3 })
	desired, _ = c.Desired()
	assertJSON(t, "desired v3", desired, map[string]any{"a": 1, "b": map[string]any{"d": 3}, "e": "x", "f": true})

	// A gap (v4 never notified, v5 arrives) triggers a GET instead of applying.
	gets := op.count(id, protocol.KindGet)
	op.changeDesired(id, map[string]any{"g": 4})
	v = op.changeDesired(id, map[string]any{"h": 5})
	op.publishPatch(id, v, map[string]any{"h": 5})
	eventually(t, "desired v5", func() bool { _, v := c.Desired(); return v == 5 })
	if n := op.count(id, protocol.KindGet); n != gets+1 {
		t.Fatalf("GETs after the gap = %d, want %d", n, gets+1)
	}
	desired, _ = c.Desired()
	assertJSON(t, "desired v5", desired, map[string]any{"a": 1, "b": map[string]any{"d": 3}, "e": "x", "f": true, "g": 4, "h": 5})
	if u := rec.last(); u.Patch != nil {
		t.Fatalf("update after the gap has Patch %v, want nil (whole document)", u.Patch)
	}

	// The retained whole document is applied when newer.
	doc := map[string]any{"only": "this"}
	op.publishDocument(id, 6, doc)
	eventually(t, "desired v6", func() bool { _, v := c.Desired(); return v == 6 })
	desired, _ = c.Desired()
	assertJSON(t, "desired v6", desired, doc)

	// ...and ignored when not newer.
	op.publishDocument(id, 6, map[string]any{"other": "doc"})
	op.publishPatch(id, 7, map[string]any{"seven": 7})
	eventually(t, "desired v7", func() bool { _, v := c.Desired(); return v == 7 })
	desired, _ = c.Desired()
	assertJSON(t, "desired v7", desired, map[string]any{"only": "this", "seven": 7})

	want := []int64{1, 2, 3, 5, 6, 7}
	if got := rec.versions(); !reflect.DeepEqual(got, want) {
		t.Fatalf("OnDesired versions = %v, want %v", got, want)
	}
	eventually(t, "acks", func() bool { return reflect.DeepEqual(op.acksOf(id), want) })
}

func TestPresenceAndReconnect(t *testing.T) {
	op := newFakeOperator(t)
	id := "myDeviceId"
	op.setTwin(id, map[string]any{"mode": "eco"}, 1)
	c, rec := connect(t, op, id, nil)
	presence := protocol.PresenceTopic(id)

	eventually(t, "birth", func() bool {
		return reflect.DeepEqual(op.presenceOf(id), []string{`{"online":true}`})
	})
	if got := op.retained(presence); got != `{"online":true}` {
		t.Fatalf("retained presence = %q, want the birth", got)
	}

	// Desired changes while the device is cut off; the notification is lost.
	op.changeDesired(id, map[string]any{"mode": "boost"})
	cl, ok := op.srv.Clients.Get(id)
	if !ok {
		t.Fatalf("broker has no client %q (client id must default to the device id)", id)
	}
	// Close the socket under the broker (cl.Stop would count as a clean
	// disconnect if the broker's read loop is between packets).
	_ = cl.Net.Conn.Close()

	// The broker publishes the will; the device comes back with a birth. The
	// broker may send the old connection's will after the new birth (session
	// takeover), in which case the device republishes its birth, so the
	// retained presence ends up online either way.
	eventually(t, "last will then a new birth", func() bool {
		p := op.presenceOf(id)
		return len(p) >= 3 && p[len(p)-1] == `{"online":true}` && slices.Contains(p[1:], `{"online":false}`) &&
			op.retained(presence) == `{"online":true}`
	})
	// The reconnect GETs the twin and catches up.
	eventually(t, "desired v2 after reconnect", func() bool { _, v := c.Desired(); return v == 2 })
	if n := op.count(id, protocol.KindGet); n != 2 {
		t.Fatalf("GETs = %d, want 2 (connect and reconnect)", n)
	}
	desired, _ := c.Desired()
	assertJSON(t, "desired after reconnect", desired, map[string]any{"mode": "boost"})
	if got := rec.versions(); !reflect.DeepEqual(got, []int64{1, 2}) {
		t.Fatalf("OnDesired versions = %v, want [1 2]", got)
	}

	// Subscriptions work after the reconnect.
	op.publishPatch(id, 3, map[string]any{"mode": "off"})
	eventually(t, "desired v3", func() bool { _, v := c.Desired(); return v == 3 })

	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	eventually(t, "offline on close", func() bool { return op.retained(presence) == `{"online":false}` })
	if _, err := c.Report(context.Background(), map[string]any{"x": 1}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Report after Close = %v, want ErrClosed", err)
	}
}

func TestMergePatch(t *testing.T) {
	// Cases from RFC 7386 appendix A (arrays are replaced whole).
	cases := map[string]struct{ target, patch, want string }{
		"replace":                        {`{"a":"b"}`, `{"a":"c"}`, `{"a":"c"}`},
		"add":                            {`{"a":"b"}`, `{"b":"c"}`, `{"a":"b","b":"c"}`},
		"delete":                         {`{"a":"b"}`, `{"a":null}`, `{}`},
		"delete one":                     {`{"a":"b","b":"c"}`, `{"a":null}`, `{"b":"c"}`},
		"array replace":                  {`{"a":["b"]}`, `{"a":"c"}`, `{"a":"c"}`},
		"scalar to object":               {`{"a":"c"}`, `{"a":["b"]}`, `{"a":["b"]}`},
		"nested":                         {`{"a":{"b":"c"}}`, `{"a":{"b":"d","c":null}}`, `{"a":{"b":"d"}}`},
		"object over scalar drops nulls": {`{"a":1}`, `{"a":{"bb":{"ccc":null}}}`, `{"a":{"bb":{}}}`},
		"empty target":                   {`{}`, `{"a":{"bb":{"ccc":null}}}`, `{"a":{"bb":{}}}`},
		"deep delete":                    {`{"e":null}`, `{"a":1}`, `{"e":null,"a":1}`},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			var target, patch, want map[string]any
			for _, p := range []struct {
				s string
				m *map[string]any
			}{{tc.target, &target}, {tc.patch, &patch}, {tc.want, &want}} {
				if err := json.Unmarshal([]byte(p.s), p.m); err != nil {
					t.Fatal(err)
				}
			}
			before := normalize(t, target)
			got := mergePatch(target, patch)
			assertJSON(t, "merged", got, want)
			assertJSON(t, "target after merge", target, before)
		})
	}
}
