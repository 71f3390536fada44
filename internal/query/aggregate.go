package query

import (
	"encoding/json"
	"strconv"
)

// Aggregation answers a query whose rows are of groups of twins (GROUP BY,
// aggregates) over twins given a batch at a time, holding per group only
// its accumulators and the values of its first twin, not the documents:
// over a large fleet the documents would not fit in memory, the groups
// mostly do. Run uses it too.
type Aggregation struct {
	q      *Query
	index  map[string]int
	groups []*aggGroup
	size   int
}

// aggGroup is a group of twins: those whose GROUP BY value has key.
type aggGroup struct {
	key string
	n   int // twins
	// first holds, per projection that is not an aggregate, its value on
	// the group's first twin; acc, per aggregate, its accumulator.
	first []any
	acc   []accum
}

// accum accumulates the values of an aggregate's argument.
type accum struct {
	sum   float64
	count int // numbers summed
	best  any // MIN or MAX so far
}

// groupOverhead approximates the bytes a group holds besides its key and
// values.
const groupOverhead = 96

// Aggregate returns an empty Aggregation of q, or nil when q's rows are
// each of one twin (q.PerTwin).
func (q *Query) Aggregate() *Aggregation {
	if q.PerTwin() {
		return nil
	}
	a := &Aggregation{q: q, index: map[string]int{}}
	if q.groupBy == nil {
		a.newGroup("") // aggregates give one row, even over no twins
	}
	return a
}

func (a *Aggregation) newGroup(key string) *aggGroup {
	g := &aggGroup{key: key, first: make([]any, len(a.q.proj)), acc: make([]accum, len(a.q.proj))}
	for i := range g.acc {
		g.first[i], g.acc[i].best = undefined, undefined
	}
	a.index[key] = len(a.groups)
	a.groups = append(a.groups, g)
	a.size += groupOverhead + len(key)
	return g
}

// Add adds the twins of docs that match the query's condition. Twins are
// to be added in deviceId order, as Run takes them: a group's first twin
// gives the row's other values, and sums are added in that order.
func (a *Aggregation) Add(docs []map[string]any) {
	for _, d := range docs {
		if a.q.Match(d) {
			a.add(d)
		}
	}
}

func (a *Aggregation) add(d map[string]any) {
	key := ""
	if a.q.groupBy != nil {
		key = groupKey(lookup(d, a.q.groupBy.segs))
	}
	var g *aggGroup
	if i, ok := a.index[key]; ok {
		g = a.groups[i]
	} else {
		g = a.newGroup(key)
	}
	first := g.n == 0
	g.n++
	for i, pr := range a.q.proj {
		c, isCall := pr.x.(*call)
		switch {
		case !isCall || !c.fn.aggregate:
			if first {
				g.first[i] = eval(pr.x, d)
				a.size += valueSize(g.first[i])
			}
		case c.fn.name != "COUNT":
			a.size += g.acc[i].add(c.fn.name, eval(c.args[0], d))
		}
	}
}

// add accumulates v for fn (SUM, AVG, MIN, MAX) and returns how many
// bytes more it holds.
func (ac *accum) add(fn string, v any) int {
	switch fn {
	case "SUM", "AVG":
		if kindOf(v) == kNumber {
			ac.sum += toFloat(v)
			ac.count++
		}
		return 0
	}
	if k := kindOf(v); k == kUndefined || k == kObject {
		return 0
	}
	if ac.best != undefined {
		o := orderAny(v, ac.best)
		if fn == "MIN" && o >= 0 || fn == "MAX" && o <= 0 {
			return 0
		}
	}
	grown := valueSize(v) - valueSize(ac.best)
	ac.best = v
	return grown
}

// result is the aggregate fn over n twins.
func (ac *accum) result(fn string, n int) any {
	switch fn {
	case "COUNT":
		return json.Number(strconv.Itoa(n))
	case "SUM":
		return finite(ac.sum)
	case "AVG":
		if ac.count == 0 {
			return undefined
		}
		return finite(ac.sum / float64(ac.count))
	}
	return ac.best
}

// Size approximates the bytes the groups hold: their keys, the values of
// their first twins and of MIN and MAX. A caller bounds it (the answer
// holds as much).
func (a *Aggregation) Size() int { return a.size }

// Result returns the rows of the groups, in the order of each group's
// first twin, cut to TOP n, as Run gives them.
func (a *Aggregation) Result() Result {
	res := Result{ItemType: ItemTypeRaw, Items: []map[string]any{}}
	for _, g := range a.groups {
		if a.q.top >= 0 && len(res.Items) == a.q.top {
			break
		}
		r := make(map[string]any, len(a.q.proj))
		for i, pr := range a.q.proj {
			v := g.first[i]
			if c, ok := pr.x.(*call); ok && c.fn.aggregate {
				v = g.acc[i].result(c.fn.name, g.n)
			}
			if kindOf(v) != kUndefined {
				r[pr.name] = v
			}
		}
		res.Items = append(res.Items, r)
		if a.q.groupBy != nil {
			res.GroupKeys = append(res.GroupKeys, g.key)
		}
	}
	return res
}

// valueSize approximates the bytes v holds.
func valueSize(v any) int {
	switch x := v.(type) {
	case string:
		return 16 + len(x)
	case json.Number:
		return 16 + len(x)
	case map[string]any:
		n := 48
		for k, e := range x {
			n += 16 + len(k) + valueSize(e)
		}
		return n
	case []any:
		n := 24
		for _, e := range x {
			n += valueSize(e)
		}
		return n
	}
	return 16
}
