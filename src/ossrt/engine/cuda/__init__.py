"""The CUDA backend (placeholder created by the kernels helper so `ossrt.engine.cuda.kernels` imports; the backend
helper owns this file)."""
