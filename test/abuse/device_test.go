package abuse

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kubetwin/kubetwin/internal/testutil/mqttwire"
	"github.com/kubetwin/kubetwin/pkg/device"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// packetIDs numbers the raw clients' QoS 1 publishes.
var packetIDs atomic.Uint32

func nextID() uint16 {
	for {
		if id := uint16(packetIDs.Add(1)); id != 0 {
			return id
		}
	}
}

// request publishes a request (QoS 1) and waits for the operator's
// response to it; the connection must have subscribed to its responses.
func request(c *rawConn, id, kind, rid string, payload []byte) (protocol.Response, error) {
	topic := protocol.GetTopic(id, rid)
	if kind == protocol.KindReported {
		topic = protocol.ReportedTopic(id, rid)
	}
	if err := c.send(publishPacket(topic, payload, 1, false, nextID()), 10*time.Second); err != nil {
		return protocol.Response{}, err
	}
	return awaitResponse(c, id, rid, 15*time.Second)
}

// awaitResponse reads until the response to rid arrives.
func awaitResponse(c *rawConn, id, rid string, d time.Duration) (protocol.Response, error) {
	want := protocol.ResponseTopic(id, rid)
	deadline := time.Now().Add(d)
	for {
		p, err := c.read(deadline)
		if err != nil {
			return protocol.Response{}, fmt.Errorf("waiting for the response to %s: %w", rid, err)
		}
		if p.typ() != pktPublish {
			continue
		}
		c.ackPublish(p)
		topic, _, payload, _, err := p.publish()
		if err != nil || topic != want {
			continue
		}
		var r protocol.Response
		if err := json.Unmarshal(payload, &r); err != nil {
			return r, fmt.Errorf("response to %s: %w: %s", rid, err, payload)
		}
		return r, nil
	}
}

// attacker is a device of its own, connected raw over TLS and subscribed
// to its responses.
func (h *harness) attacker(t *testing.T, prefix, desired string, o dialOptions) (string, *rawConn) {
	t.Helper()
	id := h.devices(t, prefix, 1, desired)[0]
	c := h.dialDevice(t, id, true, o)
	if g, err := c.subscribe(nextID(), protocol.ResponseFilter(id), 1); err != nil || g > 2 {
		t.Fatalf("%s: SUBSCRIBE %s: granted %d, %v", id, protocol.ResponseFilter(id), g, err)
	}
	return id, c
}

// report sends a reported patch and wants it stored (204); it returns the
// new reported version.
func report(t *testing.T, c *rawConn, id, rid string, patch string) int64 {
	t.Helper()
	r, err := request(c, id, protocol.KindReported, rid, []byte(patch))
	if err != nil {
		t.Fatalf("%s: reported patch %s: %v", id, rid, err)
	}
	if r.Status != protocol.StatusNoContent {
		t.Fatalf("%s: reported patch %s answered %d (%s), want 204", id, rid, r.Status, r.Error)
	}
	return r.Version
}

// waitReported waits until the twin's status.reported has key = value
// (compared as JSON text).
func (h *harness) waitReported(t *testing.T, id, key, value, why string) {
	t.Helper()
	eventually(t, 15*time.Second, why, func() error {
		tw, err := h.getTwin(id)
		if err != nil {
			return err
		}
		got, _ := json.Marshal(reported(tw)[key])
		if string(got) != value {
			return fmt.Errorf("status.reported.%s of %s is %s, want %s", key, id, got, value)
		}
		return nil
	})
}

// slowDevices is how many devices stop reading at once in attackSlowConsumer:
// more than the operator's 32 reconcile workers, so that if publishing to
// a stalled device held a worker, all of them would be held.
const slowDevices = 40

// desiredBound is how long a desired change may take to reach a device
// that reads (API write, reconcile, publish) while others stall.
const desiredBound = 10 * time.Second

