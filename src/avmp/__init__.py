"""avmp: Asymmetric Virtual Memory Paging for hybrid Mamba/attention language models."""

__version__ = "0.1.0"
