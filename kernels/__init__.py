"""Triton kernels with pure-PyTorch references: expanded-vocab embedding, fused linear CE."""

# Tells this package from others of the import name `kernels` (megatron_ext/model/__init__.py).
MEGATRON_EXT = True
