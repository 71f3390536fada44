package controllers

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// ReadManagedFields describes all the controllers read of a twin's
// managedFields: the labels the label manager owns (ownedLabels), each
// main-resource manager's labels and desired paths (managedBy) and whether
// a configuration's manager is there (twinsToApplier). The envtest suite
// checks that the cache transform leaves it unchanged.
func ReadManagedFields(t *v1alpha1.DeviceTwin) string {
	var b strings.Builder
	fmt.Fprintf(&b, "ownedLabels=%v\n", slices.Sorted(maps.Keys(ownedLabels(t, LabelManager))))
	owned := managedBy(t)
	for _, m := range slices.Sorted(maps.Keys(owned)) {
		// Only a configuration's manager counts when it owns nothing
		// (planTwin releases it); the others' paths are all planTwin reads.
		if owned[m].empty() && !strings.HasPrefix(m, ConfigurationManagerPrefix) {
			continue
		}
		fmt.Fprintf(&b, "%s labels=%v paths=%v\n", m, slices.Sorted(maps.Keys(owned[m].labels)), slices.Sorted(maps.Keys(owned[m].paths)))
	}
	for _, mf := range t.ManagedFields {
		if len(mf.Manager) > len(ConfigurationManagerPrefix) && strings.HasPrefix(mf.Manager, ConfigurationManagerPrefix) {
			b.WriteString("configuration manager\n")
			break
		}
	}
	return b.String()
}
