package twinscan

import (
	"reflect"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
)

// TestPartialConfigurations: configurations.[[id]].status, which the
// document takes from the twin's labels, reads the same from a partial
// document as from the whole one.
func TestPartialConfigurations(t *testing.T) {
	mk := func(labels map[string]string) *v1alpha1.DeviceTwin {
		return &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Name: "d", Labels: labels}}
	}
	twins := []*v1alpha1.DeviceTwin{
		mk(map[string]string{v1alpha1.ConfigurationsLabelPrefix + "cfg": "Applied"}),
		mk(map[string]string{v1alpha1.ConfigurationsLabelPrefix + "cfg": "Targeted", v1alpha1.ConfigurationsLabelPrefix + "other": "Applied"}),
		mk(map[string]string{"location.plant": "Redmond43"}),
		mk(nil),
	}
	for _, text := range []string{
		"SELECT * FROM devices WHERE configurations.cfg.status = 'Applied'",
		"SELECT * FROM devices WHERE configurations.cfg.status IN ['Applied', 'Targeted']",
		"SELECT * FROM devices WHERE IS_DEFINED(configurations.cfg)",
		"SELECT * FROM devices WHERE IS_DEFINED(configurations)",
		"SELECT * FROM devices WHERE NOT IS_DEFINED(configurations.other.status)",
	} {
		q, err := query.Parse(text)
		if err != nil {
			t.Fatal(err)
		}
		p := NewPartial(q.WherePaths())
		var got, want []bool
		for _, tw := range twins {
			got = append(got, q.Match(p.Doc(tw)))
			want = append(want, q.Match(hubtwin.FromDeviceTwin(tw)))
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: partial %v, whole %v", text, got, want)
		}
	}
}
