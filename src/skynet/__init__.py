"""SkyNet: run a Hugging Face causal LM across several machines with tensor-parallel MLPs."""

__version__ = "0.1.0"
