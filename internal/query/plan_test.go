package query

import (
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
)

func TestPlan(t *testing.T) {
	tests := []struct {
		where, labels, fields string
	}{
		// Equality and IN on tags become label requirements.
		{"tags.location.region = 'US'", "location.region=US", ""},
		{"'US' = tags.location.region", "location.region=US", ""},
		{"devices.tags.location.region = 'US'", "location.region=US", ""},
		{"tags.location.region IN ['US', 'EU']", "location.region in (EU,US)", ""},
		{"tags.location.region IN ['US']", "location.region=US", ""},
		{"tags.floor = 3", "floor=3", ""},
		{"tags.floor = 3.0", "floor=3", ""},
		{"tags.floor = 0x10", "floor=16", ""},
		{"tags.floor = 4503599627370496", "floor=4503599627370496", ""},
		{"tags.on = true", "on=true", ""},
		{"tags.x = ''", "x=", ""},
		{"tags.[[my-key]] = 'a'", "my-key=a", ""},
		{"tags.[[group]] = 'a'", "group=a", ""},
		{"tags.a = 'x' AND tags.b IN [1, true, 'y'] AND tags.c = 'z'", "a=x,b in (1,true,y),c=z", ""},
		{"tags.a = 'x' AND tags.a = 'x'", "a=x", ""},
		{"(tags.a = 'x' AND tags.b = 'y') AND properties.reported.z = 1", "a=x,b=y", ""},
		// Values without an exact label text are not pushed.
		{"tags.floor = 2.5", "", ""},
		{"tags.floor = -3", "", ""},
		{"tags.floor = 4503599627370497", "", ""},
		{"tags.x = 'two words'", "", ""},
		{"tags.x = '-x'", "", ""},
		{"tags.x = null", "", ""},
		{"tags.x IN ['a', 'two words']", "", ""},
		{"tags.x IN ['a', 2.5]", "", ""},
		// Keys that are not label names are not pushed.
		{"tags.[[_x]] = 'a'", "", ""},
		{"tags.[[a.b]] = 'a'", "", ""},
		{"tags.[[a/b]] = 'a'", "", ""},
		{"tags.a.[[ ]].b = 'a'", "", ""},
		{"tags = 'a'", "", ""},
		{"tags.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb = 'a'", "", ""},
		// Negations keep twins without the label (their tag may be a value
		// that is not a valid label value), and skip values without a label
		// text.
		{"tags.x != 'a'", "x!=a", ""},
		{"tags.x <> 'a'", "x!=a", ""},
		{"tags.x != 2.5", "x!=2.5", ""},
		{"tags.x != 'two words'", "", ""},
		{"tags.x NIN ['a', 'b']", "x notin (a,b)", ""},
		{"tags.x NIN ['a', 'two words', -1]", "x!=a", ""},
		{"tags.x NIN ['two words']", "", ""},
		// A configuration's status is its label on the twin.
		{"configurations.[[cfg-1]].status = 'Applied'", "configurations.kubetwin.io/cfg-1=Applied", ""},
		{"configurations.cfg.STATUS = 'Targeted'", "configurations.kubetwin.io/cfg=Targeted", ""},
		{"configurations.cfg.status IN ['Applied', 'Targeted']", "configurations.kubetwin.io/cfg in (Applied,Targeted)", ""},
		{"configurations.cfg.status != 'Applied'", "configurations.kubetwin.io/cfg!=Applied", ""},
		{"configurations.cfg.status NIN ['Applied', 1]", "configurations.kubetwin.io/cfg!=Applied", ""},
		{"configurations.cfg.status = 1", "", ""},
		{"configurations.cfg.status IN ['Applied', 'two words']", "", ""},
		{"configurations.[[a/b]].status = 'Applied'", "", ""},
		{"tags.a = 'x' AND configurations.cfg.status = 'Applied'", "a=x,configurations.kubetwin.io/cfg=Applied", ""},
		// OR, NOT and other operators stay residual.
		{"tags.x = 'a' OR tags.y = 'b'", "", ""},
		{"NOT (tags.x = 'a')", "", ""},
		{"NOT (tags.x != 'a')", "", ""},
		{"tags.x > 'a'", "", ""},
		{"STARTSWITH(tags.x, 'a')", "", ""},
		{"tags.x = tags.y", "", ""},
		{"tags.x = 1 + 2", "", ""},
		{"properties.reported.x = 'a'", "", ""},
		{"properties.desired.x = 'a'", "", ""},
		{"(tags.x = 'a' OR false) AND tags.y = 'b'", "y=b", ""},
		// Selectable fields.
		{"deviceId = 'myDeviceId'", "", "status.deviceId=myDeviceId"},
		{"DeviceId = 'a,b=c'", "", `status.deviceId=a\,b\=c`},
		{"deviceId IN ['a']", "", "status.deviceId=a"},
		{"deviceId IN ['a', 'b']", "", ""},
		{"deviceId != 'a'", "", "status.deviceId!=a"},
		{"deviceId NIN ['a', 'b', 3]", "", "status.deviceId!=a,status.deviceId!=b"},
		{"deviceId = 3", "", ""},
		{"deviceId = ''", "", ""},
		{"deviceId != ''", "", ""},
		{"connectionState = 'Connected'", "", "status.connectionState=Connected"},
		{"connectionState = 'Disconnected'", "", "status.connectionState!=Connected"},
		{"connectionState IN ['Disconnected']", "", "status.connectionState!=Connected"},
		{"connectionState != 'Connected'", "", "status.connectionState!=Connected"},
		{"connectionState != 'Disconnected'", "", "status.connectionState!=Disconnected"},
		{"connectionState = 'Connected' OR deviceId = 'a'", "", ""},
		{"status = 'enabled' AND connectionState = 'Disconnected' AND tags.location.plant = 'Redmond43'", "location.plant=Redmond43", "status.connectionState!=Connected"},
		{"deviceId = 'a' AND connectionState = 'Connected'", "", "status.deviceId=a,status.connectionState=Connected"},
	}
	for _, tc := range tests {
		t.Run(tc.where, func(t *testing.T) {
			q := mustParse(t, "SELECT * FROM devices WHERE "+tc.where)
			p := q.Plan()
			if p.LabelSelector != tc.labels {
				t.Errorf("LabelSelector = %q, want %q", p.LabelSelector, tc.labels)
			}
			if p.FieldSelector != tc.fields {
				t.Errorf("FieldSelector = %q, want %q", p.FieldSelector, tc.fields)
			}
			if !p.NeedsResidual || p.Residual != exprString(q.where) {
				t.Errorf("Residual = %q, %v; want the whole condition", p.Residual, p.NeedsResidual)
			}
			if _, err := labels.Parse(p.LabelSelector); err != nil {
				t.Errorf("label selector does not parse: %v", err)
			}
			if _, err := fields.ParseSelector(p.FieldSelector); err != nil {
				t.Errorf("field selector does not parse: %v", err)
			}
		})
	}
}