// attackSlowConsumer: devices that subscribe, flood GETs and never read
// their sockets, while their desired properties keep changing (the
// operator publishes to them). Other devices' reports must stay fast (the
// window checks), a desired change to another device must still reach it,
// and the broker must drop the stalled clients.
func attackSlowConsumer(t *testing.T, h *harness) {
	// Large responses fill the socket buffers sooner.
	big := map[string]string{}
	for i := range 16 {
		big[fmt.Sprintf("blob%02d", i)] = strings.Repeat("x", 1000)
	}
	bigJSON, _ := json.Marshal(big)
	ids := h.devices(t, "slow", slowDevices, string(bigJSON))
	conns := make([]*rawConn, len(ids))
	for i, id := range ids {
		conns[i] = h.dialDevice(t, id, true, dialOptions{rcvBuf: 4096})
		// Responses at QoS 0: the broker must write each one (QoS 1 ones
		// would stop at the client's in-flight window and be dropped).
		for _, s := range []struct {
			filter string
			qos    byte
		}{{protocol.ResponseFilter(id), 0}, {protocol.DesiredFilter(id), 1}} {
			if g, err := conns[i].subscribe(nextID(), s.filter, s.qos); err != nil || g > 2 {
				t.Fatalf("%s: SUBSCRIBE %s: granted %d, %v", id, s.filter, g, err)
			}
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Desired changes: to the stalled devices (the operator publishes to
	// clients that do not read) and to a legitimate one, timed.
	victim := h.fleet.devs[0]
	slowest := make(chan time.Duration, 1)
	go func() {
		var worst time.Duration
		defer func() { slowest <- worst }()
		for n := 1; ctx.Err() == nil; n++ {
			for _, id := range ids {
				_ = patchDesired(h.ns, id, fmt.Sprintf(`{"poke":%d}`, n))
			}
			start := time.Now()
			if err := patchDesired(h.ns, victim.id, fmt.Sprintf(`{"probe":%d}`, n)); err != nil {
				continue
			}
			for ctx.Err() == nil && time.Since(start) < 30*time.Second {
				d, _ := victim.c.Desired()
				if v, ok := d["probe"].(json.Number); ok && v.String() == fmt.Sprint(n) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			worst = max(worst, time.Since(start))
			time.Sleep(500 * time.Millisecond) // pacing
		}
	}()

	// The flood: QoS 1 GETs, about 20 a second per device (the point is
	// clients that do not read, not CPU load), never reading.
	const flood = 25 * time.Second
	start := time.Now()
	closedAfter := make([]time.Duration, len(ids))
	sent := make([]int, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for rid := 0; time.Since(start) < flood; rid++ {
				err := conns[i].send(publishPacket(protocol.GetTopic(id, h.rid(fmt.Sprintf("g%d", rid))), nil, 1, false, nextID()), 200*time.Millisecond)
				var ne net.Error
				if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
					closedAfter[i] = time.Since(start)
					return
				}
				if err == nil {
					sent[i]++
				}
				time.Sleep(50 * time.Millisecond) // pacing
			}
		}()
	}
	wg.Wait()
	cancel()
	worst := <-slowest
	open, total, latest := 0, 0, time.Duration(0)
	for i := range ids {
		total += sent[i]
		if closedAfter[i] == 0 {
			open++
		}
		latest = max(latest, closedAfter[i])
	}
	t.Logf("%d clients that never read: %d GETs written in %s; %d closed by the broker (the last after %s); slowest desired change to %s: %s",
		len(ids), total, time.Since(start).Round(time.Millisecond), len(ids)-open, latest.Round(time.Millisecond), victim.id, worst.Round(time.Millisecond))
	if worst > desiredBound {
		t.Errorf("a desired change to %s took %s to arrive while %d devices did not read: clients that stall slow the others (bus/bridge, item 2)", victim.id, worst.Round(time.Millisecond), len(ids))
	}
	if open > 0 {
		ms, _ := scrapeMetrics(h.op.metricsAddr)
		t.Errorf("the broker kept %d of %d clients that never read for %s: no write deadline or bounded client queue (--mqtt-write-timeout, --mqtt-max-client-queue, broker-limits, item 2); kubetwin_broker_slow_consumer_disconnects_total %v, kubetwin_bridge_messages_received_total %v",
			open, len(ids), flood, ms["kubetwin_broker_slow_consumer_disconnects_total"], ms["kubetwin_bridge_messages_received_total"])
	}
}

// patchDesired merge-patches a twin's spec.desired.
func patchDesired(ns, name, desired string) error {
	return patchTwin(ns, name, `{"spec":{"desired":`+desired+`}}`)
}

// attackRIDReuse: a device that reuses a request id with a different
// payload makes a new request; the same rid with the same payload is a
// resend and is stored once.
func attackRIDReuse(t *testing.T, h *harness) {
	id, c := h.attacker(t, "rid", "", dialOptions{})
	// r1 and r2 are new in every round (a soak round repeating the last
	// one's r1 with {"temp":35} would make it a resend); each round starts
	// from temp 38, so the values waited for are new too.
	r1, r2 := h.rid("r1"), h.rid("r2")
	v1 := report(t, c, id, r1, `{"temp":35}`)
	v2 := report(t, c, id, r1, `{"temp":36}`)
	if v2 <= v1 {
		t.Errorf("a reused request id with a new payload was answered 204 with the old version %d (new %d): the report was dropped (bridge, item 3)", v1, v2)
	}
	h.waitReported(t, id, "temp", "36", "a report under a reused request id is stored")
	v3 := report(t, c, id, r1, `{"temp":36}`)
	if v3 != v2 {
		t.Errorf("a resend (same request id, same payload) was answered with version %d, want %d: resends must stay idempotent (bridge, item 3)", v3, v2)
	}
	// A device that restarts its counter: r1 again, after other ids.
	report(t, c, id, r2, `{"temp":37}`)
	report(t, c, id, r1, `{"temp":38}`)
	h.waitReported(t, id, "temp", "38", "a report under a restarted request counter is stored")
}

// attackOversized: a 48 MiB PUBLISH from an authenticated device is cut
// off at the packet size limit; reported patches over the twin size rule,
// null deletions included, are refused; the device's next report works.
func attackOversized(t *testing.T, h *harness) {
	id := h.devices(t, "big", 1, "")[0]
	c := h.dialDevice(t, id, true, dialOptions{})
	const size = 48 << 20
	topic := protocol.ReportedTopic(id, h.rid("huge"))
	hdr := append([]byte{pktPublish | 1<<1}, mqttwire.RemainingLength(2+len(topic)+2+size)...)
	hdr = mqttwire.AppendString(hdr, topic)
	hdr = append(hdr, 0, 1)
	start := time.Now()
	written := 0
	if err := c.send(hdr, 5*time.Second); err == nil {
		chunk := bytes.Repeat([]byte("A"), 1<<20)
		copy(chunk, `{"x":"`)
		for written < size {
			if err := c.send(chunk, 5*time.Second); err != nil {
				break
			}
			written += len(chunk)
		}
	}
	closed := c.closedWithin(quickClose)
	t.Logf("48 MiB PUBLISH: %d MiB written in %s before the broker stopped it", written>>20, time.Since(start).Round(time.Millisecond))
	if !closed || written >= size {
		t.Errorf("an authenticated device's 48 MiB PUBLISH was read whole (%d MiB written, connection closed: %v): no maximum packet size of %d bytes (--mqtt-max-packet-size, broker-limits, item 4)",
			written>>20, closed, maxPacketSize)
	}

	id2, c2 := h.attacker(t, "bigpatch", "", dialOptions{})
	over := map[string]string{}
	for i := range 10 {
		over[fmt.Sprintf("k%d", i)] = strings.Repeat("y", 4000)
	}
	overJSON, _ := json.Marshal(over)
	if r, err := request(c2, id2, protocol.KindReported, h.rid("o1"), overJSON); err != nil || r.Status != protocol.StatusBadRequest {
		t.Errorf("a %d-byte reported patch over the 32 KB twin rule: status %d (%s), %v; want 400", len(overJSON), r.Status, r.Error, err)
	}
	// The 2.8 MB patch of null deletions (free by the size rule).
	nulls := map[string]any{}
	for i := 0; len(nulls)*26 < 2800<<10; i++ {
		nulls[fmt.Sprintf("deleted-key-%012d", i)] = nil
	}
	nullJSON, _ := json.Marshal(nulls)
	r, err := request(c2, id2, protocol.KindReported, h.rid("o2"), nullJSON)
	switch {
	case err == nil && r.Status == protocol.StatusNoContent:
		t.Errorf("a %d-byte reported patch of %d null deletions was stored: patches are not size-checked, null deletions are free (bridge/broker-limits, item 4)",
			len(nullJSON), len(nulls))
	case err == nil && r.Status >= 500:
		t.Errorf("a patch of %d null deletions answered %d (%s); want a refusal", len(nulls), r.Status, r.Error)
	case err == nil:
		t.Logf("the %d-byte null patch was refused with %d: %s", len(nullJSON), r.Status, r.Error)
	default:
		t.Logf("the %d-byte null patch was refused by dropping the connection: %v", len(nullJSON), err)
	}
	c3 := h.dialDevice(t, id2, true, dialOptions{})
	if g, err := c3.subscribe(nextID(), protocol.ResponseFilter(id2), 1); err != nil || g > 2 {
		t.Fatalf("SUBSCRIBE: %d, %v", g, err)
	}
	// The round as the value: a soak round must store something new.
	report(t, c3, id2, h.rid("after"), fmt.Sprintf(`{"ok":%d}`, h.round))
	h.waitReported(t, id2, "ok", fmt.Sprint(h.round), "a report after oversized ones is stored")
}

// attackPresence: alternating presence messages must not pile up without
// bound behind the device's pending cap; its next report is stored.
func attackPresence(t *testing.T, h *harness) {
	id, c := h.attacker(t, "presence", "", dialOptions{})
	from := time.Now()
	const n = 6000
	on, off := []byte(`{"online":true}`), []byte(`{"online":false}`)
	start := time.Now()
	for i := range n {
		p := on
		if i%2 == 1 {
			p = off
		}
		if err := c.send(publishPacket(protocol.PresenceTopic(id), p, 1, false, nextID()), 5*time.Second); err != nil {
			t.Logf("presence flood stopped after %d messages: %v", i, err)
			break
		}
	}
	t.Logf("%d presence messages sent in %s", n, time.Since(start).Round(time.Millisecond))
	_ = c.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	d, err := device.Connect(ctx, h.deviceOptions(t, id))
	if err != nil {
		t.Fatalf("%s reconnecting after its presence flood: %v", id, err)
	}
	defer func() { _ = d.Close() }()
	rs := time.Now()
	// pkg/device makes its own request ids; the value names the round so
	// that a soak round must store something new.
	after := fmt.Sprintf("presence %d", h.round)
	if _, err := d.Report(ctx, map[string]any{"after": after}); err != nil {
		t.Fatalf("%s: a report after a presence flood failed: %v", id, err)
	}
	t.Logf("report after the flood acknowledged in %s", time.Since(rs).Round(time.Millisecond))
	h.waitReported(t, id, "after", strconv.Quote(after), "a report after a presence flood is stored")
	// Over all devices: the flooding one's cap plus a couple per legitimate
	// device.
	bound := int64(maxPendingReports + 2*len(h.fleet.devs))
	if peak, ok := h.mon.maxOf(metricPendingReports, from); !ok {
		t.Errorf("the operator does not expose %s (bridge)", metricPendingReports)
	} else if peak > bound {
		t.Errorf("%s peaked at %d during a presence flood, over %d: presence bypasses the pending cap (--max-pending-reports %d, bridge, item 5)",
			metricPendingReports, peak, bound, maxPendingReports)
	}
}

// metadataBomb returns a document of nested empty objects with short
// keys: top keys, each holding per keys; small by the twin size rule (keys
// only) but with one $metadata node per object once stored.
func metadataBomb(top, per int, width int) []byte {
	var b bytes.Buffer
	b.WriteByte('{')
	for i := range top {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `"%s":{`, shortKey(i, 1))
		for j := range per {
			if j > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `"%s":{}`, shortKey(j, width))
		}
		b.WriteByte('}')
	}
	b.WriteByte('}')
	return b.Bytes()
}

