package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// metricSum scrapes the operator's metrics and sums the samples of one
// metric (all label sets).
func metricSum(g Gomega, addr, name string) float64 {
	resp, err := http.Get("http://" + addr + "/metrics")
	g.Expect(err).NotTo(HaveOccurred())
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	g.Expect(err).NotTo(HaveOccurred())
	sum := 0.0
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndex(line, " ")+1:], 64)
		g.Expect(err).NotTo(HaveOccurred(), line)
		sum += v
	}
	return sum
}

// TestMosquittoDynsecRestart: with --mosquitto-dynsec, restarting the
// operator on an unchanged fleet sends the plugin only its listing (one
// listClients page) — the old code asked getRole and getClient for every
// device — and disconnects no device. A key changed and a twin deleted
// while the operator was down are acted on at the next start.
func TestMosquittoDynsecRestart(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	plugin, dynsecFile, pw, pwFile := dynsecFiles(t)
	dir := filepath.Dir(dynsecFile)
	// The broker logs every command the plugin receives: the count does
	// not depend on the operator's own metric.
	brokerLog := filepath.Join(dir, "mosquitto.log")
	addr := startMosquittoConf(t, fmt.Sprintf("allow_anonymous false\nuser root\nplugin %s\nplugin_opt_config_file %s\nlog_dest file %s\n",
		plugin, dynsecFile, brokerLog))
	pluginCommands := func() []string {
		b, _ := os.ReadFile(brokerLog)
		var cmds []string
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "dynsec: kubetwin-operator-") {
				cmds = append(cmds, l)
			}
		}
		return cmds
	}
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	op := newOperator(t, mosquittoBroker, ns, addr)
	op.secure = true
	op.probeUser, op.probePassword = "kubetwin-operator", pw
	op.extraArgs = []string{"--broker-username=kubetwin-operator", "--broker-password-file=" + pwFile, "--mosquitto-dynsec",
		"--metrics-bind-address=" + metrics, "--metrics-secure=false"}
	op.start()

	const n = 12
	for i := range n {
		createTwin(t, ns, fmt.Sprintf("rs-%d", i), fmt.Sprintf("Rs-%d", i), "")
	}
	for i := range n {
		key := primaryKey(t, ns, fmt.Sprintf("rs-%d", i))
		c := eventuallyConnects(t, addr, fmt.Sprintf("Rs-%d", i), fmt.Sprintf("Rs-%d", i), func() string { return key })
		c.Disconnect(0)
	}
	key1 := primaryKey(t, ns, "rs-1")
	stay := eventuallyConnects(t, addr, "Rs-1", "Rs-1", func() string { return key1 })

	// Restart on the unchanged fleet: once every twin was reconciled, only
	// the listing was sent, and Rs-1 is still connected.
	op.stop()
	before := len(pluginCommands())
	op.start()
	g.Eventually(func(g Gomega) {
		g.Expect(metricSum(g, metrics, `controller_runtime_reconcile_total{controller="devicetwin",result="success"}`)).
			To(BeNumerically(">=", n))
	}, wait, tick).Should(Succeed())
	// A twin may be reconciled twice among those n: watch a while longer.
	g.Consistently(func(g Gomega) {
		g.Expect(pluginCommands()[before:]).To(HaveLen(1), "commands the broker received at a restart on an unchanged fleet")
		g.Expect(pluginCommands()[before:][0]).To(ContainSubstring("| listClients"))
		g.Expect(metricSum(g, metrics, "kubetwin_dynsec_commands_total")).To(Equal(1.0),
			"commands sent to the plugin at a restart on an unchanged fleet of %d devices", n)
		g.Expect(stay.IsConnectionOpen()).To(BeTrue(), "the restart disconnected Rs-1")
	}, 2*time.Second, 200*time.Millisecond).Should(Succeed())

	// While the operator is down: rs-2 is re-keyed, rs-3 deleted.
	op.stop()
	old2 := primaryKey(t, ns, "rs-2")
	fresh := sas.NewKey()
	patchSecret(t, ns, v1alpha1.KeySecretName("rs-2"), map[string]string{v1alpha1.PrimaryKeyKey: fresh})
	key3 := primaryKey(t, ns, "rs-3")
	if err := k8s.Delete(context.Background(), &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "rs-3"}}); err != nil {
		t.Fatal(err)
	}
	op.start()
	eventuallyConnects(t, addr, "Rs-2", "Rs-2", func() string { return fresh }).Disconnect(0)
	eventuallyRefused(t, "rs-2's key from before", addr, "Rs-2", "Rs-2", func() string { return old2 })
	eventuallyRefused(t, "deleted rs-3", addr, "Rs-3", "Rs-3", func() string { return key3 })
	g.Eventually(func() string {
		b, _ := os.ReadFile(dynsecFile)
		return string(b)
	}, wait, tick).ShouldNot(ContainSubstring(`"Rs-3"`), "the plugin's configuration still has the deleted device")
}
