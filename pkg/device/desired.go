package device

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// eventKind says what an event carries.
type eventKind int

const (
	evConnected eventKind = iota // the broker connection was (re)established
	evDesired                    // a whole desired document from DesiredTopic
	evPatch                      // a desired merge patch from DesiredPatchTopic
	evFull                       // a desired document from a Get call
	evPresence                   // a message on the device's own presence topic
)

// event is one unit of work for the worker goroutine.
type event struct {
	kind    eventKind
	payload []byte         // evDesired, evPatch, evPresence
	doc     map[string]any // evFull
	version int64          // evFull
}

// onMessage is paho's handler for every message. It must not block: it
// routes responses to their requests and queues desired messages for the
// worker, which applies them in arrival order.
func (c *Client) onMessage(_ mqtt.Client, m mqtt.Message) {
	topic := m.Topic()
	switch {
	case strings.HasPrefix(topic, c.resPrefix):
		c.deliver(topic, m.Payload())
	case topic == c.desiredTopic:
		c.push(event{kind: evDesired, payload: m.Payload()})
	case topic == c.patchTopic:
		c.push(event{kind: evPatch, payload: m.Payload()})
	case topic == c.presenceTopic:
		if !m.Retained() { // a retained one is history, not news
			c.push(event{kind: evPresence, payload: m.Payload()})
		}
	default:
		c.log.V(1).Info("ignoring message on an unexpected topic", "topic", topic)
	}
}

// push queues an event for the worker without blocking.
func (c *Client) push(ev event) {
	c.qMu.Lock()
	c.queue = append(c.queue, ev)
	c.qMu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *Client) pop() (event, bool) {
	c.qMu.Lock()
	defer c.qMu.Unlock()
	if len(c.queue) == 0 {
		return event{}, false
	}
	ev := c.queue[0]
	c.queue[0] = event{}
	c.queue = c.queue[1:]
	return ev, true
}

// run is the worker: it synchronises with the twin after every connect and
// after a missed notification, and applies desired messages one at a time.
// Syncs come before queued events, so events queued behind a sync are
// judged against the version it fetched.
func (c *Client) run() {
	defer close(c.workerDone)
	for c.ctx.Err() == nil {
		if c.needSync && !time.Now().Before(c.nextSync) {
			c.syncOnce()
			continue
		}
		if ev, ok := c.pop(); ok {
			c.handle(ev)
			continue
		}
		var timeout <-chan time.Time
		var timer *time.Timer
		if c.needSync {
			timer = time.NewTimer(time.Until(c.nextSync))
			timeout = timer.C
		}
		select {
		case <-c.wake:
		case <-timeout:
		case <-c.ctx.Done():
		}
		if timer != nil {
			timer.Stop()
		}
	}
}

// syncOnce runs one sync attempt and schedules a retry if it failed. The
// first attempt's outcome goes to Connect, except that 429 and 5xx answers
// are retried first.
func (c *Client) syncOnce() {
	err := c.sync()
	var reqErr *RequestError
	temporary := errors.As(err, &reqErr) && reqErr.Temporary()
	if !c.firstReported && (err == nil || !temporary) {
		c.firstReported = true
		c.first <- err
		if err != nil {
			return // Connect reports it and closes the client
		}
	}
	if err == nil {
		c.needSync = false
		c.backoff = 0
		return
	}
	if c.ctx.Err() != nil {
		return
	}
	c.backoff = min(max(2*c.backoff, minRetryBackoff), maxRetryBackoff)
	c.nextSync = time.Now().Add(c.backoff)
	c.log.Error(err, "twin sync failed; retrying", "retryIn", c.backoff.String())
}

// sync subscribes and publishes the birth message if this connection has
// not yet done so, then GETs the twin and applies its desired document.
func (c *Client) sync() error {
	if c.needSubscribe {
		// Let paho's resume take its snapshot of the store first (see resumeStore).
		ctx, cancel := context.WithTimeout(c.ctx, c.opts.RequestTimeout)
		if !c.store.waitSnapshots(ctx, c.connections) {
			c.log.V(1).Info("paho did not resume the session in time; subscribing anyway", "connection", c.connections)
		}
		cancel()
		filters := map[string]byte{
			protocol.ResponseFilter(c.opts.DeviceID): 1,
			protocol.DesiredFilter(c.opts.DeviceID):  1,
			c.presenceTopic:                          1,
		}
		tok := c.mqtt.SubscribeMultiple(filters, nil)
		if !tok.WaitTimeout(c.opts.RequestTimeout) {
			return fmt.Errorf("subscribe to %s: no SUBACK within %s", protocol.DevicePrefix(c.opts.DeviceID), c.opts.RequestTimeout)
		}
		if err := tok.Error(); err != nil {
			return fmt.Errorf("subscribe to %s/...: %w", protocol.DevicePrefix(c.opts.DeviceID), err)
		}
		if st, ok := tok.(*mqtt.SubscribeToken); ok {
			for f, q := range st.Result() {
				if q == 0x80 {
					return fmt.Errorf("the broker refused the subscription to %s (check its ACL)", f)
				}
			}
		}
		c.publishAsync(c.presenceTopic, presencePayload(true), true)
		c.needSubscribe, c.birthSent = false, true
	}

	resp, err := c.roundTrip(c.ctx, protocol.KindGet, nil, false)
	if err != nil {
		return fmt.Errorf("twin GET: %w", err)
	}
	if resp.Status != protocol.StatusOK {
		return fmt.Errorf("twin GET: %w", c.requestError(resp))
	}
	desired, version, _, _, err := c.parseTwin(resp)
	if err != nil {
		return fmt.Errorf("twin GET: %w", err)
	}
	c.mu.Lock()
	local := c.version
	c.mu.Unlock()
	switch {
	case c.haveTwin && version == local:
		c.log.V(1).Info("desired is up to date", "version", version)
	case c.haveTwin && version < local:
		// Versions only increase, so the DeviceTwin was deleted and created
		// again; the GET is the truth.
		c.log.Info("twin desired version went backwards; replacing the local copy", "local", local, "twin", version)
		c.apply(desired, version, nil)
	default:
		c.apply(desired, version, nil)
	}
	c.haveTwin = true
	return nil
}

