"""cl-runner: config-driven continual learning of LLMs."""

__version__ = "0.1.0"
