package abuse

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

	"github.com/kubetwin/kubetwin/internal/testutil/mqttwire"
)

// MQTT 3.1.1 packet types (the high nibble of the first byte).
const (
	pktConnect    = 0x10
	pktConnack    = 0x20
	pktPublish    = 0x30
	pktPuback     = 0x40
	pktSubscribe  = 0x82 // with its required flags
	pktSuback     = 0x90
	pktDisconnect = 0xE0
)

// rawConn is a hand-driven MQTT 3.1.1 connection: the attacks need packets
// and behaviour (huge announced lengths, never reading) no client library
// produces.
type rawConn struct {
	net.Conn
	r *bufio.Reader
}

// dialOptions shape a raw connection.
type dialOptions struct {
	tls *tls.Config // nil: plain TCP
	// source is the local IP to connect from (127.0.0.0/8 is all
	// loopback, so attackers can have addresses of their own); nil: any.
	source net.IP
	// rcvBuf, when positive, shrinks the socket's receive buffer before
	// connecting, so that a client that never reads stops the sender soon.
	rcvBuf int
	// noHandshake skips the TLS handshake (the connection stays raw TCP).
	noHandshake bool
}

func dialRaw(addr string, o dialOptions) (*rawConn, error) {
	d := net.Dialer{Timeout: 10 * time.Second}
	if o.source != nil {
		d.LocalAddr = &net.TCPAddr{IP: o.source}
	}
	if o.rcvBuf > 0 {
		d.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, o.rcvBuf)
			})
			return errors.Join(err, serr)
		}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	if o.tls != nil && !o.noHandshake {
		tc := tls.Client(c, o.tls)
		_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
		if err := tc.Handshake(); err != nil {
			_ = c.Close()
			return nil, fmt.Errorf("TLS handshake with %s: %w", addr, err)
		}
		_ = tc.SetDeadline(time.Time{})
		c = tc
	}
	return &rawConn{Conn: c, r: bufio.NewReaderSize(c, 64<<10)}, nil
}

// connectPacket is a CONNECT; user and password are sent when not empty.
func connectPacket(clientID, user, password string, clean bool, keepalive uint16) []byte {
	flags := byte(0)
	if clean {
		flags |= 0x02
	}
	if user != "" {
		flags |= 0x80
	}
	if password != "" {
		flags |= 0x40
	}
	body := mqttwire.AppendString(nil, "MQTT")
	body = append(body, 4, flags)
	body = binary.BigEndian.AppendUint16(body, keepalive)
	body = mqttwire.AppendString(body, clientID)
	if user != "" {
		body = mqttwire.AppendString(body, user)
	}
	if password != "" {
		body = mqttwire.AppendString(body, password)
	}
	return mqttwire.Packet(pktConnect, body)
}

func publishPacket(topic string, payload []byte, qos byte, retain bool, id uint16) []byte {
	first := byte(pktPublish) | qos<<1
	if retain {
		first |= 1
	}
	body := mqttwire.AppendString(nil, topic)
	if qos > 0 {
		body = binary.BigEndian.AppendUint16(body, id)
	}
	return mqttwire.Packet(first, append(body, payload...))
}

func subscribePacket(id uint16, filter string, qos byte) []byte {
	body := binary.BigEndian.AppendUint16(nil, id)
	body = mqttwire.AppendString(body, filter)
	return mqttwire.Packet(pktSubscribe, append(body, qos))
}

// send writes b, giving up after d.
func (c *rawConn) send(b []byte, d time.Duration) error {
	_ = c.SetWriteDeadline(time.Now().Add(d))
	_, err := c.Write(b)
	return err
}

// inPacket is a packet read from the broker.
type inPacket struct {
	first byte
	body  []byte
}

func (p inPacket) typ() byte { return p.first & 0xF0 }

