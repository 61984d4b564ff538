"""Shared foundations: config, errors, manifests, atomic writes, model loading, data, the sequential block pipeline."""
