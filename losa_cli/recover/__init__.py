"""Recovery: masked LoRA (or LoSiA-style subnets), error-driven ranks, the multi-stage LoSA schedule and
the ``losa recover`` workflow.  Imports ``core`` and ``prune``'s public face (it prunes at every stage)."""

from ..core.faces import public_face

__all__, __getattr__ = public_face(__name__, {
    "RecoverConfig": "config", "Adapter": "config", "RankAllocation": "config", "RECOVER_SPARSITY": "config",
    "Loss": "config", "RecoverResult": "workflow", "StageRecord": "stages", "run_recover": "workflow",
    "STATE_FILE": "checkpoint",
})
