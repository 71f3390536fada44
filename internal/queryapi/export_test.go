package queryapi

// BenchTwinAt is twin i of the benchmarks' fleet, for the envtest benchmark.
var BenchTwinAt = benchTwinAt
