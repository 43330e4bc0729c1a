"""Analyses of a prepared graph that passes and the search read: which nodes are layers, the layer graph,
per-layer costs."""
