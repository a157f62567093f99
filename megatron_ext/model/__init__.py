"""megatron-core's GPT model with this project's kernels, attention and norms.

The kernels are imported as the top-level package ``kernels``, a name that Hugging Face's
``kernels`` distribution (required by transformers 5.25 and later) also takes: whichever comes
first on ``sys.path`` hides the other. Checked here, so that the model fails with the reason
rather than with a missing ``kernels.cross_entropy``.
"""

import kernels

if not getattr(kernels, "MEGATRON_EXT", False):
    raise ImportError(
        f"{kernels.__file__}: this `kernels` package is not megatron-ext's but another of the "
        "same import name (Hugging Face's `kernels`, which transformers 5.25 and later require): "
        "`pip uninstall kernels` and `pip install 'transformers<5.25'`",
        name="kernels",
    )