func TestPlanWithoutWhere(t *testing.T) {
	for _, s := range []string{"SELECT * FROM devices", "SELECT COUNT() AS n FROM devices GROUP BY tags.x"} {
		if p := mustParse(t, s).Plan(); p != (Plan{}) {
			t.Errorf("%s: Plan() = %+v, want none", s, p)
		}
	}
}

// TestPlanExamples shows what example queries (those of
// testdata/examples.json and the getting-started scenario's) send to the API
// server.
func TestPlanExamples(t *testing.T) {
	tests := []struct{ query, labels, fields string }{
		{"SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'", "location.plant=Redmond43", ""},
		{"SELECT * FROM devices WHERE tags.location.plant = 'Redmond43' AND properties.reported.connectivity.type = 'cellular'", "location.plant=Redmond43", ""},
		{"SELECT * FROM devices WHERE tags.location.region = 'US' AND properties.reported.telemetryConfig.sendFrequencyInSecs >= 60", "location.region=US", ""},
		{"SELECT * FROM devices WHERE properties.reported.connectivity.type IN ['wired', 'wifi']", "", ""},
		{"SELECT DeviceId, LastActivityTime FROM devices WHERE status = 'enabled' AND connectionState = 'Disconnected'", "", "status.connectionState!=Connected"},
	}
	for _, tc := range tests {
		p := mustParse(t, tc.query).Plan()
		if p.LabelSelector != tc.labels || p.FieldSelector != tc.fields {
			t.Errorf("%s: got -l %q --field-selector %q, want %q, %q", tc.query, p.LabelSelector, p.FieldSelector, tc.labels, tc.fields)
		}
	}
}

// TestConfigurationStatusQuery: IoT Hub's configurations.[[id]].status
// selects the twins whose configuration label has that value, both
// evaluated on the rendered twin and through the plan's label selector.
func TestConfigurationStatusQuery(t *testing.T) {
	mk := func(name, state string) *v1alpha1.DeviceTwin {
		tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{}}}
		if state != "" {
			tw.Labels[v1alpha1.ConfigurationsLabelPrefix+"telemetry-30s"] = state
		}
		return tw
	}
	twins := []*v1alpha1.DeviceTwin{mk("applied", "Applied"), mk("targeted", "Targeted"), mk("none", "")}
	for _, tc := range []struct{ where, want string }{
		{"configurations.[[telemetry-30s]].status = 'Applied'", "applied"},
		{"configurations.[[telemetry-30s]].status = 'Targeted'", "targeted"},
		{"configurations.[[telemetry-30s]].status IN ['Applied', 'Targeted']", "applied,targeted"},
		{"IS_DEFINED(configurations.[[telemetry-30s]])", "applied,targeted"},
	} {
		q, err := Parse("SELECT deviceId FROM devices WHERE " + tc.where)
		if err != nil {
			t.Fatal(err)
		}
		sel, err := labels.Parse(q.Plan().LabelSelector)
		if err != nil {
			t.Fatal(err)
		}
		var matched, selected []string
		for _, tw := range twins {
			if q.Match(hubtwin.FromDeviceTwin(tw)) {
				matched = append(matched, tw.Name)
			}
			if sel.Matches(labels.Set(tw.Labels)) && q.Match(hubtwin.FromDeviceTwin(tw)) {
				selected = append(selected, tw.Name)
			}
		}
		if strings.Join(matched, ",") != tc.want || strings.Join(selected, ",") != tc.want {
			t.Errorf("%s: evaluated %v, through the plan %v, want %s", tc.where, matched, selected, tc.want)
		}
	}
}
