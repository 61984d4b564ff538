"""The ``losa run`` pipeline: recipes, stages, the report, and ``losa inspect``."""
