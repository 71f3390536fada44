package device

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// RequestError is the operator's refusal of a request: a response whose
// status is not the expected 200 (GET) or 204 (reported patch).
type RequestError struct {
	// Status is the response status, e.g. protocol.StatusBadRequest.
	Status int
	// Message is the operator's explanation.
	Message string
}

// Error returns the status and the operator's message.
func (e *RequestError) Error() string {
	return "status " + strconv.Itoa(e.Status) + ": " + e.Message
}

// Temporary reports whether the operator asked to retry later (429 or 5xx).
func (e *RequestError) Temporary() bool {
	return e.Status == protocol.StatusTooMany || e.Status >= 500
}

// Get fetches the whole twin: the desired document and version and the
// reported document and version (both without $version). It resends the
// request with the same request id every RequestTimeout until answered or ctx
// ends, and retries 429 and 5xx answers with backoff. A desired version newer
// than the local copy is applied as if it had been notified.
func (c *Client) Get(ctx context.Context) (desired map[string]any, desiredVersion int64, reported map[string]any, reportedVersion int64, err error) {
	resp, err := c.do(ctx, protocol.KindGet, nil, protocol.StatusOK)
	if err != nil {
		return nil, 0, nil, 0, fmt.Errorf("twin GET: %w", err)
	}
	desired, desiredVersion, reported, reportedVersion, err = c.parseTwin(resp)
	if err != nil {
		return nil, 0, nil, 0, fmt.Errorf("twin GET: %w", err)
	}
	c.push(event{kind: evFull, doc: deepCopyMap(desired), version: desiredVersion})
	return desired, desiredVersion, reported, reportedVersion, nil
}

// Report sends a JSON merge patch of reported properties (null deletes a
// key) and returns the new reported $version once the operator has stored
// it (status 204). A patch the operator refuses (4xx, e.g. 400 for a key
// with a '.' or an array value) returns a *RequestError carrying the
// operator's message; nothing was stored. If no response comes within
// RequestTimeout the same patch is resent under the same request id, which
// the operator treats as one request, until ctx ends; 429 and 5xx answers
// are retried with backoff under a fresh request id, since nothing was
// stored. An error after ctx ended does not prove the patch was not stored.
func (c *Client) Report(ctx context.Context, patch map[string]any) (int64, error) {
	if patch == nil {
		patch = map[string]any{}
	}
	payload, err := json.Marshal(patch)
	if err != nil {
		return 0, fmt.Errorf("reported patch: %w", err)
	}
	resp, err := c.do(ctx, protocol.KindReported, payload, protocol.StatusNoContent)
	if err != nil {
		return 0, fmt.Errorf("reported patch: %w", err)
	}
	return resp.Version, nil
}

// do sends a request until it gets an answer that is not 429 or 5xx, and
// turns a status other than want into a *RequestError.
func (c *Client) do(ctx context.Context, kind string, payload []byte, want int) (protocol.Response, error) {
	backoff := minRetryBackoff
	for {
		resp, err := c.roundTrip(ctx, kind, payload, true)
		if err != nil {
			return resp, err
		}
		if resp.Status == want {
			return resp, nil
		}
		reqErr := c.requestError(resp)
		if !reqErr.Temporary() {
			return resp, reqErr
		}
		c.log.V(1).Info("operator asked to retry later", "kind", kind, "status", resp.Status, "message", reqErr.Message, "retryIn", backoff)
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return resp, fmt.Errorf("%w (last answer %w)", ctx.Err(), reqErr)
		case <-c.ctx.Done():
			t.Stop()
			return resp, ErrClosed
		}
		backoff = min(2*backoff, c.opts.RequestTimeout, maxRetryBackoff)
	}
}

