"""Decode state, step programs, CUDA graphs and generate()."""
