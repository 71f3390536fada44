package device

import (
	"context"
	"sync"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
)

// resumeStore is paho's MemoryStore adjusted for publishing right after a
// (re)connect with a persistent session. On every connection paho fires
// OnConnect and then, concurrently, resume() resends whatever the store
// holds, setting the Dup flag on the stored packets. A message published in
// between is both sent directly and resent by resume, and resume's write to
// its Dup flag races with the write of the packet to the network
// (eclipse-paho/paho.mqtt.golang#703). So:
//
//   - Put stores a copy of a PUBLISH and Get returns a copy of it, so
//     resume never reads or modifies a packet that is being written (the
//     writer sets its RemainingLength as it encodes it); and
//   - All, which paho calls exactly once per connection (from resume, as
//     ConnectRetry is off), is counted, so the worker can wait for resume's
//     snapshot before it subscribes and publishes, avoiding the duplicates.
type resumeStore struct {
	*mqtt.MemoryStore

	mu        sync.Mutex
	snapshots int
	changed   chan struct{} // closed and replaced by every All
}

func newResumeStore() *resumeStore {
	return &resumeStore{MemoryStore: mqtt.NewMemoryStore(), changed: make(chan struct{})}
}

// Put stores a copy of a PUBLISH packet, and other packets as given.
func (s *resumeStore) Put(key string, p packets.ControlPacket) {
	if pub, ok := p.(*packets.PublishPacket); ok {
		cp := *pub
		p = &cp
	}
	s.MemoryStore.Put(key, p)
}

// Get returns a copy of a stored PUBLISH packet, and other packets as stored.
func (s *resumeStore) Get(key string) packets.ControlPacket {
	p := s.MemoryStore.Get(key)
	if pub, ok := p.(*packets.PublishPacket); ok {
		cp := *pub
		return &cp
	}
	return p
}

// All returns the stored keys and counts the snapshot.
func (s *resumeStore) All() []string {
	keys := s.MemoryStore.All()
	s.mu.Lock()
	s.snapshots++
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
	return keys
}

// waitSnapshots waits until paho has taken at least n resume snapshots, or
// ctx ends; it reports whether it got there.
func (s *resumeStore) waitSnapshots(ctx context.Context, n int) bool {
	for {
		s.mu.Lock()
		got, ch := s.snapshots, s.changed
		s.mu.Unlock()
		if got >= n {
			return true
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return false
		}
	}
}
