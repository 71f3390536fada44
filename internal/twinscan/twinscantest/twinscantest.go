// Package twinscantest makes fleets of DeviceTwins for the benchmarks and
// tests of the query paths.
package twinscantest

import (
	"fmt"
	"math/rand/v2"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// Fleet makes n twins shaped as make bench-scale's (FleetTwin 0 to n-1).
func Fleet(n int) []*v1alpha1.DeviceTwin {
	twins := make([]*v1alpha1.DeviceTwin, n)
	for i := range twins {
		twins[i] = FleetTwin(i)
	}
	return twins
}

// FleetTwin is twin i of the fleet, in namespace "scale", named and with
// device id dev-%06d: tags (100 plants, 40 customers) mirrored into labels,
// reported telemetry (temperature 18 to 99.9) and its $metadata as the
// operator writes them, reconciled (observedGeneration 1).
func FleetTwin(i int) *v1alpha1.DeviceTwin {
	r := rand.New(rand.NewPCG(uint64(i), 7))
	temp := 18 + float64(r.IntN(820))/10
	tags := fmt.Sprintf(`{"location":{"plant":"Plant-%02d","region":"eu-west"},"customer":"customer-%02d","deviceType":"pump"}`, r.IntN(100), r.IntN(40))
	reported := fmt.Sprintf(`{"telemetry":{"temperature":%.1f,"humidity":%d},"firmware":{"version":"1.%d.%d"},"connectivity":{"type":"wifi"}}`,
		temp, 20+r.IntN(60), r.IntN(5), r.IntN(10))
	meta := `{"$lastUpdated":"2026-12-06T10:00:00Z","telemetry":{"$lastUpdated":"2026-12-06T10:00:00Z","temperature":{"$lastUpdated":"2026-12-06T10:00:00Z","$lastUpdatedVersion":3},` +
		`"humidity":{"$lastUpdated":"2026-12-06T10:00:00Z","$lastUpdatedVersion":3}},"firmware":{"$lastUpdated":"2026-12-06T10:00:00Z","version":{"$lastUpdated":"2026-12-06T10:00:00Z"}},` +
		`"connectivity":{"$lastUpdated":"2026-12-06T10:00:00Z","type":{"$lastUpdated":"2026-12-06T10:00:00Z"}}}`
	tg, _ := twin.DecodeRaw([]byte(tags))
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "scale", Name: fmt.Sprintf("dev-%06d", i), ResourceVersion: "12345", Generation: 1,
		Labels: twin.MirrorLabels(tg)}}
	tw.Status.ObservedGeneration = 1
	tw.Spec.Tags = raw(tags)
	tw.Spec.Desired = raw(`{"telemetryInterval":30}`)
	tw.Status.Reported = raw(reported)
	tw.Status.Metadata = &v1alpha1.TwinMetadata{Desired: raw(`{"$lastUpdated":"2026-12-06T10:00:00Z","telemetryInterval":{"$lastUpdated":"2026-12-06T10:00:00Z"}}`), Reported: raw(meta)}
	tw.Status.DeviceID = tw.Name
	tw.Status.ReportedVersion = 3
	return tw
}

func raw(s string) *apiextensionsv1.JSON { return &apiextensionsv1.JSON{Raw: []byte(s)} }