const keyChars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

// shortKey is the i-th key of the given width over keyChars.
func shortKey(i, width int) string {
	k := make([]byte, width)
	for w := width - 1; w >= 0; w-- {
		k[w] = keyChars[i%len(keyChars)]
		i /= len(keyChars)
	}
	return string(k)
}

// ruleSize is the twin size rule of a document of only nested objects:
// the sum of its key lengths.
func ruleSize(doc []byte) int {
	var m map[string]any
	_ = json.Unmarshal(doc, &m)
	var size func(map[string]any) int
	size = func(m map[string]any) int {
		n := 0
		for k, v := range m {
			n += len(k)
			if o, ok := v.(map[string]any); ok {
				n += size(o)
			}
		}
		return n
	}
	return size(m)
}

// attackMetadata: documents of empty objects that pass the old size rule
// but would store many times their size in $metadata are refused, from a
// device and through the service API's spec.desired, and the device's
// later reports are stored.
func attackMetadata(t *testing.T, h *harness) {
	id, c := h.attacker(t, "meta", "", dialOptions{})
	// Under the broker's packet limit, so that the twin rule is what is
	// tested: ~55 KB of JSON, 13.7 KB by the rule, ~6,900 $metadata nodes.
	dev := metadataBomb(62, 110, 2)
	t.Logf("device document: %d bytes of JSON, %d bytes by the size rule", len(dev), ruleSize(dev))
	r, err := request(c, id, protocol.KindReported, h.rid("m1"), dev)
	if err != nil {
		t.Fatalf("%s: %v", id, err)
	}
	if r.Status == protocol.StatusNoContent {
		t.Errorf("a reported document of %d bytes as JSON (%d by the size rule) made of empty objects was stored: the size rule does not bound the stored $metadata (bridge, item 6)",
			len(dev), ruleSize(dev))
	} else if r.Status != protocol.StatusBadRequest {
		t.Errorf("the $metadata amplification document answered %d (%s), want 400", r.Status, r.Error)
	}
	// "metadata" then "service": each round changes the value twice.
	report(t, c, id, h.rid("m2"), `{"after":"metadata"}`)
	h.waitReported(t, id, "after", `"metadata"`, "a report after a refused amplification document is stored")

	// The document: 31 KB by the rule, 213 KB as JSON, as desired
	// properties through the service API.
	svc := metadataBombTriple()
	t.Logf("service API document: %d bytes of JSON, %d bytes by the size rule", len(svc), ruleSize(svc))
	body := append(append([]byte(`{"properties":{"desired":`), svc...), `}}`...)
	status, resp, err := h.service(t, "PATCH", "/twins/"+id, body, nil)
	if err != nil {
		t.Fatalf("PATCH /twins/%s: %v", id, err)
	}
	if status/100 == 2 {
		t.Errorf("the service API accepted desired properties of %d bytes as JSON (%d by the size rule) made of empty objects: the size rule does not bound the stored $metadata (bridge/service-api, item 6)",
			len(svc), ruleSize(svc))
	} else if status != 400 && status != 413 {
		t.Errorf("the amplification document through the service API answered %d: %s; want 400", status, resp)
	}
	report(t, c, id, h.rid("m3"), `{"after":"service"}`)
	h.waitReported(t, id, "after", `"service"`, "a report after a refused desired amplification is stored")
}

