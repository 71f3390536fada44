package hubapi

import (
	"iter"
	"math/rand/v2"
	"slices"
)

// inOrder yields the elements of s in the order of cmp (which must not
// call two elements equal), sorting only as far as the caller reads: it
// moves the first elements into place a batch at a time (a selection,
// linear in len(s)) and sorts only that batch, each batch four times the
// one before. Reading a page of batch elements out of a large s so costs
// a scan of s, not a sort of it. It reorders s.
func inOrder[T any](s []T, cmp func(a, b T) int, batch int) iter.Seq[T] {
	return func(yield func(T) bool) {
		rest := s
		k := max(batch, 1)
		for len(rest) > 0 {
			if len(rest) <= 2*k {
				k = len(rest)
			} else {
				selectFirst(rest, k, cmp)
			}
			slices.SortFunc(rest[:k], cmp)
			for _, v := range rest[:k] {
				if !yield(v) {
					return
				}
			}
			rest = rest[k:]
			k *= 4
		}
	}
}

// selectFirst reorders s so that its first k elements (0 < k < len(s))
// are its k smallest, in no particular order (quickselect).
func selectFirst[T any](s []T, k int, cmp func(a, b T) int) {
	lo, hi := 0, len(s) // the k-th smallest is in s[lo:hi]
	for hi-lo > 1 {
		// Partition s[lo:hi] around a random pivot: smaller ones first.
		p := lo + rand.IntN(hi-lo)
		s[p], s[hi-1] = s[hi-1], s[p]
		pivot := s[hi-1]
		i := lo
		for j := lo; j < hi-1; j++ {
			if cmp(s[j], pivot) < 0 {
				s[i], s[j] = s[j], s[i]
				i++
			}
		}
		s[i], s[hi-1] = s[hi-1], s[i]
		// s[i] is in its sorted place.
		switch {
		case i == k-1 || i == k:
			return
		case i < k:
			lo = i + 1
		default:
			hi = i
		}
	}
}
