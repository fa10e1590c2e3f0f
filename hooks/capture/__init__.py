"""What is recorded during the forward pass: :mod:`~hooks.capture.layers` (which layers, per-family presets),
:mod:`~hooks.capture.activations` (forward-hook capture), :mod:`~hooks.capture.attention` (attention
probabilities, fused kernels switched off) and :mod:`~hooks.capture.attention_reduce` (their online reduction
to per-image statistics)."""