// metadataBombTriple is the document: three levels of one-letter
// keys, 62 x 62 x 7 empty objects: 30,814 bytes by the rule (under 32 KB)
// and about 213 KB as JSON.
func metadataBombTriple() []byte {
	var b bytes.Buffer
	b.WriteByte('{')
	for i := range 62 {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `"%c":{`, keyChars[i])
		for j := range 62 {
			if j > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `"%c":{`, keyChars[j])
			for k := range 7 {
				if k > 0 {
					b.WriteByte(',')
				}
				fmt.Fprintf(&b, `"%c":{}`, keyChars[k])
			}
			b.WriteByte('}')
		}
		b.WriteByte('}')
	}
	b.WriteByte('}')
	return b.Bytes()
}

// attackRetainedEmbedded: retained messages a device leaves on its request
// topics are not kept by the embedded broker, and the requests are still
// served.
func attackRetainedEmbedded(t *testing.T, h *harness) {
	id, c := h.attacker(t, "retain", "", dialOptions{})
	const n = 50
	// New request ids and values every round. A soak round that repeated
	// the last one's would send only resends, each answered at once with
	// its old version and not applied: 100 responses at once to a client
	// that reads only after sending, more than the broker keeps
	// unacknowledged for it (--mqtt-max-session-queue, 64), so the last
	// ones are dropped ("client store quota reached"), and the value
	// waited for would be the last round's anyway.
	first := (h.round - 1) * n
	for k := 1; k <= n; k++ {
		if err := c.send(publishPacket(protocol.GetTopic(id, h.rid(fmt.Sprintf("g%d", k))), nil, 1, true, nextID()), 5*time.Second); err != nil {
			t.Fatal(err)
		}
		if err := c.send(publishPacket(protocol.ReportedTopic(id, h.rid(fmt.Sprintf("r%d", k))), []byte(fmt.Sprintf(`{"r":%d}`, first+k)), 1, true, nextID()), 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := awaitResponse(c, id, h.rid(fmt.Sprintf("r%d", n)), 30*time.Second); err != nil {
		t.Fatalf("the last retained-flagged report got no response: %v", err)
	}
	h.waitReported(t, id, "r", fmt.Sprint(first+n), "reports sent with the retain flag are still served")

	// A client that subscribes later sees only the retained topics the
	// protocol has: presence and desired.
	sub, err := dialRaw(h.plainAddr, dialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if _, code, err := sub.connect("abuse-watch-"+randomHex(3), "kubetwin-admin", h.adminPW, true); err != nil || code != 0 {
		t.Fatalf("admin CONNECT: %d, %v", code, err)
	}
	if g, err := sub.subscribe(nextID(), protocol.DevicePrefix(id)+"/#", 1); err != nil || g > 2 {
		t.Fatalf("admin SUBSCRIBE: %d, %v", g, err)
	}
	var kept []string
	deadline := time.Now().Add(3 * time.Second) // the broker sends retained messages right after SUBACK
	for {
		p, err := sub.read(deadline)
		if err != nil {
			break
		}
		if p.typ() != pktPublish {
			continue
		}
		sub.ackPublish(p)
		topic, _, _, retained, _ := p.publish()
		if retained && (strings.Contains(topic, "/get/") || strings.Contains(topic, "/reported/")) {
			kept = append(kept, topic)
		}
	}
	if len(kept) > 0 {
		t.Errorf("the embedded broker kept %d retained messages on %s's request topics (e.g. %s): only presence and desired may be retained (broker-sessions, item 8)",
			len(kept), id, kept[0])
	}
}
