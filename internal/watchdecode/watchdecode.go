// Package watchdecode decodes the watch streams of DeviceTwins and
// DeviceIDClaims, which fill the operator's cache, in one pass per event.
//
// client-go decodes a JSON watch event by scanning its bytes about nine
// times: the framer finds the event's end, the event is scanned for its
// kind, then decoded (the object copied out of it), and the object is
// scanned for its kind and decoded again, each decode after a validating
// scan. At a restart the cache's first listing of every twin and claim
// arrives as such events, each watch decoded by one goroutine, so that
// decode bounds how fast the cache fills (about half of a keyed restart's
// CPU at 5,000 twins).
//
// Here the framer, the event and the object each read the bytes once,
// with github.com/go-json-experiment/json (the proposed encoding/json/v2:
// names matched case-sensitively as by Kubernetes' own decoder, legacy
// UnmarshalJSON methods honoured). What it does not decode exactly as
// expected (an error, another kind, a duplicate name, invalid UTF-8) is
// decoded by client-go's decoder instead, so anything unusual comes out as
// client-go makes it. Everything else (the request, its errors, the
// watch's life) is client-go's: only the decoders a REST client negotiates
// are replaced.
package watchdecode

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"reflect"
	"sync"
	"time"

	jsonv2 "github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
	"github.com/prometheus/client_golang/prometheus"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// Decoders are the values of the operator's --watch-decoder flag.
const (
	// OnePass decodes the watches of twins and claims with this package.
	OnePass = "one-pass"
	// ClientGo leaves them to client-go's decoder.
	ClientGo = "client-go"
)

// decoded counts the objects these watches decoded, by kind and by decoder:
// one-pass, or client-go for what the one pass left to it.
var decoded = prometheus.NewCounterVec(prometheus.CounterOpts{
	Name: "kubetwin_watch_decoded_objects_total",
	Help: "Objects of the DeviceTwin and DeviceIDClaim watches (--watch-decoder=one-pass) decoded, by kind and by decoder: one-pass, or client-go for what the one pass left to it.",
}, []string{"kind", "decoder"})

func init() { metrics.Registry.MustRegister(decoded) }

// NewScheme is a scheme with the types these watches carry: the
// kubetwin.io types and metav1's (Status, WatchEvent, list options).
func NewScheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(s); err != nil {
		return nil, err
	}
	metav1.AddToGroupVersion(s, schema.GroupVersion{Version: "v1"})
	return s, nil
}

// options decode metav1.Time as its UnmarshalJSON does (an RFC 3339
// string, in the local zone), without that method's second decode of the
// string.
var options = jsonv2.WithUnmarshalers(jsonv2.UnmarshalFromFunc(func(d *jsontext.Decoder, t *metav1.Time) error {
	if d.PeekKind() == 'n' {
		if _, err := d.ReadToken(); err != nil {
			return err
		}
		*t = metav1.Time{}
		return nil
	}
	if d.PeekKind() != '"' {
		// Not a string: the library falls back to metav1.Time's own
		// UnmarshalJSON, which fails as it does in client-go's decode
		// (and that failure sends the object to client-go's decoder).
		return errors.ErrUnsupported
	}
	tok, err := d.ReadToken()
	if err != nil {
		return err
	}
	pt, err := time.Parse(time.RFC3339, tok.String())
	if err != nil {
		return err
	}
	t.Time = pt.Local()
	return nil
}))

// Decode decodes data into obj (a zero kubetwin.io object) in one pass.
// It fails where client-go's decoder might decode otherwise: data that is
// not an object of gvk, or not strict JSON (duplicate names, invalid
// UTF-8); obj is then partly written.
func Decode(data []byte, gvk schema.GroupVersionKind, obj runtime.Object) error {
	if err := jsonv2.Unmarshal(data, obj, options); err != nil {
		return err
	}
	if got := obj.GetObjectKind().GroupVersionKind(); got != gvk {
		return fmt.Errorf("watchdecode: %s is not a %s", got, gvk)
	}
	return nil
}

// NegotiatedSerializer is the codecs controller-runtime's cache gives a
// typed REST client (no conversion, the decoded object's kind cleared),
// with the JSON decoders of objects and watch events, and the JSON framer,
// replaced by one-pass ones for objects of gvk (a kind of s).
func NegotiatedSerializer(s *runtime.Scheme, gvk schema.GroupVersionKind) (runtime.NegotiatedSerializer, error) {
	proto, err := s.New(gvk)
	if err != nil {
		return nil, err
	}
	return negotiated{serializer.WithoutConversionCodecFactory{CodecFactory: serializer.NewCodecFactory(s)}, s, gvk, reflect.TypeOf(proto),
		decoded.WithLabelValues(gvk.Kind, OnePass), decoded.WithLabelValues(gvk.Kind, ClientGo)}, nil
}

type negotiated struct {
	serializer.WithoutConversionCodecFactory
	scheme            *runtime.Scheme
	gvk               schema.GroupVersionKind
	typ               reflect.Type
	onePass, clientGo prometheus.Counter
}

