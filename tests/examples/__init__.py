"""The examples/ scripts, run end to end on tiny."""
