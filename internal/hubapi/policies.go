package hubapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	"github.com/kubetwin/kubetwin/pkg/sas"
)

// The shared access policies Secret holds, for each policy <p>, the data
// keys <p>.primaryKey, <p>.secondaryKey (base64 of 16 to 64 bytes, as IoT
// Hub's keys), <p>.rights (a comma-separated list of [Right]s) and
// <p>.connectionString
// (HostName=<hub host>;SharedAccessKeyName=<p>;SharedAccessKey=<primary key>),
// plus hostName, the hub host name. Policy names are what Secret data keys
// allow before the last '.': letters, digits, '-', '_' and '.'.
const (
	// HostNameKey is the data key of the hub host name.
	HostNameKey = "hostName"
	// PrimaryKeySuffix follows the policy name in the key of its primary key.
	PrimaryKeySuffix = ".primaryKey"
	// SecondaryKeySuffix follows the policy name in the key of its secondary key.
	SecondaryKeySuffix = ".secondaryKey"
	// RightsSuffix follows the policy name in the key of its rights.
	RightsSuffix = ".rights"
	// ConnectionStringSuffix follows the policy name in the key of its
	// service connection string.
	ConnectionStringSuffix = ".connectionString"
)

// Right is a permission a shared access policy grants, as IoT Hub names it.
type Right string

// Rights of shared access policies.
const (
	// RegistryRead allows reading the device registry (GET /devices...) and
	// running queries.
	RegistryRead Right = "RegistryRead"
	// RegistryWrite allows creating, updating and deleting devices.
	RegistryWrite Right = "RegistryWrite"
	// ServiceConnect allows reading and writing twins and running queries.
	ServiceConnect Right = "ServiceConnect"
	// DeviceConnect is IoT Hub's right to connect on behalf of devices. The
	// service API accepts it in policies but no operation needs it.
	DeviceConnect Right = "DeviceConnect"
)

var allRights = []Right{RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect}

// Names of the default policies, those IoT Hub creates in every hub.
const (
	PolicyIoTHubOwner       = "iothubowner"
	PolicyService           = "service"
	PolicyRegistryRead      = "registryRead"
	PolicyRegistryReadWrite = "registryReadWrite"
)

// defaultPolicies are the policies EnsurePolicies keeps, with their rights.
var defaultPolicies = []struct {
	name   string
	rights []Right
}{
	{PolicyIoTHubOwner, []Right{RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect}},
	{PolicyService, []Right{ServiceConnect}},
	{PolicyRegistryRead, []Right{RegistryRead}},
	{PolicyRegistryReadWrite, []Right{RegistryRead, RegistryWrite}},
}

// PolicyConnectionString returns the service connection string of a
// policy, as IoT Hub shows it and the service SDKs' fromConnectionString
// take it.
func PolicyConnectionString(hubHostname, policy, key string) string {
	return "HostName=" + hubHostname + ";SharedAccessKeyName=" + policy + ";SharedAccessKey=" + key
}

// EnsurePolicies makes the Secret namespace/name hold the shared access
// policies in the layout described at [HostNameKey]. When the Secret does
// not exist it is created with IoT Hub's four default policies and new
// random keys:
//
//	iothubowner        RegistryRead,RegistryWrite,ServiceConnect,DeviceConnect
//	service            ServiceConnect
//	registryRead       RegistryRead
//	registryReadWrite  RegistryRead,RegistryWrite
//
// When it exists only what is missing is filled in: a default policy's
// missing key is generated and its missing rights entry set to the
// defaults (an entry that is present, even empty, is kept: an empty list
// disables the policy), and the keys, rights and further policies the user
// wrote are kept. Every policy's connection string and hostName are
// rewritten for hubHostname. The Secret is written only when something
// changed.
//
// c must read Secrets from the API server, not from a cache: the
// manager's cache holds only device-key Secrets, so pass a client built
// with client.New (or a client whose cache is disabled for Secrets).
func EnsurePolicies(ctx context.Context, c client.Client, namespace, name, hubHostname string) error {
	key := types.NamespacedName{Namespace: namespace, Name: name}
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name}}
		_, err := controllerutil.CreateOrUpdate(ctx, c, s, func() error {
			if s.CreationTimestamp.IsZero() {
				s.Labels = map[string]string{"app.kubernetes.io/managed-by": "kubetwin"}
				s.Type = corev1.SecretTypeOpaque
			}
			s.Data = fillPolicies(s.Data, hubHostname)
			return nil
		})
		return err
	})
	switch {
	case apierrors.IsAlreadyExists(err):
		return fmt.Errorf("creating shared access policies Secret %s: it exists, but the client cannot read it (is it reading through a cache?): %w", key, err)
	case err != nil:
		return fmt.Errorf("writing shared access policies Secret %s: %w", key, err)
	}
	return nil
}

