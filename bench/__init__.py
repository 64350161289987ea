"""Benchmarks of mb_kernels: kernel-level balancing, end-to-end training step, GPU check (see RESULTS.md)."""
