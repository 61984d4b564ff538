"""One process of the two-process FSDP runs of ``test_recover_fsdp.py``, started by ``accelerate launch --use_fsdp``.

In one launch (one start-up of torch per process): an uninterrupted run into ``OUT/a``, then a run into
``OUT/b`` stopped inside stage 2 (as a kill would, after its checkpoint) and resumed with ``resume``.
Every process writes ``OUT/rank<r>.json``: the results, and which share of the model's parameter
elements it held after sharding (1/N when the frozen base weights are really sharded).
"""

import json
import os
import sys
from pathlib import Path

from conftest import StopRun, stop_after
from losa_cli.core.config import CalibrationConfig
from losa_cli.recover import RecoverConfig, run_recover
from losa_cli.recover import sharding as sharding_module

shares: list[float] = []
_shard = sharding_module.shard


def _recording_shard(model, device, world, settings):
    """``sharding.shard``, noting the share of the parameter elements this process holds afterwards."""
    model = _shard(model, device, world, settings)
    params = list(model.parameters())
    shares.append(sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params))
    return model


def main(settings_json: str, out: str, stop: int) -> None:
    sharding_module.shard = _recording_shard
    settings = json.loads(settings_json)
    calibration = CalibrationConfig(**settings.pop("calibration"))
    folder = Path(out)

    def config(name: str, **extra) -> RecoverConfig:
        return RecoverConfig(**settings, calibration=calibration, out=str(folder / name), **extra)

    straight = run_recover(config("a"))
    try:
        run_recover(config("b"), stop_after(stop))
        raise SystemExit("the run was not stopped")
    except StopRun:
        pass
    resumed = run_recover(config("b", resume=True))
    report = {"straight": straight.to_dict(), "resumed": resumed.to_dict(), "shares": shares}
    (folder / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
