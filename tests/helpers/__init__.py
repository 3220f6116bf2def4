"""Shared test helpers: the config composer and the one pipeline runner (``run``),
toy data (``vae_toy``, ``seg_synth``)."""
