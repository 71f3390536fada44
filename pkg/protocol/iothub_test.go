package protocol

import (
	"errors"
	"net/url"
	"strings"
	"testing"
)

func TestParseIoTHubRequest(t *testing.T) {
	const uuid = "0b8a3f2c-6b1e-4d6a-9f1e-2c3d4e5f6a7b"
	for _, tc := range []struct {
		topic   string
		want    IoTHubRequest
		wantErr bool
	}{
		// What the Node SDK sends.
		{"$iothub/twin/GET/?$rid=" + uuid, IoTHubRequest{KindGet, uuid}, false},
		{"$iothub/twin/PATCH/properties/reported/?$rid=" + uuid, IoTHubRequest{KindReported, uuid}, false},
		// Other parameters, any order, percent-encoding.
		{"$iothub/twin/PATCH/properties/reported/?$version=3&$rid=r1", IoTHubRequest{KindReported, "r1"}, false},
		{"$iothub/twin/GET/?%24rid=r%2D1&x=y", IoTHubRequest{KindGet, "r-1"}, false},
		{"$iothub/twin/GET/?$rid=a%20b%26c", IoTHubRequest{KindGet, "a b&c"}, false},
		{"$iothub/twin/GET/?$rid=" + strings.Repeat("r", MaxRequestIDLength), IoTHubRequest{KindGet, strings.Repeat("r", MaxRequestIDLength)}, false},
		// A request, but no valid $rid: the kind and the rid as sent.
		{"$iothub/twin/GET/", IoTHubRequest{Kind: KindGet}, true},
		{"$iothub/twin/GET/?", IoTHubRequest{Kind: KindGet}, true},
		{"$iothub/twin/GET/?rid=1", IoTHubRequest{Kind: KindGet}, true},
		{"$iothub/twin/GET/?$rid=", IoTHubRequest{Kind: KindGet}, true},
		{"$iothub/twin/GET/?$rid=1&$rid=2", IoTHubRequest{Kind: KindGet}, true},
		{"$iothub/twin/GET/?$rid=%zz", IoTHubRequest{Kind: KindGet}, true},
		{"$iothub/twin/GET/?$rid=a;b", IoTHubRequest{Kind: KindGet}, true},
		{"$iothub/twin/GET/?$rid=a%2Fb", IoTHubRequest{KindGet, "a/b"}, true},
		{"$iothub/twin/GET/?$rid=a/b", IoTHubRequest{KindGet, "a/b"}, true},
		{"$iothub/twin/GET/?$rid=a%2Bb", IoTHubRequest{KindGet, "a+b"}, true},
		{"$iothub/twin/GET/?$rid=a%23b", IoTHubRequest{KindGet, "a#b"}, true},
		{"$iothub/twin/GET/?$rid=a%00b", IoTHubRequest{KindGet, "a\x00b"}, true},
		{"$iothub/twin/GET/?$rid=%FF", IoTHubRequest{KindGet, "\xff"}, true},
		{"$iothub/twin/PATCH/properties/reported/?$rid=" + strings.Repeat("r", MaxRequestIDLength+1),
			IoTHubRequest{KindReported, strings.Repeat("r", MaxRequestIDLength+1)}, true},
		// Not a twin request.
		{"$iothub/twin/GET", IoTHubRequest{}, true},
		{"$iothub/twin/GET?$rid=1", IoTHubRequest{}, true},
		{"$iothub/twin/get/?$rid=1", IoTHubRequest{}, true},
		{"$iothub/twin/GET/x/?$rid=1", IoTHubRequest{}, true},
		{"$iothub/twin/PATCH/properties/desired/?$rid=1", IoTHubRequest{}, true},
		{"$iothub/twin/PATCH/properties/reported?$rid=1", IoTHubRequest{}, true},
		{"$iothub/twin/res/200/?$rid=1", IoTHubRequest{}, true},
		{"$iothub/methods/res/200/?$rid=1", IoTHubRequest{}, true},
		{"devices/d1/messages/events/", IoTHubRequest{}, true},
		{"x$iothub/twin/GET/?$rid=1", IoTHubRequest{}, true},
		{"", IoTHubRequest{}, true},
		{"?$rid=1", IoTHubRequest{}, true},
	} {
		got, err := ParseIoTHubRequest(tc.topic)
		if got != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("ParseIoTHubRequest(%q) = %+v, %v; want %+v, error %v", tc.topic, got, err, tc.want, tc.wantErr)
		}
		if notRequest := errors.Is(err, ErrNotIoTHubRequest); notRequest != (tc.want.Kind == "") {
			t.Errorf("ParseIoTHubRequest(%q): errors.Is(err, ErrNotIoTHubRequest) = %v", tc.topic, notRequest)
		}
	}
}

