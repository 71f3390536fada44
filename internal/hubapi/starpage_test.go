package hubapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
)

// TestStarPageEqualsFullRun: reading SELECT * page by page (the
// incremental path) gives exactly what running the query over the whole
// fleet gives, for random fleets, conditions and page sizes.
func TestStarPageEqualsFullRun(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	conditions := []string{
		"",
		" WHERE tags.plant = 'p1'",
		" WHERE tags.plant != 'p1' AND properties.desired.level > 2",
		" WHERE NOT IS_DEFINED(tags.plant)",
		" WHERE STARTSWITH(deviceId, 'D')",
		" WHERE tags.plant IN ['p0', 'p2'] OR properties.desired.level = 0",
	}
	for round := range 200 {
		n := rng.IntN(40)
		var twins []*v1alpha1.DeviceTwin
		for i := range n {
			tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{
				Namespace: fmt.Sprintf("ns%d", rng.IntN(2)), Name: fmt.Sprintf("t%d", i)}}
			// Ids in an order unrelated to names, some sharing a prefix.
			tw.Spec.DeviceID = fmt.Sprintf("%c-%03d", "Dd-x"[rng.IntN(4)], rng.IntN(1000))
			tags := `{}`
			if p := rng.IntN(4); p < 3 {
				tags = fmt.Sprintf(`{"plant":"p%d"}`, p)
			}
			tw.Spec.Tags = &apiextensionsv1.JSON{Raw: []byte(tags)}
			tw.Spec.Desired = &apiextensionsv1.JSON{Raw: fmt.Appendf(nil, `{"level":%d}`, rng.IntN(5))}
			twins = append(twins, tw)
		}
		// Device ids are unique among the twins a query sees (owners).
		slices.SortFunc(twins, func(a, b *v1alpha1.DeviceTwin) int { return strings.Compare(a.Spec.DeviceID, b.Spec.DeviceID) })
		twins = slices.CompactFunc(twins, func(a, b *v1alpha1.DeviceTwin) bool { return a.Spec.DeviceID == b.Spec.DeviceID })
		rng.Shuffle(len(twins), func(i, j int) { twins[i], twins[j] = twins[j], twins[i] })

		text := "SELECT * FROM devices" + conditions[rng.IntN(len(conditions))]
		q, err := query.Parse(text)
		if err != nil {
			t.Fatal(err)
		}
		docs := make([]map[string]any, len(twins))
		for i, tw := range twins {
			docs[i] = hubtwin.FromDeviceTwin(tw)
		}
		full, _ := q.Run(docs)
		var want []string
		for _, d := range full.Items {
			want = append(want, deviceIDOf(d))
		}

		size := 1 + rng.IntN(7)
		// Every other round, a byte limit that cuts some pages short.
		maxBytes := DefaultMaxQueryPageBytes
		if round%2 == 1 {
			maxBytes = 1 + rng.IntN(1200)
		}
		hash := queryHash(q)
		var got []string
		var from *continuation
		for pages := 0; ; pages++ {
			if pages > len(twins)+1 {
				t.Fatalf("round %d: %q: more pages than twins", round, text)
			}
			p := newPage(size, maxBytes)
			next, err := starPage(q, hash, twins, from, p)
			if err != nil {
				t.Fatal(err)
			}
			var items []map[string]any
			if err := json.Unmarshal(p.body(), &items); err != nil {
				t.Fatalf("round %d: page body: %v", round, err)
			}
			full := len(items) == size || p.cut
			if len(items) > size || (next != "" && !full) || (next == "" && p.cut) {
				t.Fatalf("round %d: %q size %d: page of %d items (cut %v), next %q", round, text, size, len(items), p.cut, next)
			}
			if len(items) > 1 && len(p.body()) > maxBytes {
				t.Fatalf("round %d: a page of %d items is %d bytes, over the %d allowed", round, len(items), len(p.body()), maxBytes)
			}
			for _, d := range items {
				got = append(got, deviceIDOf(d))
			}
			if next == "" {
				break
			}
			if from, err = decodeContinuation(next, hash, true); err != nil {
				t.Fatalf("round %d: token %q: %v", round, next, err)
			}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("round %d: %q in pages of %d:\n got %v\nwant %v", round, text, size, got, want)
		}
	}
}

// TestGroupStart: a GROUP BY token is honoured only while the groups
// before its offset are the same; a token naming rows that do not exist,
// e.g. one forged for an aggregate without GROUP BY (one row, no group
// keys), is stale, not a panic.
func TestGroupStart(t *testing.T) {
	keys := []string{`"a"`, `"b"`, "u", "n1;"}
	tok := func(offset int, prefix []string) *continuation {
		return &continuation{V: continuationVersion, Query: "q", Offset: offset, Groups: groupsHash(prefix)}
	}
	if i, err := groupStart(tok(2, keys[:2]), keys); err != nil || i != 2 {
		t.Errorf("unchanged groups: %d, %v", i, err)
	}
	if i, err := groupStart(tok(4, keys), keys); err != nil || i != 4 {
		t.Errorf("at the end: %d, %v", i, err)
	}
	for name, c := range map[string]*continuation{
		"a group before it changed": tok(2, []string{`"a"`, `"c"`}),
		"groups reordered":          tok(2, []string{`"b"`, `"a"`}),
		"past the last group":       tok(5, append(keys, "x")),
		"no groups at all":          tok(1, []string{"u"}),
	} {
		k := keys
		if name == "no groups at all" {
			k = nil
		}
		if _, err := groupStart(c, k); !errors.Is(err, errStaleContinuation) {
			t.Errorf("%s: %v, want errStaleContinuation", name, err)
		}
	}
	// Length-prefixed: keys that concatenate alike still differ.
	if groupsHash([]string{"ab", "c"}) == groupsHash([]string{"a", "bc"}) {
		t.Error("groupsHash confuses [ab c] with [a bc]")
	}
}
