package abuse

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// patchTwin merge-patches a twin.
func patchTwin(ns, name, patch string) error {
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	return k8s.Patch(context.Background(), tw, client.RawPatch(types.MergePatchType, []byte(patch)))
}

// connectOnce connects a device with a persistent session, subscribes to
// its desired topics and disconnects, leaving the session behind.
func (h *harness) connectOnce(t *testing.T, id string) error {
	c, _, err := h.connectDevice(t, id, false, dialOptions{})
	if err != nil {
		return err
	}
	defer c.Close()
	if g, err := c.subscribe(nextID(), protocol.DesiredFilter(id), 1); err != nil || g > 2 {
		return fmt.Errorf("%s: SUBSCRIBE: granted %d, %v", id, g, err)
	}
	return c.send([]byte{pktDisconnect, 0}, 5*time.Second)
}

// sessionPresent connects a device with clean=false and returns the
// CONNACK's session-present flag; with drain it also collects, until the
// broker goes quiet, the desired patches queued for it.
func (h *harness) sessionPresent(t *testing.T, id string, drain bool) (bool, int, error) {
	c, present, err := h.connectDevice(t, id, false, dialOptions{})
	if err != nil {
		return false, 0, err
	}
	defer c.Close()
	patches := 0
	for drain {
		p, err := c.read(time.Now().Add(2 * time.Second))
		if err != nil {
			break
		}
		if p.typ() == pktPublish {
			c.ackPublish(p)
			if topic, _, _, _, _ := p.publish(); topic == protocol.DesiredPatchTopic(id) {
				patches++
			}
		}
	}
	_ = c.send([]byte{pktDisconnect, 0}, 5*time.Second)
	return present, patches, nil
}

