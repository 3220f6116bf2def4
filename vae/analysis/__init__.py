"""Analysis of a trained VAE: metrics, traversals, granule features, figures, the HTML report."""
