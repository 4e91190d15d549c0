"""Training of the codec and of its entropy-coding LM (never imported by the core package)."""
