"""losa: make large language models sparse and keep them accurate."""

__version__ = "0.1.0"
