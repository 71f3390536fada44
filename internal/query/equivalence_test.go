package query

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// The randomized equivalence test generates fleets and queries, and checks
// that listing the fleet with the plan's selectors and running the query on
// what is listed gives exactly the answer of running it on the whole fleet.

var (
	long = strings.Repeat("k", 40)

	genTagPaths = [][]string{
		{"a"}, {"b"}, {"a", "b"}, {"loc", "region"}, {"loc", "plant"}, {"loc", "floor"},
		{"group"}, {"select"}, {"my-key"}, {"_x"}, {"Key"}, {"x", "y", "z"}, {long, long}, {"n"},
	}
	genReportedPaths = [][]string{
		{"connectivity", "type"}, {"tc", "status"}, {"tc", "freq"}, {"fw"}, {"a"},
	}
	genValues = []any{
		"a", "b", "US", "EU", "Redmond43", "3", "true", "false", "", "two words", "-x", "A", "2.5",
		json.Number("0"), json.Number("3"), json.Number("-2"), json.Number("2.5"), json.Number("10"),
		json.Number("4503599627370496"), json.Number("1e-7"),
		true, false,
	}
	genDeviceIDs = []string{"dev-1", "dev-2", "Dev:3", "a,b=c", "x!y", "myDeviceId", "p(1)", "dev-1"}
	genStates    = []string{"", "Connected", "Disconnected"}
	// genConfigs are configuration names; a twin carries each one's label
	// configurations.kubetwin.io/<name> with one of genConfigStates.
	genConfigs      = []string{"cfg-a", "b"}
	genConfigStates = []any{"Applied", "Targeted"}
)

type generator struct {
	r    *rand.Rand
	objs []object // the fleet being queried: values are often taken from it
}

func (g generator) pick(n int) int        { return g.r.IntN(n) }
func (g generator) chance(p float64) bool { return g.r.Float64() < p }

// value returns a random section value: mostly a scalar, sometimes an
// object.
func (g generator) value() any {
	if g.chance(0.05) {
		return map[string]any{"k": genValues[g.pick(len(genValues))]}
	}
	return genValues[g.pick(len(genValues))]
}

// section returns a random section over paths; later paths overwrite
// earlier ones where they collide.
func (g generator) section(paths [][]string, n int) map[string]any {
	d := map[string]any{}
	for range n {
		p := paths[g.pick(len(paths))]
		m := d
		for _, k := range p[:len(p)-1] {
			child, ok := m[k].(map[string]any)
			if !ok {
				child = map[string]any{}
				m[k] = child
			}
			m = child
		}
		m[p[len(p)-1]] = g.value()
	}
	return d
}

// object is one generated DeviceTwin with what the API server would know of
// it: its labels (the operator mirrors tags into them) and selectable fields.
type object struct {
	doc    map[string]any
	labels labels.Set
	fields fields.Set
}

func (g generator) fleet() []object {
	n := g.pick(9)
	out := make([]object, n)
	for i := range out {
		id := genDeviceIDs[g.pick(len(genDeviceIDs))]
		tags := g.section(genTagPaths, g.pick(5))
		tw := &v1alpha1.DeviceTwin{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("twin-%d", i), ResourceVersion: "7", Generation: 2},
			Spec: v1alpha1.DeviceTwinSpec{
				DeviceID: id,
				Tags:     &apiextensionsv1.JSON{Raw: twin.Encode(tags)},
			},
			Status: v1alpha1.DeviceTwinStatus{
				DeviceID:        id, // reconciled
				ConnectionState: genStates[g.pick(len(genStates))],
				ReportedVersion: int64(g.pick(3)),
			},
		}
		if g.chance(0.8) {
			tw.Status.Reported = &apiextensionsv1.JSON{Raw: twin.Encode(g.section(genReportedPaths, g.pick(4)))}
		}
		decoded, err := twin.DecodeRaw(tw.Spec.Tags.Raw)
		if err != nil {
			panic(err)
		}
		lbls := labels.Set(twin.MirrorLabels(decoded))
		tw.Labels = lbls
		for _, c := range genConfigs {
			if g.chance(0.4) {
				lbls[v1alpha1.ConfigurationsLabelPrefix+c] = genConfigStates[g.pick(len(genConfigStates))].(string)
			}
		}
		out[i] = object{
			doc:    hubtwin.FromDeviceTwin(tw),
			labels: lbls,
			fields: fields.Set{
				"metadata.name":      tw.Name,
				FieldDeviceID:        tw.Status.DeviceID,
				FieldConnectionState: tw.Status.ConnectionState,
				"metadata.namespace": "",
			},
		}
	}
	return out
}

