"""The compute engine: kernels, KV cache, the forward pass, its float64 reference, sampling, generation."""