// attackSessions: 300 devices connect once with clean=false and leave.
// Their sessions must be bounded: desired patches queued for an offline
// session stop at the queue bound, a deleted device's session ends at
// once, and the rest expire after --mqtt-session-expiry.
func attackSessions(t *testing.T, h *harness) {
	const n = 300
	ids := h.devices(t, "sess", n, "")
	t0 := time.Now()
	parallel(t, 20, ids, func(id string) error { return h.connectOnce(t, id) })
	t.Logf("%d persistent sessions left in %s", n, time.Since(t0).Round(time.Millisecond))

	// A deleted device's session ends at once: the same name recreated
	// (with a new key) finds no session.
	del := ids[n-1]
	if err := k8s.Delete(context.Background(), &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: h.ns, Name: del}}); err != nil {
		t.Fatal(err)
	}
	// The control plane has no garbage collector: remove the key Secret the
	// twin owned, as a cluster would.
	if err := k8s.Delete(context.Background(), &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: h.ns, Name: v1alpha1.KeySecretName(del)}}); err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "the deleted twin goes (the operator removes its finalizer)", func() error {
		if _, err := h.getTwin(del); err == nil {
			return fmt.Errorf("%s still exists", del)
		}
		return nil
	})
	if err := createTwin(h.ns, del, ""); err != nil {
		t.Fatal(err)
	}
	h.waitOwnKey(t, del)
	present, _, err := h.sessionPresent(t, del, false)
	var queued int
	switch {
	case err != nil:
		t.Errorf("recreated device %s: %v", del, err)
	case present && time.Since(t0) < sessionExpiry:
		t.Errorf("a device deleted and created again found its old persistent session: a deleted device's sessions must end at once (broker-sessions, item 7)")
	case time.Since(t0) >= sessionExpiry:
		t.Logf("inconclusive: the deleted device's check came %s after it left, past the session expiry", time.Since(t0).Round(time.Second))
	}

	// The queue of an offline session: more desired changes than it
	// holds, to a device that left just now.
	q := ids[0]
	if err := h.connectOnce(t, q); err != nil {
		t.Fatal(err)
	}
	tq := time.Now()
	for v := 1; v <= maxSessionQueue+10; v++ {
		if err := patchDesired(h.ns, q, fmt.Sprintf(`{"v":%d}`, v)); err != nil {
			t.Fatalf("patching %s: %v", q, err)
		}
	}
	eventually(t, 30*time.Second, "the operator publishes the desired changes", func() error {
		tw, err := h.getTwin(q)
		if err != nil {
			return err
		}
		if tw.Status.ObservedGeneration != tw.Generation {
			return fmt.Errorf("observedGeneration %d, generation %d", tw.Status.ObservedGeneration, tw.Generation)
		}
		return nil
	})
	present, queued, err = h.sessionPresent(t, q, true)
	switch {
	case err != nil:
		t.Fatal(err)
	case !present && time.Since(tq) >= sessionExpiry:
		t.Logf("inconclusive: the desired changes took %s, past the session expiry", time.Since(tq).Round(time.Second))
	case !present:
		t.Errorf("%s's persistent session was gone %s after it left, before the %s expiry", q, time.Since(tq).Round(time.Second), sessionExpiry)
	default:
		t.Logf("%s got %d queued desired patches on reconnecting", q, queued)
		if queued > maxSessionQueue {
			t.Errorf("an offline session queued %d desired patches, over the %d allowed (--mqtt-max-session-queue, broker-sessions, item 7)", queued, maxSessionQueue)
		}
	}

	// The rest expire. Each probe uses another device: a probe with
	// clean=false starts a new session itself.
	h.requireFlag(t, "mqtt-session-expiry", "broker-sessions, item 7")
	for time.Since(t0) < sessionExpiry {
		time.Sleep(500 * time.Millisecond) // waiting for the expiry is what is tested
	}
	probe := 1 // ids[0] was reconnected above
	eventually(t, 30*time.Second, fmt.Sprintf("persistent sessions expire %s after their device left (--mqtt-session-expiry, broker-sessions, item 7)", sessionExpiry), func() error {
		id := ids[probe]
		probe++
		present, _, err := h.sessionPresent(t, id, false)
		if err != nil {
			return err
		}
		if present {
			return fmt.Errorf("%s still had its session %s after it left", id, time.Since(t0).Round(time.Second))
		}
		return nil
	})
	// Only the probes' own sessions may be left.
	eventually(t, 10*time.Second, "the offline sessions gauge falls once the sessions expired (broker-sessions, item 7)", func() error {
		v, ok, err := h.mon.metric(metricOfflineSess)
		switch {
		case err != nil:
			return err
		case !ok:
			return fmt.Errorf("the operator does not expose %s", metricOfflineSess)
		case int(v) > probe+10:
			return fmt.Errorf("%s is %v %s after the devices left", metricOfflineSess, v, time.Since(t0).Round(time.Second))
		}
		return nil
	})
}

// service calls the service API with an iothubowner token.
func (h *harness) service(t *testing.T, method, path string, body []byte, hdr map[string]string) (int, []byte, error) {
	return h.serviceClient(t).do(method, path, body, hdr)
}

// waitOwnKey waits until the key Secret of a recreated twin is the one the
// operator made for it (controlled by the new twin) and remembers its key.
// The operator may have made the old twin's Secret again while that twin
// was being deleted; the control plane here has no garbage collector, so
// this does its work: a Secret controlled by a twin that is gone is deleted.
func (h *harness) waitOwnKey(t *testing.T, id string) {
	t.Helper()
	eventually(t, 60*time.Second, "the operator makes the recreated twin's key Secret", func() error {
		tw, err := h.getTwin(id)
		if err != nil {
			return err
		}
		s := &corev1.Secret{}
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: h.ns, Name: v1alpha1.KeySecretName(id)}, s); err != nil {
			return err
		}
		if !metav1.IsControlledBy(s, tw) {
			if err := k8s.Delete(context.Background(), s); err != nil && !apierrors.IsNotFound(err) {
				return err
			}
			return fmt.Errorf("the key Secret of %s belonged to the deleted twin", id)
		}
		if len(s.Data[v1alpha1.PrimaryKeyKey]) == 0 {
			return fmt.Errorf("the key Secret of %s has no key yet", id)
		}
		h.keys.Store(id, string(s.Data[v1alpha1.PrimaryKeyKey]))
		return nil
	})
}
