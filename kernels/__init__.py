"""Triton kernels with pure-PyTorch references: expanded-vocab embedding, fused linear CE."""
