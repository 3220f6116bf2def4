"""Hydra configs of ``python -m pipeline`` (``config.yaml`` + one folder per group):
package data, so an installed copy finds them; the schema is ``pipeline/config.py``."""
