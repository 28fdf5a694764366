"""tetherfed benchmarks: each runs ours and a reference in one process run, interleaved."""
