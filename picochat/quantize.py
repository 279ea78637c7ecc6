"""`picochat quantize`: an INT8 copy of a run dir (same layout, no trainer state), for inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .common import PicochatError
from .int8 import quantize_model
from .run_dir import WEIGHTS, load_run, save_run
from .settings import setting


@dataclass
class QuantizeConfig:
    load: str = setting(help="float run dir")
    save: str = setting(help="run dir to write (must not exist)")
    embeddings: bool = setting(False, "quantize the token embedding too (per-row scales)")
    overwrite: bool = setting(False, "replace an existing --save")


def quantize_run(cfg: QuantizeConfig) -> dict:
    out = Path(cfg.save)
    if out.exists() and not cfg.overwrite:
        raise PicochatError(f"run dir {cfg.save} already exists (choose another --save, or --overwrite)")
    if Path(cfg.load).resolve() == out.resolve():
        raise PicochatError(f"--save {cfg.save} is the run dir being quantized: write the INT8 copy elsewhere")
    run = load_run(cfg.load, "cpu")
    quantize_model(run.model, embeddings=cfg.embeddings)
    base = {"picochat_version", "stage", "model", "tokenizer_fingerprint", "quantization"}
    extra = {k: v for k, v in run.meta.items() if k not in base}
    extra["quantized_from"] = str(cfg.load)
    save_run(out, run.model, run.tokenizer, stage=run.meta.get("stage", "?"), extra=extra,
             metrics=run.metrics or None)
    src_mb = (Path(run.path) / WEIGHTS).stat().st_size / 1e6
    dst_mb = (out / WEIGHTS).stat().st_size / 1e6
    return {"run_dir": str(out), "quantization": run.model.quantization,
            "weights_mb": round(dst_mb, 2), "source_weights_mb": round(src_mb, 2),
            "ratio": round(src_mb / dst_mb, 2)}
