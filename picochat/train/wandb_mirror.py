"""--wandb PROJECT: a live view of a long run. Every metrics row a stage writes to metrics.jsonl
(loss, throughput, MFU, validation bpb, RL's rewards) goes to Weights & Biases as well, as it is
written, so the report's curves can be watched while the run is hours from its report.

wandb is an optional extra (`pip install 'picochat[wandb]'`). WANDB_MODE=offline keeps the run on
disk for `wandb sync` later; WANDB_API_KEY or `wandb login` for the live service. One W&B run per
stage, named after its run dir, with an id derived from the run dir's path: a --resume continues
the same W&B run instead of starting another.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..common import PicochatError, log


class WandbMirror:
    def __init__(self, project: str, save: str, stage: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise PicochatError("--wandb needs the wandb package: pip install 'picochat[wandb]' (or pip install "
                                "wandb)") from None
        where = str(Path(save).resolve())
        run_id = f"{stage}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"
        self.run = wandb.init(project=project, name=f"{Path(save).name} ({stage})", id=run_id, resume="allow",
                              config=config, dir=str(Path(save).resolve().parent), reinit="create_new")
        self.step = self.run.step  # after a resume: rows W&B already has are not sent twice
        log(f"wandb: mirroring metrics to project {project!r}, run {run_id}")

    def __call__(self, record: dict) -> None:
        step = record.get("step", 0)
        if step < self.step:
            return
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        self.run.log(numbers, step=step)
        self.step = step

    def close(self) -> None:
        self.run.finish()
