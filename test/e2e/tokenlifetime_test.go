package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"

	"github.com/kubetwin/kubetwin/pkg/sas"
)

// TestTokenLifetimeAndEscapedIDs: the operator as shipped (default
// --max-sas-token-lifetime, a year) refuses a device token that expires in
// 400 days with CONNACK 5 and logs why, while one of 300 days connects; a
// device whose id holds "%41" connects with a token signed the documented
// way.
func TestTokenLifetimeAndEscapedIDs(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	adminPW := randomSuffix() + randomSuffix()
	pwFile := filepath.Join(t.TempDir(), "admin-password")
	if err := os.WriteFile(pwFile, []byte(adminPW+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	op := newOperator(t, embeddedBroker, ns, "")
	op.secure = true
	op.probeUser, op.probePassword = "kubetwin-admin", adminPW
	op.extraArgs = []string{"--mqtt-tls-bind-address=", "--hub-hostname=localhost", "--mqtt-admin-password-file=" + pwFile}
	op.start()

	for name, id := range map[string]string{"life": "Life-1", "esc": "esc%41"} {
		createTwin(t, ns, name, id, "")
		key := primaryKey(t, ns, name)
		user := "localhost/" + id + "/?api-version=2021-04-12"
		sign := func(valid time.Duration) func() string {
			return func() string { s, _ := sas.SignDevice("localhost", id, key, time.Now().Add(valid)); return s }
		}
		c := eventuallyConnects(t, op.brokerAddr, id, user, sign(300*24*time.Hour))
		c.Disconnect(0)
		if id != "Life-1" {
			continue
		}
		_, code, err := dialMQTT(t, op.brokerAddr, id, user, sign(400*24*time.Hour)())
		g.Expect(err).To(HaveOccurred())
		g.Expect(code).To(Equal(byte(5)), "a 400-day token: want CONNACK 5 (not authorized)")
		g.Eventually(func() bool {
			b, _ := os.ReadFile(op.logPath)
			return strings.Contains(string(b), "token_lifetime_too_long")
		}, wait, tick).Should(BeTrue(), "the operator did not log the reason")
	}
}