// roundTrip publishes one request under a fresh request id and waits for its
// response. With resend it republishes the same payload under the same
// request id every RequestTimeout until ctx ends; without, it gives up after
// one RequestTimeout.
func (c *Client) roundTrip(ctx context.Context, kind string, payload []byte, resend bool) (protocol.Response, error) {
	rid := c.newRID()
	ch := make(chan protocol.Response, 1)
	c.waitMu.Lock()
	c.waiters[rid] = ch
	c.waitMu.Unlock()
	defer func() {
		c.waitMu.Lock()
		delete(c.waiters, rid)
		c.waitMu.Unlock()
	}()

	var topic string
	if kind == protocol.KindGet {
		topic = protocol.GetTopic(c.opts.DeviceID, rid)
	} else {
		topic = protocol.ReportedTopic(c.opts.DeviceID, rid)
	}
	if payload == nil {
		payload = []byte{}
	}
	for attempt := 1; ; attempt++ {
		tok := c.mqtt.Publish(topic, 1, false, payload)
		c.log.V(1).Info("request sent", "kind", kind, "requestID", rid, "attempt", attempt)
		t := time.NewTimer(c.opts.RequestTimeout)
		select {
		case resp := <-ch:
			t.Stop()
			return resp, nil
		case <-t.C:
			cause := publishError(tok)
			if !resend {
				return protocol.Response{}, fmt.Errorf("%s request %s: %w within %s%s", kind, rid, ErrNoResponse, c.opts.RequestTimeout, cause)
			}
			c.log.Info("no response; resending the request", "kind", kind, "requestID", rid, "attempt", attempt, "timeout", c.opts.RequestTimeout.String())
		case <-ctx.Done():
			t.Stop()
			return protocol.Response{}, fmt.Errorf("%s request %s: %w after %d attempt(s)%s: %w", kind, rid, ErrNoResponse, attempt, publishError(tok), ctx.Err())
		case <-c.ctx.Done():
			t.Stop()
			return protocol.Response{}, ErrClosed
		}
	}
}

// publishError describes a failed publish token, or returns "".
func publishError(tok mqtt.Token) string {
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			return " (publish failed: " + err.Error() + ")"
		}
	default:
		return " (publish not yet acknowledged by the broker)"
	}
	return ""
}

// requestError makes the *RequestError for an unexpected status.
func (c *Client) requestError(resp protocol.Response) *RequestError {
	msg := resp.Error
	if msg == "" {
		switch resp.Status {
		case protocol.StatusNotFound:
			msg = "no DeviceTwin for device id " + c.opts.DeviceID
		case protocol.StatusBadRequest:
			msg = "bad request"
		case protocol.StatusTooMany:
			msg = "operator overloaded; retry later"
		case protocol.StatusError:
			msg = "operator could not store the request; retry later"
		default:
			msg = "unexpected status"
		}
	}
	return &RequestError{Status: resp.Status, Message: msg}
}

// parseTwin splits a GET response into its documents and versions.
func (c *Client) parseTwin(resp protocol.Response) (map[string]any, int64, map[string]any, int64, error) {
	desired, dv, err := splitDocVersion(resp.Desired)
	if err != nil {
		return nil, 0, nil, 0, fmt.Errorf("desired: %w", err)
	}
	reported, rv, err := splitDocVersion(resp.Reported)
	if err != nil {
		return nil, 0, nil, 0, fmt.Errorf("reported: %w", err)
	}
	return desired, dv, reported, rv, nil
}

// splitDocVersion returns a copy of doc without "$version", and the version.
// A nil document is an empty document at version 0.
func splitDocVersion(doc map[string]any) (map[string]any, int64, error) {
	out := make(map[string]any, len(doc))
	var v int64
	for k, val := range doc {
		if k != protocol.VersionKey {
			out[k] = val
			continue
		}
		var err error
		v, err = toInt64(val)
		if err != nil {
			return nil, 0, fmt.Errorf("%q: %w", protocol.VersionKey, err)
		}
	}
	return out, v, nil
}

func toInt64(v any) (int64, error) {
	switch n := v.(type) {
	case json.Number:
		return n.Int64()
	case float64:
		if n != float64(int64(n)) {
			return 0, fmt.Errorf("%v is not an integer", n)
		}
		return int64(n), nil
	case int64:
		return n, nil
	case int:
		return int64(n), nil
	default:
		return 0, fmt.Errorf("%v is not a number", v)
	}
}

// newRID returns a fresh request id: a per-client random prefix and a counter.
func (c *Client) newRID() string {
	return c.ridPrefix + "-" + strconv.FormatUint(c.ridSeq.Add(1), 10)
}

// deliver hands a response to its waiting request. A response nobody waits
// for (a duplicate answer to a resent request) is dropped.
func (c *Client) deliver(topic string, payload []byte) {
	rid := strings.TrimPrefix(topic, c.resPrefix)
	var resp protocol.Response
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber()
	if err := dec.Decode(&resp); err != nil {
		c.log.Error(err, "ignoring malformed response", "topic", topic)
		return
	}
	c.waitMu.Lock()
	ch, ok := c.waiters[rid]
	c.waitMu.Unlock()
	if !ok {
		c.log.V(1).Info("ignoring response to no pending request", "requestID", rid, "status", resp.Status)
		return
	}
	select {
	case ch <- resp:
	default: // already answered; a duplicate
	}
}
