"""Third-party output: off unless ``--verbose``, so stderr carries losa's own lines only.

Why: the libraries losa drives (transformers, huggingface_hub, datasets, torch, onnx, DeepSparse,
accelerate, peft, lm_eval) draw their own tqdm bars, log warnings and raise Python warnings.  On a
terminal they tear losa's progress bars apart; in the log of a long run (CI, ``nohup``) a tqdm bar
is a wall of carriage returns that hides where the run is, and the plain ``description done/total``
lines losa writes there are all a reader needs.  ``--verbose`` (or ``LOSA_VERBOSE=1``) leaves all
of it as the libraries make it, for debugging.

Standard library only: this runs before any of those libraries is imported.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: environment read by the libraries when they are imported, and inherited by child processes
#: (the engine timing children of ``losa bench``); values the user set are kept
QUIET_ENVIRONMENT = {
    "TQDM_DISABLE": "1",  # every tqdm bar, e.g. transformers' GGUF de-quantisation bar (a bare tqdm)
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore",
    # torch resets its loggers to WARNING when imported (after losa set them), e.g. the C++ extension
    # builder's compiler notice; "-all" keeps every torch logger at ERROR
    "TORCH_LOGS": "-all",
}
#: loggers of the libraries losa drives; without a handler of their own their warnings reach stderr
THIRD_PARTY_LOGGERS = ("torch", "transformers", "huggingface_hub", "datasets", "accelerate", "onnx", "onnxruntime",
                       "deepsparse", "sparsezoo", "peft", "lm_eval", "charset_normalizer")


def quiet_third_party(verbose: bool) -> None:
    """Silence third-party progress bars, log records below ERROR and Python warnings, unless ``verbose``.

    Every Python warning is ignored: losa reports its own through its results' ``warnings`` lists
    (printed as ``warning:`` lines), never through the ``warnings`` module, so any Python warning
    comes from a library.  Errors still surface, as losa's one-line messages.  Environment variables
    reach libraries imported later and child processes; transformers, huggingface_hub and datasets
    already imported (an in-process caller) are switched directly.
    """
    if verbose:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.simplefilter("ignore")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
