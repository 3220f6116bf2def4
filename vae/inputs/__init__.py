"""Inputs of the VAE: expression preprocessing (``expression``) and crop x profile pairing (``pairing``)."""
