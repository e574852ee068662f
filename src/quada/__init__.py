"""quada: safety of LLMs that run with activation approximations."""

__version__ = "0.1.0"