// fillPolicies returns a copy of data with the default policies' missing
// keys and rights filled in and every connection string and the host name
// set.
func fillPolicies(data map[string][]byte, hubHostname string) map[string][]byte {
	out := make(map[string][]byte, len(data)+4*len(defaultPolicies)+1)
	for k, v := range data {
		out[k] = v
	}
	for _, p := range defaultPolicies {
		for _, suffix := range []string{PrimaryKeySuffix, SecondaryKeySuffix} {
			if len(bytes.TrimSpace(out[p.name+suffix])) == 0 {
				out[p.name+suffix] = []byte(sas.NewKey())
			}
		}
		if _, ok := out[p.name+RightsSuffix]; !ok {
			out[p.name+RightsSuffix] = []byte(joinRights(p.rights))
		}
	}
	for _, name := range policyNames(out) {
		primary := strings.TrimSpace(string(out[name+PrimaryKeySuffix]))
		if _, err := sas.DecodeKey(primary); err == nil {
			out[name+ConnectionStringSuffix] = []byte(PolicyConnectionString(hubHostname, name, primary))
		}
	}
	out[HostNameKey] = []byte(hubHostname)
	return out
}

func joinRights(rs []Right) string {
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = string(r)
	}
	return strings.Join(s, ",")
}

// policyNames returns the names of the policies data mentions, sorted.
func policyNames(data map[string][]byte) []string {
	seen := map[string]bool{}
	for k := range data {
		i := strings.LastIndexByte(k, '.')
		if i <= 0 {
			continue
		}
		switch k[i:] {
		case PrimaryKeySuffix, SecondaryKeySuffix, RightsSuffix, ConnectionStringSuffix:
			seen[k[:i]] = true
		}
	}
	names := make([]string, 0, len(seen))
	for n := range seen {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func sameData(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}

// policy is one shared access policy, parsed.
type policy struct {
	name string
	// keys are the decoded primary key and, when there is one, the
	// secondary key.
	keys   [][]byte
	rights []Right
	// err, when set, says why the policy is unusable: it refuses every
	// request.
	err error
}

// has reports whether the policy grants r.
func (p *policy) has(r Right) bool { return slices.Contains(p.rights, r) }

// parsePolicies parses the policies of the Secret's data.
func parsePolicies(data map[string][]byte) map[string]*policy {
	out := map[string]*policy{}
	for _, name := range policyNames(data) {
		p := &policy{name: name}
		out[name] = p
		primary := strings.TrimSpace(string(data[name+PrimaryKeySuffix]))
		if primary == "" {
			p.err = errors.New(name + PrimaryKeySuffix + " is missing")
			continue
		}
		k, err := sas.DecodeKey(primary)
		if err != nil {
			p.err = fmt.Errorf("%s%s: %w", name, PrimaryKeySuffix, err)
			continue
		}
		p.keys = append(p.keys, k)
		if secondary := strings.TrimSpace(string(data[name+SecondaryKeySuffix])); secondary != "" {
			k, err := sas.DecodeKey(secondary)
			if err != nil {
				p.err = fmt.Errorf("%s%s: %w", name, SecondaryKeySuffix, err)
				continue
			}
			p.keys = append(p.keys, k)
		}
		p.rights, p.err = parseRights(string(data[name+RightsSuffix]))
		if p.err != nil {
			p.err = fmt.Errorf("%s%s: %w", name, RightsSuffix, p.err)
		}
	}
	return out
}

// parseRights parses a comma-separated list of rights. Names match in any
// case; spaces around them and empty items are ignored.
func parseRights(s string) ([]Right, error) {
	var rights []Right
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		i := slices.IndexFunc(allRights, func(r Right) bool { return strings.EqualFold(string(r), item) })
		if i < 0 {
			return nil, fmt.Errorf("unknown right %q (want a comma-separated list of %s)", item, joinRights(allRights))
		}
		if !slices.Contains(rights, allRights[i]) {
			rights = append(rights, allRights[i])
		}
	}
	return rights, nil
}

// policySet is the content of the policies Secret at one resourceVersion.
type policySet struct {
	policies map[string]*policy
	// version is the Secret's resourceVersion, "" when it does not exist.
	version string
}

// policyStore reads the policies Secret from the API server and keeps it
// for ttl. Reading live (instead of through the manager's cache, which
// holds only device-key Secrets) needs no watch on the Secret and no RBAC
// beyond get; the TTL bounds that to one GET per ttl, and a signature that
// does not verify forces a re-read (at most one a second), so a new key
// works at once and a removed one stops working within ttl and one read.
//
// One read runs at a time, with its own timeout and no lock held, and
// requests do not queue behind it: once a copy exists, a request takes that
// copy while a read is under way or the API server fails (a failed read is
// retried at most once every minRefetch). Only a request with nothing to
// go on (no copy yet, or a signature that needs the newest keys) waits for
// the read in progress.
type policyStore struct {
	reader  client.Reader
	key     types.NamespacedName
	ttl     time.Duration
	timeout time.Duration
	log     logr.Logger
	now     func() time.Time

	mu  sync.Mutex
	cur *policySet
	// fetched is when the API server last confirmed cur.
	fetched time.Time
	// failed is when the last read failed (zero after a success), and
	// lastErr its error.
	failed  time.Time
	lastErr error
	// flight is the read under way, nil when none is.
	flight *policyRead
}

// policyRead is one read of the policies Secret.
type policyRead struct {
	done chan struct{}
	// set and err are the outcome, valid once done is closed: set is the
	// copy to use (the previous one when the read failed), err the
	// read's error.
	set *policySet
	err error
}

// minRefetch is how often a failed signature, or a failed read, may cause
// another read.
const minRefetch = time.Second

// get returns the policies for a request: the copy when it is younger
// than ttl, else the last copy while a new one is read in the background.
// Only without any copy does it wait for the read.
func (s *policyStore) get(ctx context.Context) (*policySet, error) {
	return s.read(ctx, s.ttl, false)
}

// reread returns policies at most minRefetch old, waiting for a read if
// needed: a token that did not verify may be signed with a key that was
// just added. When the read fails, the last copy is returned.
func (s *policyStore) reread(ctx context.Context) (*policySet, error) {
	return s.read(ctx, minRefetch, true)
}

func (s *policyStore) read(ctx context.Context, maxAge time.Duration, wait bool) (*policySet, error) {
	s.mu.Lock()
	now := s.now()
	cur := s.cur
	f := s.flight
	// A caller that waits wants the newest copy: a read under way may
	// bring a key the current copy lacks.
	if cur != nil && now.Sub(s.fetched) < maxAge && (!wait || f == nil) {
		s.mu.Unlock()
		return cur, nil
	}
	if f == nil {
		if !s.failed.IsZero() && now.Sub(s.failed) < minRefetch {
			err := s.lastErr
			s.mu.Unlock()
			if cur != nil {
				return cur, nil
			}
			return nil, err
		}
		f = s.startRead()
	}
	s.mu.Unlock()
	if cur != nil && !wait {
		return cur, nil
	}
	select {
	case <-f.done:
	case <-ctx.Done():
		if cur != nil {
			return cur, nil
		}
		return nil, fmt.Errorf("waiting for the shared access policies: %w", ctx.Err())
	}
	if f.set != nil {
		return f.set, nil
	}
	return nil, f.err
}

// startRead starts a read of the Secret; s.mu is held.
func (s *policyStore) startRead() *policyRead {
	f := &policyRead{done: make(chan struct{})}
	s.flight = f
	prev := s.cur
	go func() {
		// Not the request's context: other requests may wait for this read.
		ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
		defer cancel()
		next, err := s.fetch(ctx, prev)
		s.mu.Lock()
		s.flight = nil
		if err != nil {
			policyReads.WithLabelValues("error").Inc()
			s.failed, s.lastErr = s.now(), err
			f.set, f.err = s.cur, err
			if s.cur != nil {
				s.log.Error(err, "reading the shared access policies failed; using the last copy", "secret", s.key.String())
			} else {
				s.log.Error(err, "reading the shared access policies failed; requests are refused until a read succeeds", "secret", s.key.String())
			}
		} else {
			policyReads.WithLabelValues("ok").Inc()
			if next != s.cur {
				s.report(next)
			}
			s.cur, s.fetched, s.failed, s.lastErr = next, s.now(), time.Time{}, nil
			f.set = next
		}
		s.mu.Unlock()
		close(f.done)
	}()
	return f
}

// fetch reads the Secret: prev when its resourceVersion did not change, a
// new set when it did, an empty set when the Secret does not exist.
func (s *policyStore) fetch(ctx context.Context, prev *policySet) (*policySet, error) {
	sec := &corev1.Secret{}
	err := s.reader.Get(ctx, s.key, sec)
	switch {
	case apierrors.IsNotFound(err):
		return &policySet{policies: map[string]*policy{}}, nil
	case err != nil:
		return nil, fmt.Errorf("reading shared access policies Secret %s: %w", s.key, err)
	case prev != nil && prev.version == sec.ResourceVersion:
		return prev, nil
	}
	return &policySet{policies: parsePolicies(sec.Data), version: sec.ResourceVersion}, nil
}

// report logs what is wrong with a new version of the policies.
func (s *policyStore) report(next *policySet) {
	if next.version == "" {
		if s.cur == nil || s.cur.version != "" {
			s.log.Error(nil, "the shared access policies Secret does not exist; every request is refused", "secret", s.key.String())
		}
		return
	}
	for _, name := range slices.Sorted(maps.Keys(next.policies)) {
		if p := next.policies[name]; p.err != nil {
			s.log.Error(p.err, "shared access policy is invalid; it refuses every request", "policy", name, "secret", s.key.String())
		}
	}
	s.log.V(1).Info("shared access policies loaded", "secret", s.key.String(), "resourceVersion", next.version, "policies", len(next.policies))
}
