"""Packaging for megatron-ext: the `megatron_ext` and `kernels` packages and the CLI."""

from pathlib import Path

from setuptools import find_packages, setup

# transformers 5.25 and later require Hugging Face's `kernels` distribution, whose import name is
# that of this project's `kernels` package: with both installed, one shadows the other
# (megatron_ext/model/__init__.py says so when it happens). Until our kernels take a name of their
# own, transformers is kept below 5.25.
TRANSFORMERS = "transformers<5.25"

setup(
    name="megatron-ext",
    version="0.1.0",
    description=(
        "Teach English-centric Llama-family LLMs a new language on Megatron-Core: "
        "tokenizer expansion, checkpoint conversion, mixed-corpus preprocessing, "
        "continued pretraining with fused Triton kernels, alignment and evaluation."
    ),
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ext", "megatron_ext.*", "kernels", "kernels.*"]),
    package_data={"megatron_ext.sample_data": ["build.sh"]},
    install_requires=[
        "megatron-core>=0.16.1",
        "torch",
        "triton>=3.0",  # every kernel compiles with 3.0 onwards (docs/benchmarks.md)
        "sentencepiece>=0.2",
        "numpy",
        "nltk>=3.9",
        "tqdm",
        "pyyaml",
        "zstandard",
        "psutil",
        "safetensors",  # the weights convert reads and writes
        "matplotlib",  # the plots of tokenizer-report and the demo's report
    ],
    extras_require={
        # Transformer Engine kernels for H100 clusters, in the range megatron-core 0.16 is
        # tested with (its own "dev" extra); apex is built from source (see README).
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12"],
        "parquet": ["pyarrow"],
        # Hugging Face tokenizer files on export (and the tests' reference models).
        "hf": [TRANSFORMERS],
        "tensorboard": ["tensorboard"],
        "dev": [
            "tensorboard",
            "pyarrow",
            TRANSFORMERS,
            "pytest",
            "pytest-benchmark",
            "ruff",
        ],
    },
    entry_points={"console_scripts": ["megatron-ext=megatron_ext.cli:main"]},
)
