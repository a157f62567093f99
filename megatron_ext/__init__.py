"""megatron-ext: teach Llama-family models a new language on Megatron-Core."""

__version__ = "0.1.0"
