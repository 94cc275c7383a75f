"""Measuring models: perplexity, zero-shot accuracy (lm-eval), speed, memory, and HTML reports."""
