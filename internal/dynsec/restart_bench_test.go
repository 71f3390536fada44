package dynsec

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/kubetwin/kubetwin/internal/deviceauth"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// BenchmarkRestartUnchangedFleet times one operator restart on an
// unchanged fleet of 1,000 devices in a real Mosquitto: start-up, then a
// Provision of every device by 8 workers (as reconcilers would), until all
// are done. "listing" is this package; "perDevice" drops what start-up
// read, so every device is asked for (getRole, getClient) as before.
func BenchmarkRestartUnchangedFleet(b *testing.B) {
	const n, workers = 1000, 8
	pw := sas.NewKey()
	addr := startBroker(b, pw)
	key := []byte("0123456789abcdef0123456789abcdef")
	ctx := context.Background()
	keys := make(map[string]string, n)
	devices := make(map[string]bool, n)
	setup := startClient(b, addr, pw, key, nil, 0)
	var cmds []Command
	for i := range n {
		id := fmt.Sprintf("bench-%05d", i)
		k := sas.NewKey()
		keys[id], devices[id] = k, true
		cmds = append(cmds,
			Command{"command": "createRole", "rolename": RoleName(id), "textname": ManagedTextName, "acls": deviceACLs(id)},
			Command{"command": "createClient", "username": id, "clientid": id, "password": k, "textname": ManagedTextName,
				"textdescription": marker(key, id, k), "roles": []map[string]any{{"rolename": RoleName(id)}}})
		if len(cmds) >= 20 || i == n-1 {
			if err := setup.doAll(ctx, cmds); err != nil {
				b.Fatal(err)
			}
			cmds = cmds[:0]
		}
	}
	setup.stop()

	for _, mode := range []string{"listing", "perDevice"} {
		b.Run(mode, func(b *testing.B) {
			var sent uint64
			for b.Loop() {
				c := startClient(b, addr, pw, key, devices, 0)
				if mode == "perDevice" {
					c.mu.Lock()
					c.known = nil
					c.mu.Unlock()
				}
				p := deviceauth.OnChange(c.Client)
				ids := make(chan string)
				var wg sync.WaitGroup
				for range workers {
					wg.Go(func() {
						for id := range ids {
							if err := p.Provision(ctx, deviceauth.Device{ID: id, PrimaryKey: keys[id]}); err != nil {
								b.Error(err)
							}
						}
					})
				}
				for id := range keys {
					ids <- id
				}
				close(ids)
				wg.Wait()
				sent += c.CommandsSent()
				c.stop()
			}
			b.ReportMetric(float64(sent)/float64(b.N), "commands/op")
		})
	}
}
