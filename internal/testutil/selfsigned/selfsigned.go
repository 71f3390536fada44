// Package selfsigned issues throwaway self-signed TLS server certificates
// for tests and the benchmark.
package selfsigned

import (
	"crypto/tls"
	"crypto/x509"
	"time"

	"github.com/kubetwin/kubetwin/internal/certs"
)

// New returns a self-signed server certificate, valid for a day, for
// 127.0.0.1, localhost and the given host names or IP addresses, and a
// pool that trusts it. It is the operator's own [certs.SelfSigned].
func New(hosts ...string) (tls.Certificate, *x509.CertPool, error) {
	c, err := certs.SelfSigned(append([]string{"127.0.0.1", "localhost"}, hosts...), 24*time.Hour)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(c.Leaf)
	return *c, pool, nil
}