// publish decodes a PUBLISH: topic, packet id (0 for QoS 0), payload and
// retain flag.
func (p inPacket) publish() (topic string, id uint16, payload []byte, retained bool, err error) {
	b := p.body
	if len(b) < 2 {
		return "", 0, nil, false, errors.New("short PUBLISH")
	}
	n := int(binary.BigEndian.Uint16(b))
	if len(b) < 2+n {
		return "", 0, nil, false, errors.New("short PUBLISH topic")
	}
	topic, b = string(b[2:2+n]), b[2+n:]
	if (p.first>>1)&3 > 0 {
		if len(b) < 2 {
			return "", 0, nil, false, errors.New("PUBLISH without packet id")
		}
		id, b = binary.BigEndian.Uint16(b), b[2:]
	}
	return topic, id, b, p.first&1 == 1, nil
}

// read reads one packet, waiting until deadline.
func (c *rawConn) read(deadline time.Time) (inPacket, error) {
	_ = c.SetReadDeadline(deadline)
	first, err := c.r.ReadByte()
	if err != nil {
		return inPacket{}, err
	}
	n, mul := 0, 1
	for i := 0; ; i++ {
		d, err := c.r.ReadByte()
		if err != nil {
			return inPacket{}, err
		}
		n += int(d&0x7F) * mul
		if d&0x80 == 0 {
			break
		}
		if mul *= 128; i == 3 {
			return inPacket{}, errors.New("malformed remaining length")
		}
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(c.r, body); err != nil {
		return inPacket{}, err
	}
	return inPacket{first: first, body: body}, nil
}

// connect sends CONNECT and reads CONNACK: whether the broker had a
// session, and its return code (0 accepted, 5 not authorized).
func (c *rawConn) connect(clientID, user, password string, clean bool) (sessionPresent bool, code byte, err error) {
	if err := c.send(connectPacket(clientID, user, password, clean, 60), 10*time.Second); err != nil {
		return false, 0, err
	}
	p, err := c.read(time.Now().Add(15 * time.Second))
	if err != nil {
		return false, 0, fmt.Errorf("waiting for CONNACK: %w", err)
	}
	if p.typ() != pktConnack || len(p.body) != 2 {
		return false, 0, fmt.Errorf("got packet 0x%02x instead of CONNACK", p.first)
	}
	return p.body[0]&1 == 1, p.body[1], nil
}

// subscribe subscribes and waits for the SUBACK (acknowledging QoS 1
// messages that arrive first), returning the granted QoS (0x80: refused).
func (c *rawConn) subscribe(id uint16, filter string, qos byte) (byte, error) {
	if err := c.send(subscribePacket(id, filter, qos), 10*time.Second); err != nil {
		return 0, err
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		p, err := c.read(deadline)
		if err != nil {
			return 0, fmt.Errorf("waiting for SUBACK: %w", err)
		}
		switch p.typ() {
		case pktSuback:
			if len(p.body) < 3 {
				return 0, errors.New("short SUBACK")
			}
			return p.body[2], nil
		case pktPublish:
			c.ackPublish(p)
		}
	}
}

// ackPublish sends the PUBACK a QoS 1 PUBLISH needs.
func (c *rawConn) ackPublish(p inPacket) {
	if (p.first>>1)&3 != 1 {
		return
	}
	if _, id, _, _, err := p.publish(); err == nil {
		_ = c.send(mqttwire.Packet(pktPuback, binary.BigEndian.AppendUint16(nil, id)), 5*time.Second)
	}
}

// closedWithin reports whether the broker closes the connection within d,
// reading (and discarding) whatever it sends meanwhile.
func (c *rawConn) closedWithin(d time.Duration) bool {
	deadline := time.Now().Add(d)
	buf := make([]byte, 32<<10)
	for {
		_ = c.SetReadDeadline(deadline)
		_, err := c.r.Read(buf)
		if err == nil {
			continue
		}
		var ne net.Error
		return !(errors.As(err, &ne) && ne.Timeout())
	}
}
