"""Pruning: masks (unstructured, N:M), Wanda, SparseGPT, per-block rates (uniform, RMI, OWL) and the
``losa prune`` workflow.  Imports ``core`` only; ``recover`` prunes in stages through these names."""

from ..core.faces import public_face

__all__, __getattr__ = public_face(__name__, {
    # losa prune
    "PruneConfig": "config", "PruneResult": "workflow", "run_prune": "workflow",
    "Method": "config", "Allocation": "config", "load_per_layer": "config", "pattern_problem": "config",
    "sparsegpt_problems": "config",
    # what recover's stages call
    "Criterion": "pruning", "CalibrationWindows": "pruning", "calibration_windows": "pruning",
    "check_nm_widths": "pruning", "prune_blocks": "pruning", "revived": "pruning",
    "untie_lm_head": "pruning",
    "RateRule": "allocation", "gram_matrix": "rmi", "BlockRates": "allocation", "block_rates": "allocation",
    "Reconstruction": "reconstruction", "Reconstructor": "reconstruction",
    "Tuned": "config", "Stream": "config", "RECONSTRUCT": "config", "reconstruct_problems": "config",
    # the math recover and run reuse
    "parse_nm": "config", "group_zero_counts": "masks", "satisfies_nm": "masks",
    "OWL_LAMBDA": "config", "OWL_M": "config",
})
