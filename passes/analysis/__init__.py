"""Analyses of a prepared graph that passes and the search read: the layer graph and per-layer costs."""
