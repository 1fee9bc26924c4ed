"""The model: model files, the layers they are built of, quantization methods, and the loader.

Holds: models/ (one file per architecture family and the registry), layers/ (linear layers with
weight loaders, attention, norm, rotary, activation, vocab embedding), quantization/ (methods
that replace a linear layer's weights from outside the model file), loader.py (construct, apply
quantization, load weights), forward_context.py (the attention metadata of one forward).
Imports: torch, paged_triton.kernels (through kernels.ops), distributed/; never executor/ or core/.
"""
