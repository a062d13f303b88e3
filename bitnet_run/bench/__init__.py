"""Benchmark tooling, apart from the runtime it measures: `runner` (the `bitnet-run bench` driver),
`synthetic` (random-ternary models of the released shapes), `peers` (GGUF files and runners for
other runtimes), `kernels` (per-kernel timings) and `plot` (charts of the JSON results)."""
