"""``losa run`` (recipes planned once, the stage pipeline, the report) and ``losa inspect``.  The one package
that composes the others, through their public faces; only the CLI imports it."""

from ..core.faces import public_face

__all__, __getattr__ = public_face(__name__, {
    "RunConfig": "recipe", "DEFAULT_RECIPE": "recipe", "read_recipe_file": "recipe", "section_keys": "recipe",
    "section_settings": "recipe", "stage_config": "recipe",
    "StagePlan": "plan", "collect_recipe": "plan", "load_recipe": "plan",
    "RunResult": "pipeline", "run_pipeline": "pipeline",
    "InspectResult": "inspection", "run_inspect": "inspection",
})