// literal writes v as a query literal, in one of its spellings.
func (g generator) literal(v any) string {
	if kindOf(v) == kNumber {
		if _, ok := v.(json.Number); !ok {
			v = formatNumber(toFloat(v))
		}
	}
	switch x := v.(type) {
	case string:
		if g.chance(0.3) {
			return `"` + strings.ReplaceAll(x, `"`, `\"`) + `"`
		}
		return quote(x)
	case json.Number:
		switch {
		case x == "3" && g.chance(0.3):
			return []string{"3.0", "0x3", "3e0", "30e-1"}[g.pick(4)]
		case strings.HasPrefix(string(x), "-"):
			return "-" + string(x[1:])
		}
		return string(x)
	case bool:
		if g.chance(0.3) {
			return strings.ToUpper(fmt.Sprint(x))
		}
		return fmt.Sprint(x)
	case nil:
		return "null"
	}
	panic(fmt.Sprintf("no literal for %T", v))
}

// path returns a random path and the values worth comparing it with:
// half the time, only the values the fleet has there.
func (g generator) path() (string, []any) {
	text, values, segs := g.anyPath()
	if g.chance(0.5) {
		var present []any
		for _, o := range g.objs {
			v := lookup(o.doc, segs)
			switch kindOf(v) {
			case kNull, kBool, kNumber, kString:
				present = append(present, v)
			}
		}
		if len(present) > 0 {
			return text, present
		}
	}
	return text, values
}

func (g generator) anyPath() (string, []any, []string) {
	text, values := g.pathText()
	q, err := Parse("SELECT " + text + " FROM devices")
	if err != nil {
		panic(err)
	}
	return text, values, q.proj[0].x.(*path).segs
}

func (g generator) pathText() (string, []any) {
	switch r := g.pick(20); {
	case r < 10:
		p := genTagPaths[g.pick(len(genTagPaths))]
		return "tags." + pathString(p), genValues
	case r < 14:
		p := genReportedPaths[g.pick(len(genReportedPaths))]
		return "properties.reported." + pathString(p), genValues
	case r < 16:
		ids := make([]any, 0, len(genDeviceIDs)+1)
		for _, id := range genDeviceIDs {
			ids = append(ids, id)
		}
		return []string{"deviceId", "DeviceId", "devices.deviceId"}[g.pick(3)], append(ids, "", json.Number("3"))
	case r < 18:
		return "connectionState", []any{"Connected", "Disconnected", "", "connected", json.Number("1")}
	case r < 19:
		if g.chance(0.5) {
			return "status", []any{"enabled", "disabled"}
		}
		c := genConfigs[g.pick(len(genConfigs))]
		return "configurations." + pathString([]string{c}) + ".status", append(genConfigStates, "applied", json.Number("1"))
	}
	return "tags.nope", genValues
}

func (g generator) list(values []any) string {
	n := 1 + g.pick(3)
	parts := make([]string, n)
	for i := range parts {
		if g.chance(0.05) {
			parts[i] = "null"
			continue
		}
		parts[i] = g.literal(values[g.pick(len(values))])
	}
	return "[" + strings.Join(parts, ", ") + "]"
}

func (g generator) atom() string {
	p, values := g.path()
	v := g.literal(values[g.pick(len(values))])
	switch r := g.pick(100); {
	case r < 35:
		return p + " = " + v
	case r < 40:
		return v + " = " + p
	case r < 50:
		return p + []string{" != ", " <> "}[g.pick(2)] + v
	case r < 57:
		return p + []string{" < ", " <= ", " > ", " >= "}[g.pick(4)] + v
	case r < 70:
		return p + " IN " + g.list(values)
	case r < 80:
		return p + " NIN " + g.list(values)
	case r < 85:
		return "IS_DEFINED(" + p + ")"
	case r < 88:
		return "STARTSWITH(" + p + ", 'a')"
	case r < 91:
		q, _ := g.path()
		return p + " = " + q
	case r < 95:
		return p + " + 1 > 2"
	}
	return []string{"true", "false", "null"}[g.pick(3)]
}

func (g generator) cond(depth int) string {
	if depth == 0 || g.chance(0.35) {
		return g.atom()
	}
	switch r := g.pick(100); {
	case r < 50:
		return g.cond(depth-1) + " AND " + g.cond(depth-1)
	case r < 70:
		return g.cond(depth-1) + " OR " + g.cond(depth-1)
	case r < 85:
		return "NOT " + "(" + g.cond(depth-1) + ")"
	}
	return "(" + g.cond(depth-1) + ")"
}

