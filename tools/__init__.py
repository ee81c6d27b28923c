"""MicroFarm command-line tools: submit, status, demo, benchmarks."""
