"""Defaults that several layers share, in a module that imports nothing, so that configurations and
the command line can name them without loading torch."""

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"  # the subject model of every command
DEFAULT_JUDGE_MODEL = "qwen2.5-coder-1.5b-instruct"  # the model behind the llm, harmfulness and refusal judges
DEFAULT_CORPUS = "pydoc-topics"  # the offline perplexity corpus
PAPER_WINDOW = 1024  # tokens per perplexity window, as in the source paper
