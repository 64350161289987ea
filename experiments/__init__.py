"""Applications that demonstrate mb_kernels; not part of the installed library (the wheel ships mb_kernels only)."""
