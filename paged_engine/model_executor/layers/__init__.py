"""Layers the model files are built of. Each op goes through `paged_triton.kernels.ops`, which
picks the Triton kernel on CUDA and plain torch elsewhere; linear layers own their weight loaders
and tensor-parallel slicing. Imports: torch, kernels, distributed/, quantization/base.py."""
