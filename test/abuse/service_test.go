package abuse

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/pkg/sas"
)

// serviceClient calls the service API as a back end with the iothubowner
// policy would.
type serviceClient struct {
	base string
	key  []byte
	hc   *http.Client
}

func (h *harness) serviceClient(t *testing.T) *serviceClient {
	t.Helper()
	s := &corev1.Secret{}
	eventually(t, 30*time.Second, "the operator creates the service policies Secret", func() error {
		return k8s.Get(context.Background(), client.ObjectKey{Namespace: h.ns, Name: "kubetwin-service-policies"}, s)
	})
	key, err := sas.DecodeKey(string(s.Data["iothubowner.primaryKey"]))
	if err != nil {
		t.Fatalf("iothubowner.primaryKey of the service policies Secret: %v", err)
	}
	return &serviceClient{
		base: "https://" + h.svcAddr,
		key:  key,
		hc: &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{
			TLSClientConfig: h.tlsConfig, MaxIdleConnsPerHost: 64,
		}},
	}
}

func (s *serviceClient) do(method, path string, body []byte, hdr map[string]string) (int, []byte, error) {
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	req, err := http.NewRequest(method, s.base+path+sep+"api-version=2021-04-12", bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", sas.Sign(hub, s.key, time.Now().Add(time.Hour), "iothubowner"))
	req.Header.Set("Content-Type", "application/json")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := s.hc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// attackQueries: more concurrent queries than the bound get 429 with IoT
// Hub's ThrottlingException at once, instead of piling up.
func attackQueries(t *testing.T, h *harness) {
	sc := h.serviceClient(t)
	const n = 48
	type result struct {
		status int
		body   []byte
		took   time.Duration
		err    error
	}
	var all []result
	for round := 0; round < 3; round++ {
		results := make([]result, n)
		var wg sync.WaitGroup
		gate := make(chan struct{})
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-gate
				start := time.Now()
				st, b, err := sc.do(http.MethodPost, "/devices/query", []byte(`{"query":"SELECT * FROM devices"}`),
					map[string]string{"x-ms-max-item-count": "1000"})
				results[i] = result{st, b, time.Since(start), err}
			}()
		}
		close(gate)
		wg.Wait()
		all = append(all, results...)
	}
	counts := map[int]int{}
	var took []time.Duration
	for _, r := range all {
		if r.err != nil {
			t.Errorf("a query failed outright: %v", r.err)
			continue
		}
		counts[r.status]++
		took = append(took, r.took)
		switch r.status {
		case http.StatusOK:
		case http.StatusTooManyRequests:
			if !bytes.Contains(r.body, []byte("ThrottlingException")) {
				t.Errorf("a 429 without IoT Hub's ThrottlingException body: %s", r.body)
			}
		default:
			t.Errorf("a query answered %d: %.300s", r.status, r.body)
		}
	}
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	t.Logf("%d queries, %d at a time: statuses %v; latency p50 %s, max %s", len(all), n, counts,
		percentile(took, 50).Round(time.Millisecond), took[len(took)-1].Round(time.Millisecond))
	if counts[http.StatusTooManyRequests] == 0 {
		t.Errorf("none of %d concurrent queries got 429: queries are not bounded (--service-api-max-concurrent-queries %d, service-api, item 9)", n, maxQueries)
	}
	if worst := took[len(took)-1]; worst > 20*time.Second {
		t.Errorf("a query took %s: queries pile up instead of being refused (service-api, item 9)", worst.Round(time.Millisecond))
	}
	if st, b, err := sc.do(http.MethodPost, "/devices/query", []byte(`{"query":"SELECT * FROM devices WHERE deviceId = 'legit-0000'"}`), nil); err != nil || st != http.StatusOK {
		t.Errorf("a single query after the flood: %d %v: %.300s", st, err, b)
	}
}

// attackLogFlood: refused CONNECTs with 64 KiB usernames. The log must stay
// bounded in lines and line length.
func attackLogFlood(t *testing.T, h *harness) {
	mark := h.op.log.mark()
	start := time.Now()
	type try struct{ user, client string }
	var tries []try
	for i := range 200 {
		size := 65535 // the longest MQTT string: the CONNECT is over the packet limit
		if i%2 == 1 {
			size = 60000 // under it: the broker reads it and refuses the credentials
		}
		tries = append(tries, try{strings.Repeat(string(rune('a'+i%26)), size), fmt.Sprintf("flood-%d-%s", i, strings.Repeat("c", 1000))})
	}
	var mu sync.Mutex
	accepted, dialed := 0, 0
	var dialErr error
	parallel(t, 10, tries, func(tr try) error {
		c, err := dialRaw(h.tlsAddr, dialOptions{tls: h.tlsConfig, source: logSource})
		mu.Lock()
		if err != nil {
			dialErr = err
		} else {
			dialed++
		}
		mu.Unlock()
		if err != nil {
			return nil
		}
		defer c.Close()
		if _, code, err := c.connect(tr.client, tr.user, "not-a-sas-token", true); err == nil && code == 0 {
			mu.Lock()
			accepted++
			mu.Unlock()
		}
		return nil
	})
	if dialed < len(tries)/2 {
		t.Fatalf("only %d of %d attack connections got through the TLS handshake (%v): the attack did not happen", dialed, len(tries), dialErr)
	}
	dur := time.Since(start)
	lines, longest, prefix := h.op.log.since(mark)
	// Two kinds of refusal (packet too large, not authorized), each at most
	// 10 a second after a burst of 20, plus their "suppressed" lines.
	budget := int64(2*(20+10*dur.Seconds()) + 20)
	t.Logf("200 refused CONNECTs with 60-64 KiB usernames in %s: %d log lines, longest %d bytes", dur.Round(time.Millisecond), lines, longest)
	if accepted > 0 {
		t.Errorf("%d CONNECTs with a bogus password were accepted", accepted)
	}
	if lines > budget {
		t.Errorf("refused CONNECTs logged %d lines in %s, over %d: refusals are not rate-limited (--log-rate-limit, broker-sessions, item 11)", lines, dur.Round(time.Millisecond), budget)
	}
	if longest > logLineBound {
		t.Errorf("a refused CONNECT logged a %d-byte line (over %d): usernames and client ids are not cut to 128 bytes (broker-sessions, item 11): %q...", longest, logLineBound, prefix)
	}
}
