"""Benchmarks of dblocks_fast: one script per question, each writing JSON and markdown to results/."""
