package deviceauth

import (
	"context"
	"fmt"
	"sync"

	"github.com/kubetwin/kubetwin/internal/bus"
)

// Provisioner keeps a broker's record of who may connect in step with the
// twins. The DeviceTwin reconciler calls it.
type Provisioner interface {
	// Provision makes the broker accept the device with its current keys,
	// or refuse it when it is disabled, and ends connections that the
	// change makes invalid.
	Provision(ctx context.Context, d Device) error
	// Deprovision makes the broker refuse the device from now on (its
	// twin is gone) and ends its connection.
	Deprovision(ctx context.Context, deviceID string) error
}

// Rechecker is the embedded broker's side (bus.Embedded.Recheck): it
// runs check on the credentials a connected device presented and
// disconnects the device when check refuses them.
type Rechecker interface {
	Recheck(deviceID string, check func(username string, password []byte) error) error
}

// EmbeddedProvisioner is the Provisioner of the embedded broker. That
// broker looks devices up when they connect, so there is nothing to
// store; a change only needs the connected device checked again, against
// the device as the reconciler sees it (not the cache, which may lag
// behind the reconciler's own writes). It is cheap (no I/O), so it needs
// no OnChange.
type EmbeddedProvisioner struct {
	Broker Rechecker
	Auth   *Authenticator
}

// Provision checks the connected device against d.
func (p EmbeddedProvisioner) Provision(_ context.Context, d Device) error {
	return p.Broker.Recheck(d.ID, func(username string, password []byte) error {
		_, err := p.Auth.Verify(d, username, password)
		return err
	})
}

// Deprovision disconnects the device: its twin is gone.
func (p EmbeddedProvisioner) Deprovision(_ context.Context, deviceID string) error {
	return p.Broker.Recheck(deviceID, func(string, []byte) error {
		return bus.Refuse(bus.ReasonUnknownDevice, fmt.Sprintf("the DeviceTwin of device %q was deleted", deviceID))
	})
}

// OnChange wraps a Provisioner so that Provision runs only when a device's
// credentials or status changed since its last successful Provision in
// this process. The reconciler runs for every report a device sends; the
// broker needs to hear only about changes.
func OnChange(p Provisioner) Provisioner {
	return &onChange{next: p, done: map[string]string{}}
}

type onChange struct {
	next Provisioner
	mu   sync.Mutex
	done map[string]string // device id -> Fingerprint last provisioned
}

func (o *onChange) Provision(ctx context.Context, d Device) error {
	fp := d.Fingerprint()
	o.mu.Lock()
	same := o.done[d.ID] == fp
	o.mu.Unlock()
	if same {
		return nil
	}
	if err := o.next.Provision(ctx, d); err != nil {
		return err
	}
	o.mu.Lock()
	o.done[d.ID] = fp
	o.mu.Unlock()
	return nil
}

func (o *onChange) Deprovision(ctx context.Context, deviceID string) error {
	o.mu.Lock()
	delete(o.done, deviceID)
	o.mu.Unlock()
	return o.next.Deprovision(ctx, deviceID)
}