func (n negotiated) SupportedMediaTypes() []runtime.SerializerInfo {
	infos := n.WithoutConversionCodecFactory.SupportedMediaTypes()
	out := make([]runtime.SerializerInfo, 0, len(infos))
	for _, info := range infos {
		if info.MediaType == runtime.ContentTypeJSON && info.StreamSerializer != nil {
			info.Serializer = objectSerializer{info.Serializer, n}
			info.StreamSerializer = &runtime.StreamSerializerInfo{
				EncodesAsText: info.StreamSerializer.EncodesAsText,
				Serializer:    eventSerializer{info.StreamSerializer.Serializer},
				Framer:        framer{},
			}
		}
		out = append(out, info)
	}
	return out
}

// objectSerializer decodes an object of its kind in one pass and anything
// else (a Status, a list) with client-go's serializer.
type objectSerializer struct {
	runtime.Serializer
	n negotiated
}

func (s objectSerializer) Decode(data []byte, defaults *schema.GroupVersionKind, into runtime.Object) (runtime.Object, *schema.GroupVersionKind, error) {
	obj := into
	if obj == nil {
		obj, _ = s.n.scheme.New(s.n.gvk)
	}
	if obj != nil && reflect.TypeOf(obj) == s.n.typ {
		if Decode(data, s.n.gvk, obj) == nil {
			s.n.onePass.Inc()
			gvk := s.n.gvk
			return obj, &gvk, nil
		}
		if into != nil {
			reflect.ValueOf(into).Elem().SetZero()
		}
		s.n.clientGo.Inc()
	}
	return s.Serializer.Decode(data, defaults, into)
}

// eventSerializer decodes a watch event's frame into a metav1.WatchEvent
// whose object is the frame's bytes (client-go's streaming decoder keeps
// the frame until the object is decoded); client-go's serializer decodes
// what it cannot.
type eventSerializer struct{ runtime.Serializer }

func (s eventSerializer) Decode(data []byte, defaults *schema.GroupVersionKind, into runtime.Object) (runtime.Object, *schema.GroupVersionKind, error) {
	if e, ok := into.(*metav1.WatchEvent); ok {
		if typ, obj, err := splitEvent(data); err == nil {
			e.Type, e.Object = typ, runtime.RawExtension{Raw: obj}
			gvk := metav1.SchemeGroupVersion.WithKind("WatchEvent")
			return e, &gvk, nil
		}
		*e = metav1.WatchEvent{}
	}
	return s.Serializer.Decode(data, defaults, into)
}

var eventDecoders = sync.Pool{New: func() any { return jsontext.NewDecoder(bytes.NewBuffer(nil)) }}

var errEvent = errors.New("watchdecode: not a watch event")

// splitEvent returns the type of the watch event data and its object, a
// slice of data, having read data once.
func splitEvent(data []byte) (typ string, object []byte, err error) {
	d := eventDecoders.Get().(*jsontext.Decoder)
	defer func() {
		d.Reset(bytes.NewBuffer(nil)) // not holding on to data
		eventDecoders.Put(d)
	}()
	// On a bytes.Buffer the decoder reads data in place; offsets into it
	// delimit the object.
	d.Reset(bytes.NewBuffer(data))
	if tok, err := d.ReadToken(); err != nil || tok.Kind() != '{' {
		return "", nil, errEvent
	}
	for d.PeekKind() == '"' {
		name, err := d.ReadToken()
		if err != nil {
			return "", nil, err
		}
		switch name.String() {
		case "type":
			tok, err := d.ReadToken()
			if err != nil || tok.Kind() != '"' {
				return "", nil, errEvent
			}
			typ = tok.String()
		case "object":
			start := d.InputOffset()
			if err := d.SkipValue(); err != nil {
				return "", nil, err
			}
			object = bytes.TrimLeft(data[start:d.InputOffset()], " \t\r\n:")
		default:
			if err := d.SkipValue(); err != nil {
				return "", nil, err
			}
		}
	}
	if tok, err := d.ReadToken(); err != nil || tok.Kind() != '}' {
		return "", nil, errEvent
	}
	if _, err := d.ReadToken(); err != io.EOF {
		return "", nil, errEvent
	}
	// client-go's decoder reads a null object as none.
	if typ == "" || len(object) == 0 || string(object) == "null" {
		return "", nil, errEvent
	}
	return typ, object, nil
}

// framer splits a JSON stream into its top-level values, as client-go's
// JSON framer does, reading each once.
type framer struct{}

func (framer) NewFrameReader(r io.ReadCloser) io.ReadCloser {
	f := &frameReader{r: r}
	// As lenient as encoding/json's Decoder: the frame's decoders check
	// what they need.
	f.d = jsontext.NewDecoder(&f.in, jsontext.AllowDuplicateNames(true), jsontext.AllowInvalidUTF8(true))
	f.in.r = r
	return f
}

func (framer) NewFrameWriter(w io.Writer) io.Writer { return w }