// handle applies one queued event.
func (c *Client) handle(ev event) {
	switch ev.kind {
	case evConnected:
		c.needSubscribe, c.needSync = true, true
		c.birthSent, c.birthEchoed = false, false
		c.connections++
		c.nextSync, c.backoff = time.Time{}, 0
	case evFull:
		c.applyIfNewer(ev.doc, ev.version, "GET")
	case evPresence:
		c.checkPresence(ev.payload)
	case evDesired:
		if len(ev.payload) == 0 {
			return // the retained document was cleared
		}
		doc, v, err := protocol.SplitVersion(ev.payload)
		if err != nil {
			c.log.Error(err, "ignoring malformed desired document", "topic", c.desiredTopic)
			return
		}
		c.applyIfNewer(doc, v, "document")
	case evPatch:
		patch, v, err := protocol.SplitVersion(ev.payload)
		if err != nil {
			c.log.Error(err, "ignoring malformed desired patch", "topic", c.patchTopic)
			return
		}
		c.mu.Lock()
		local, base := c.version, c.desired
		c.mu.Unlock()
		switch {
		case !c.haveTwin:
			c.log.V(1).Info("desired patch before the first twin GET; fetching the twin", "version", v)
			c.needSync, c.nextSync = true, time.Time{}
		case v <= local:
			c.log.V(1).Info("ignoring desired patch that is not newer", "version", v, "local", local)
		case v > local+1:
			c.log.Info("missed a desired notification; fetching the twin", "version", v, "local", local)
			c.needSync, c.nextSync = true, time.Time{}
		default:
			c.apply(mergePatch(base, patch), v, patch)
		}
	}
}

// checkPresence republishes the birth message when the broker publishes
// this device's last will after the birth of the current connection. That
// happens when the device reconnects before the broker noticed the old
// connection died: the broker may send the old connection's will on the
// session takeover, after the new birth, which would leave a retained
// {"online":false} for an online device. The device sees its own birth come
// back on the presence topic first, so an offline message after that echo
// is newer than the birth; one before it (a will or Close message queued in
// the persistent session) is not, and is ignored.
func (c *Client) checkPresence(payload []byte) {
	var p protocol.Presence
	if err := json.Unmarshal(payload, &p); err != nil {
		return
	}
	if p.Online {
		c.birthEchoed = c.birthEchoed || c.birthSent
		return
	}
	if !c.birthEchoed || !c.mqtt.IsConnectionOpen() {
		return
	}
	c.log.Info("the broker published this device's last will after its birth (an old connection was taken over); republishing the birth message")
	c.publishAsync(c.presenceTopic, presencePayload(true), true)
}

// applyIfNewer applies a whole desired document unless it is not newer.
func (c *Client) applyIfNewer(doc map[string]any, v int64, source string) {
	c.mu.Lock()
	local := c.version
	c.mu.Unlock()
	if c.haveTwin && v <= local {
		c.log.V(1).Info("ignoring desired document that is not newer", "source", source, "version", v, "local", local)
		return
	}
	c.apply(doc, v, nil)
	c.haveTwin = true
}

// apply makes doc the local desired document at version v, calls OnDesired
// and acknowledges the version. Only the worker calls it, so updates reach
// OnDesired one at a time and in order.
func (c *Client) apply(doc map[string]any, v int64, patch map[string]any) {
	c.mu.Lock()
	c.desired, c.version = doc, v
	c.mu.Unlock()
	c.log.V(1).Info("applied desired", "version", v, "patch", patch != nil)
	if c.opts.OnDesired != nil {
		c.opts.OnDesired(Update{Version: v, Patch: deepCopyMap(patch), Desired: deepCopyMap(doc)})
	}
	ack, _ := json.Marshal(protocol.Ack{Version: v})
	c.publishAsync(protocol.AckTopic(c.opts.DeviceID), ack, false)
}

// mergePatch returns target with patch applied as an RFC 7386 JSON merge
// patch: objects merge recursively, null deletes a member, anything else
// replaces. Neither argument is modified; the result shares no maps with
// patch but may share unchanged nested maps with target.
func mergePatch(target, patch map[string]any) map[string]any {
	out := make(map[string]any, len(target)+len(patch))
	for k, v := range target {
		out[k] = v
	}
	for k, pv := range patch {
		switch p := pv.(type) {
		case nil:
			delete(out, k)
		case map[string]any:
			t, _ := out[k].(map[string]any) // a non-object is replaced
			out[k] = mergePatch(t, p)
		default:
			out[k] = deepCopyValue(pv)
		}
	}
	return out
}

// deepCopyMap copies a decoded JSON object; nil stays nil.
func deepCopyMap(m map[string]any) map[string]any {
	if m == nil {
		return nil
	}
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = deepCopyValue(v)
	}
	return out
}

func deepCopyValue(v any) any {
	switch t := v.(type) {
	case map[string]any:
		return deepCopyMap(t)
	case []any:
		out := make([]any, len(t))
		for i, e := range t {
			out[i] = deepCopyValue(e)
		}
		return out
	default:
		return v
	}
}
