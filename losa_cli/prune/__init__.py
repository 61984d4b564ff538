"""Pruning: masks, Wanda, SparseGPT, layer-wise allocation (RMI, OWL) and the ``losa prune`` workflow."""
