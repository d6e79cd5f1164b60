"""hlb-gpt: a small, fast GPT trainer for WikiText ablations, with Grokfast gradient filters."""

__version__ = "0.1.0"
