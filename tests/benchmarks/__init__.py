"""The benchmarks/ scripts, run end to end on tiny."""