func (g generator) query() string {
	sel, group := "*", ""
	switch r := g.pick(100); {
	case r < 55:
	case r < 65:
		sel = fmt.Sprintf("TOP %d *", g.pick(4))
	case r < 75:
		sel = "deviceId, tags.loc.region, properties.reported.tc.freq AS f"
	case r < 82:
		sel = "COUNT() AS n, SUM(tags.loc.floor) AS s, MIN(tags.a) AS lo, MAX(tags.a) AS hi"
	case r < 92:
		sel, group = "tags.a AS v, COUNT() AS n, AVG(properties.reported.tc.freq) AS avg", " GROUP BY tags.a"
	default:
		sel, group = fmt.Sprintf("TOP %d connectionState, COUNT() AS n", g.pick(3)), " GROUP BY connectionState"
	}
	where := ""
	if g.chance(0.95) {
		n := 1 + g.pick(3)
		parts := make([]string, n)
		for i := range parts {
			parts[i] = g.cond(g.pick(3))
		}
		where = " WHERE " + strings.Join(parts, " AND ")
	}
	return "SELECT " + sel + " FROM devices" + where + group
}

// checkPlan lists the fleet with the query's plan and checks the answer
// equals a full scan's. It reports what the plan achieved.
func checkPlan(t testing.TB, q *Query, objs []object) (pushed, pruned, nonEmpty bool) {
	t.Helper()
	plan := q.Plan()
	lsel, err := labels.Parse(plan.LabelSelector)
	if err != nil {
		t.Fatalf("%s: label selector %q: %v", q, plan.LabelSelector, err)
	}
	fsel, err := fields.ParseSelector(plan.FieldSelector)
	if err != nil {
		t.Fatalf("%s: field selector %q: %v", q, plan.FieldSelector, err)
	}
	var all, listed []map[string]any
	for _, o := range objs {
		all = append(all, o.doc)
		if lsel.Matches(o.labels) && fsel.Matches(o.fields) {
			listed = append(listed, o.doc)
		}
	}
	want, err := q.Run(all)
	if err != nil {
		t.Fatal(err)
	}
	got, err := q.Run(listed)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		var fleet []string
		for _, o := range objs {
			fleet = append(fleet, fmt.Sprintf("  %s labels=%v fields=%v", twin.Encode(o.doc), o.labels, o.fields))
		}
		t.Fatalf("%s\nplan %+v\nfull scan: %s\nwith plan: %s\nfleet:\n%s",
			q, plan, encodeItems(want.Items), encodeItems(got.Items), strings.Join(fleet, "\n"))
	}
	return plan.LabelSelector != "" || plan.FieldSelector != "", len(listed) < len(all), len(want.Items) > 0
}

func TestPlanEquivalence(t *testing.T) {
	cases := 20000
	if testing.Short() {
		cases = 2000
	}
	g := generator{r: rand.New(rand.NewPCG(2024, 5))}
	var labelled, fielded, pushed, pruned, nonEmpty int
	for range cases {
		objs := g.fleet()
		g.objs = objs
		text := g.query()
		q, err := Parse(text)
		if err != nil {
			t.Fatalf("generated query %q: %v", text, err)
		}
		// The canonical form must be the same query.
		if q2, err := Parse(q.String()); err != nil || q2.String() != q.String() {
			t.Fatalf("%q: String() %q does not reparse to itself: %v", text, q.String(), err)
		}
		p, pr, ne := checkPlan(t, q, objs)
		plan := q.Plan()
		if plan.LabelSelector != "" {
			labelled++
		}
		if plan.FieldSelector != "" {
			fielded++
		}
		if p {
			pushed++
		}
		if pr {
			pruned++
		}
		if ne {
			nonEmpty++
		}
	}
	t.Logf("%d cases: %d with a label selector, %d with a field selector, %d pushed down, %d where the selectors listed fewer twins, %d with a non-empty answer",
		cases, labelled, fielded, pushed, pruned, nonEmpty)
	// The generator must exercise the planner, not just agree trivially.
	for name, n := range map[string]int{"label selector": labelled, "field selector": fielded, "pruned": pruned, "non-empty": nonEmpty} {
		if n < cases/10 {
			t.Errorf("only %d of %d cases had %s", n, cases, name)
		}
	}
}
