"""The compute engine: kernels, attention, KV cache, the forward pass, its float64 reference, sampling, generation,
and `Engine`, the one interface above them."""