type frameReader struct {
	r         io.ReadCloser
	in        errorReader
	d         *jsontext.Decoder
	remaining []byte
}

// errorReader keeps the error its reader last returned, other than
// io.EOF.
type errorReader struct {
	r   io.Reader
	err error
}

func (e *errorReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil && err != io.EOF {
		e.err = err
	}
	return n, err
}

// Read copies the next value into p; a value longer than p comes in
// several reads, each but the last returning io.ErrShortBuffer (the
// contract of client-go's streaming decoder).
func (f *frameReader) Read(p []byte) (int, error) {
	if len(f.remaining) > 0 {
		n := copy(p, f.remaining)
		f.remaining = f.remaining[n:]
		if len(f.remaining) > 0 {
			return n, io.ErrShortBuffer
		}
		return n, nil
	}
	v, err := f.d.ReadValue()
	if err != nil {
		// The errors encoding/json's Decoder returns, by which client-go's
		// watch tells a connection that closed or broke (the watch is
		// resumed) from a stream it cannot decode (an error event): the
		// connection's own error, io.ErrUnexpectedEOF for a stream cut
		// within a value, io.EOF between values.
		switch {
		case f.in.err != nil:
			return 0, f.in.err
		case errors.Is(err, io.ErrUnexpectedEOF):
			return 0, io.ErrUnexpectedEOF
		}
		return 0, err
	}
	n := copy(p, v)
	if n < len(v) {
		// v is the decoder's buffer until the next read: keep a copy.
		f.remaining = append(f.remaining[:0:0], v[n:]...)
		return n, io.ErrShortBuffer
	}
	return n, nil
}

func (f *frameReader) Close() error { return f.r.Close() }

// Watched is a kind whose informers NewInformer builds on a one-pass
// watch: its typed informers, in Namespace (all if empty), with no label
// or field selector.
type Watched struct {
	Object    client.Object
	Resource  string
	Namespace string
}

// NewInformer returns a cache.Options.NewInformer that builds the typed
// informers of the watched kubetwin.io kinds on ListerWatchers whose watch
// decodes with this package, through cfg. Their listing, and every other
// informer, are controller-runtime's. The cache must give those kinds the
// namespace said and no selector: the watch applies none of the cache's.
func NewInformer(cfg *rest.Config, watched ...Watched) (func(toolscache.ListerWatcher, runtime.Object, time.Duration, toolscache.Indexers) toolscache.SharedIndexInformer, error) {
	s, err := NewScheme()
	if err != nil {
		return nil, err
	}
	type target struct {
		client    rest.Interface
		resource  string
		namespace string
	}
	targets := map[reflect.Type]target{}
	for _, w := range watched {
		gvks, _, err := s.ObjectKinds(w.Object)
		if err != nil {
			return nil, err
		}
		ns, err := NegotiatedSerializer(s, gvks[0])
		if err != nil {
			return nil, err
		}
		c := rest.CopyConfig(cfg)
		c.GroupVersion = &v1alpha1.GroupVersion
		c.APIPath = "/apis"
		c.ContentType = runtime.ContentTypeJSON
		c.AcceptContentTypes = runtime.ContentTypeJSON
		c.NegotiatedSerializer = ns
		if c.UserAgent == "" {
			c.UserAgent = rest.DefaultKubernetesUserAgent()
		}
		rc, err := rest.RESTClientFor(c)
		if err != nil {
			return nil, fmt.Errorf("watchdecode: REST client for %s: %w", w.Resource, err)
		}
		targets[reflect.TypeOf(w.Object)] = target{rc, w.Resource, w.Namespace}
	}
	params := runtime.NewParameterCodec(s)
	return func(lw toolscache.ListerWatcher, obj runtime.Object, resync time.Duration, idx toolscache.Indexers) toolscache.SharedIndexInformer {
		if t, ok := targets[reflect.TypeOf(obj)]; ok {
			lw = &listWatch{list: lw, client: t.client, params: params, resource: t.resource, namespace: t.namespace}
		}
		return toolscache.NewSharedIndexInformer(lw, obj, resync, idx)
	}, nil
}

// listWatch lists through controller-runtime's ListerWatcher and watches
// through a REST client that decodes with this package.
type listWatch struct {
	list                toolscache.ListerWatcher
	client              rest.Interface
	params              runtime.ParameterCodec
	resource, namespace string
}

var _ toolscache.ListerWatcherWithContext = &listWatch{}

func (l *listWatch) List(opts metav1.ListOptions) (runtime.Object, error) {
	return l.ListWithContext(context.Background(), opts)
}

func (l *listWatch) Watch(opts metav1.ListOptions) (watch.Interface, error) {
	return l.WatchWithContext(context.Background(), opts)
}

func (l *listWatch) ListWithContext(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
	return toolscache.ToListerWatcherWithContext(l.list).ListWithContext(ctx, opts)
}

func (l *listWatch) WatchWithContext(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	opts.AllowWatchBookmarks = true
	return l.client.Get().Namespace(l.namespace).Resource(l.resource).VersionedParams(&opts, l.params).Watch(ctx)
}
