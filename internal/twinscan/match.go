package twinscan

import (
	"runtime"
	"slices"
	"sync"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
)

// A Match is a twin whose document matched a query's condition.
type Match struct {
	Twin *v1alpha1.DeviceTwin
	// DeviceID is hubtwin.DeviceID(Twin), the document's deviceId, by
	// which results are ordered.
	DeviceID string
	// Doc is the twin's partial document (Partial.Doc), when Matches was
	// asked for documents.
	Doc map[string]any
}

// Matches evaluates q's condition on each twin's partial document, on
// every core: it is where a residual query over a large fleet spends its
// time. It returns the twins that match, in the order given, with their
// partial documents if docs is set.
func Matches(q *query.Query, p *Partial, twins []*v1alpha1.DeviceTwin, docs bool) []Match {
	if !docs && len(q.WherePaths()) == 0 {
		// A condition that reads no path (or none) has one value for
		// every twin.
		if !q.Match(map[string]any{}) {
			return nil
		}
		out := make([]Match, len(twins))
		for i, t := range twins {
			out[i] = Match{Twin: t, DeviceID: hubtwin.DeviceID(t)}
		}
		return out
	}
	const chunk = 2048
	workers := min(runtime.GOMAXPROCS(0), (len(twins)+chunk-1)/chunk)
	if workers <= 1 {
		return matchRange(q, p, twins, docs)
	}
	parts := make([][]Match, workers)
	var wg sync.WaitGroup
	per := (len(twins) + workers - 1) / workers
	for i := range workers {
		lo, hi := i*per, min((i+1)*per, len(twins))
		wg.Go(func() { parts[i] = matchRange(q, p, twins[lo:hi], docs) })
	}
	wg.Wait()
	return slices.Concat(parts...)
}

func matchRange(q *query.Query, p *Partial, twins []*v1alpha1.DeviceTwin, docs bool) []Match {
	var out []Match
	sc := p.newScratch()
	for _, t := range twins {
		if !q.Match(p.fill(sc, t)) {
			continue
		}
		m := Match{Twin: t, DeviceID: hubtwin.DeviceID(t)}
		if docs {
			// The scratch document is reused: a match gets its own.
			m.Doc = p.Doc(t)
		}
		out = append(out, m)
	}
	return out
}