func TestIsIoTHubTopic(t *testing.T) {
	for topic, want := range map[string]bool{
		"$iothub":                   true,
		"$iothub/twin/GET/?$rid=1":  true,
		"$iothub/#":                 true,
		"$iothubx/twin":             false,
		"$IOTHUB/twin":              false,
		"iothub/twin":               false,
		"kubetwin/v1/d/get/1":       false,
		"devices/d/messages/events": false,
	} {
		if got := IsIoTHubTopic(topic); got != want {
			t.Errorf("IsIoTHubTopic(%q) = %v, want %v", topic, got, want)
		}
	}
}

func TestIoTHubTopics(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{IoTHubResponseTopic(200, "0b8a3f2c-6b1e-4d6a-9f1e-2c3d4e5f6a7b"), "$iothub/twin/res/200/?$rid=0b8a3f2c-6b1e-4d6a-9f1e-2c3d4e5f6a7b"},
		{IoTHubResponseTopic(400, ""), "$iothub/twin/res/400/?$rid="},
		// Everything that would break the query or the MQTT topic is escaped.
		{IoTHubResponseTopic(400, "a b+c#d/e&f=g%h$i~j"), "$iothub/twin/res/400/?$rid=a%20b%2Bc%23d%2Fe%26f%3Dg%25h%24i~j"},
		{IoTHubResponseTopic(400, "\xff\x00"), "$iothub/twin/res/400/?$rid=%FF%00"},
		{IoTHubDesiredPatchTopic(7), "$iothub/twin/PATCH/properties/desired/?$version=7"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
	// The escaped request id reads back as sent, for any query parser.
	for _, rid := range []string{"r1", "a b", "a+b", "x&$rid=y", "%41", "ü"} {
		topic := IoTHubResponseTopic(200, rid)
		if strings.ContainsAny(topic, "+#") {
			t.Errorf("IoTHubResponseTopic(200, %q) = %q holds an MQTT wildcard", rid, topic)
		}
		_, query, _ := strings.Cut(topic, "?")
		v, err := url.ParseQuery(query)
		if err != nil || len(v["$rid"]) != 1 || v["$rid"][0] != rid {
			t.Errorf("IoTHubResponseTopic(200, %q) = %q: $rid reads back as %q (%v)", rid, topic, v["$rid"], err)
		}
	}
}

func TestIoTHubErrorCode(t *testing.T) {
	for status, want := range map[int]int{400: 400004, 404: 404001, 429: 429001, 500: 500001, 401: 401001, 503: 503001, 412: 412001} {
		if got := IoTHubErrorCode(status); got != want {
			t.Errorf("IoTHubErrorCode(%d) = %d, want %d", status, got, want)
		}
	}
}

func TestIoTHubResponse(t *testing.T) {
	for _, tc := range []struct {
		name, response  string
		topic, payload  string
		desiredVersion  int64
		wantErr         bool
		payloadContains string
	}{{
		name: "get",
		// As the bridge encodes a Response (json.Marshal sorts the keys).
		response: `{"status":200,"desired":{"$version":3,"big":12345678901234567890,"f":0.1,"fan":{"speed":null}},"reported":{"$version":9,"t":21.5}}`,
		topic:    "$iothub/twin/res/200/?$rid=r1",
		payload:  `{"desired":{"big":12345678901234567890,"f":0.1,"fan":{"speed":null},"$version":3},"reported":{"t":21.5,"$version":9}}`,
		// Numbers exactly as sent, nulls kept.
		desiredVersion: 3,
	}, {
		name:     "get compacted",
		response: "{\"status\": 200, \"desired\": { \"$version\" : 4 , \"a\": [1, 2] }, \"reported\": {\"$version\": 0}}",
		topic:    "$iothub/twin/res/200/?$rid=r1",
		payload:  `{"desired":{"a":[1,2],"$version":4},"reported":{"$version":0}}`, desiredVersion: 4,
	}, {
		name:     "get without documents",
		response: `{"status":200}`,
		topic:    "$iothub/twin/res/200/?$rid=r1",
		payload:  `{"desired":{},"reported":{}}`,
	}, {
		name:     "reported",
		response: `{"status":204,"version":42}`,
		topic:    "$iothub/twin/res/204/?$rid=r1&$version=42",
	}, {
		name:     "reported version 0",
		response: `{"status":204}`,
		topic:    "$iothub/twin/res/204/?$rid=r1&$version=0",
	}, {
		name:     "bad request",
		response: `{"status":400,"error":"reported: key \"a$b\" must not contain '$' <&>"}`,
		topic:    "$iothub/twin/res/400/?$rid=r1",
		payload:  `{"errorCode":400004,"message":"reported: key \"a$b\" must not contain '$' <&>"}`,
	}, {
		name:     "not found",
		response: `{"status":404,"error":"no DeviceTwin for device id \"d\""}`,
		topic:    "$iothub/twin/res/404/?$rid=r1",
		payload:  `{"errorCode":404001,"message":"no DeviceTwin for device id \"d\""}`,
	}, {
		name:     "throttled",
		response: `{"status":429,"error":"retry later"}`,
		topic:    "$iothub/twin/res/429/?$rid=r1",
		payload:  `{"errorCode":429001,"message":"retry later"}`,
	}, {
		name:     "server error without message",
		response: `{"status":500}`,
		topic:    "$iothub/twin/res/500/?$rid=r1",
		payload:  `{"errorCode":500001,"message":"request failed with status 500"}`,
	}, {
		name:     "other status",
		response: `{"status":503,"error":"x"}`,
		topic:    "$iothub/twin/res/503/?$rid=r1",
		payload:  `{"errorCode":503001,"message":"x"}`,
	}, {
		name:     "unexpected success status",
		response: `{"status":201}`,
		topic:    "$iothub/twin/res/201/?$rid=r1",
		payload:  `{"errorCode":201001,"message":"request failed with status 201"}`,
	},
		{name: "not JSON", response: `not json`, wantErr: true},
		{name: "empty", response: ``, wantErr: true},
		{name: "array", response: `[1]`, wantErr: true},
		{name: "no status", response: `{}`, wantErr: true},
		{name: "status too big", response: `{"status":20000}`, wantErr: true},
		{name: "desired not an object", response: `{"status":200,"desired":[1]}`, wantErr: true},
		{name: "reported not an object", response: `{"status":200,"reported":"x"}`, wantErr: true},
		{name: "desired version not an integer", response: `{"status":200,"desired":{"$version":1.5}}`, wantErr: true},
		{name: "desired version a string", response: `{"status":200,"desired":{"$version":"1"}}`, wantErr: true},
		{name: "version not an integer", response: `{"status":204,"version":1e3}`, wantErr: true},
		{name: "version too big", response: `{"status":204,"version":99999999999999999999}`, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := IoTHubResponse("r1", []byte(tc.response))
			if tc.wantErr {
				if err == nil {
					t.Fatalf("want an error, got %+v (payload %s)", m, m.Payload)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if m.Topic != tc.topic || string(m.Payload) != tc.payload || m.DesiredVersion != tc.desiredVersion {
				t.Errorf("got %q %q desired version %d\nwant %q %q desired version %d",
					m.Topic, m.Payload, m.DesiredVersion, tc.topic, tc.payload, tc.desiredVersion)
			}
		})
	}
}

func TestIoTHubError(t *testing.T) {
	m := IoTHubError(400, "a b", "no $rid")
	if m.Topic != "$iothub/twin/res/400/?$rid=a%20b" || string(m.Payload) != `{"errorCode":400004,"message":"no $rid"}` || m.DesiredVersion != 0 {
		t.Errorf("got %q %q %d", m.Topic, m.Payload, m.DesiredVersion)
	}
}

func TestIoTHubDesiredPatch(t *testing.T) {
	// "$version" goes last, where IoT Hub puts it; numbers and nulls stay as sent.
	patch := `{"$version":8, "mode":{"eco":true,"level":12345678901234567890},"fan":null}`
	want := `{"fan":null,"mode":{"eco":true,"level":12345678901234567890},"$version":8}`
	m, err := IoTHubDesiredPatch([]byte(patch))
	if err != nil {
		t.Fatal(err)
	}
	if m.Topic != "$iothub/twin/PATCH/properties/desired/?$version=8" || string(m.Payload) != want || m.DesiredVersion != 8 {
		t.Errorf("got %q %q %d", m.Topic, m.Payload, m.DesiredVersion)
	}
	for _, bad := range []string{``, `null`, `[]`, `{"a":1}`, `{"$version":"8"}`, `{"$version":8.5}`, `{"$version":null}`, `{"$version":8`} {
		if m, err := IoTHubDesiredPatch([]byte(bad)); err == nil {
			t.Errorf("IoTHubDesiredPatch(%q) = %+v, want an error", bad, m)
		}
	}
}

func TestParseOutbound(t *testing.T) {
	const id = "room/1+#%"
	for _, tc := range []struct {
		topic   string
		want    Outbound
		wantErr bool
	}{
		{ResponseTopic(id, "r1"), Outbound{DeviceID: id, Kind: OutboundResponse, RequestID: "r1"}, false},
		{ResponseTopic("d", "a b$&="), Outbound{DeviceID: "d", Kind: OutboundResponse, RequestID: "a b$&="}, false},
		{DesiredTopic(id), Outbound{DeviceID: id, Kind: OutboundDesired}, false},
		{DesiredPatchTopic(id), Outbound{DeviceID: id, Kind: OutboundDesiredPatch}, false},
		{"kubetwin/v1/d/res/", Outbound{}, true},
		{"kubetwin/v1/d/res/a/b", Outbound{}, true},
		{"kubetwin/v1/d/res", Outbound{}, true},
		{"kubetwin/v1/d/desired/patch/x", Outbound{}, true},
		{"kubetwin/v1/d/get/r1", Outbound{}, true},
		{"kubetwin/v1//desired", Outbound{}, true},
		{"kubetwin/v1/%zz/desired", Outbound{}, true},
		{"kubetwin/v1/d", Outbound{}, true},
		{"$iothub/twin/res/200/?$rid=1", Outbound{}, true},
	} {
		got, err := ParseOutbound(tc.topic)
		if got != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("ParseOutbound(%q) = %+v, %v; want %+v, error %v", tc.topic, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestDeviceACLIoTHub(t *testing.T) {
	const id = "dev-1"
	for _, tc := range []struct {
		topic string
		want  bool
	}{
		{"$iothub/twin/GET/?$rid=1", true},
		{"$iothub/twin/GET/", true}, // answered with 400 by the broker
		{"$iothub/twin/PATCH/properties/reported/?$rid=1&$version=2", true},
		{"$iothub/twin/PATCH/properties/desired/?$version=1", false},
		{"$iothub/twin/res/200/?$rid=1", false},
		{"$iothub/methods/res/200/?$rid=1", false},
		{"$iothub/twin/GET/x", false},
		{"$iothub/twin/GET/#", false},
		{"devices/" + id + "/messages/events/", false},
		{"$iothub/#", false},
	} {
		if got := DeviceMayPublish(id, tc.topic); got != tc.want {
			t.Errorf("DeviceMayPublish(%q) = %v, want %v", tc.topic, got, tc.want)
		}
	}
	for _, tc := range []struct {
		filter string
		want   bool
	}{
		{IoTHubResponseFilter, true},
		{IoTHubDesiredFilter, true},
		{"$iothub/twin/res/+/#", true},
		{"$iothub/twin/res/200/?$rid=1", true},
		{"$iothub/twin/PATCH/properties/desired/?$version=3", true},
		{"$iothub/twin/res", true},
		{"$iothub/twin/#", false},
		{"$iothub/#", false},
		{"$iothub/+/res/#", false},
		{"$iothub/twin/PATCH/properties/#", false},
		{"$iothub/methods/POST/#", false},
		{"devices/" + id + "/messages/devicebound/#", false},
		{"#", false},
	} {
		if got := DeviceMayReceive(id, tc.filter); got != tc.want {
			t.Errorf("DeviceMayReceive(%q) = %v, want %v", tc.filter, got, tc.want)
		}
	}
}
