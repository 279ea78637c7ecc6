"""Run directories: the checkpoint format every stage reads and writes.

    runs/<name>/
      model.safetensors   weights (fp32), readable by the safetensors library alone
      config.json         model config, stage, picochat version, tokenizer fingerprint, the stage's
                          settings ("train") and the plan derived from them ("plan")
      tokenizer.json      Hugging Face tokenizers format
      trainer_state.pt    optimizer state, step, data position, RNG: what exact resume needs
      metrics.jsonl       one JSON object per logged step
      adapter.safetensors LoRA runs: each adapted layer's lora_A and lora_B and the special tokens'
      adapter_config.json rows (fp32), and its rank, alpha, layers and whether model.safetensors has it merged in
                          (config.json's "lora" says the same); unmerged, load_run merges it
      evals/<name>.json   an eval's summary, <name>.jsonl its per-example rows (evals/results.py)

A run dir is written whole into `<name>.tmp`, fsynced, then swapped in by rename, so a crash at
any moment leaves either the old run dir or the new one, never a mix. If the crash falls between
the two renames, the old one is still at `<name>.old` and load_run puts it back.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import __version__
from . import int8 as int8lib
from .common import PicochatError, fsync, log, save_safetensors
from .config import ModelConfig
from .model import GPT
from .tokenizer import Tokenizer

WEIGHTS, CONFIG, TOKENIZER, TRAINER, METRICS = (
    "model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt", "metrics.jsonl")
ADAPTER, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


@dataclass
class RunDir:
    """A run dir, loaded."""
    path: Path
    model: GPT
    tokenizer: Tokenizer
    meta: dict  # the whole config.json
    trainer_state: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    adapter: object | None = None  # an unmerged LoRA run's Adapters, when loaded with adapter="keep"
    dtype: torch.dtype = torch.float32  # compute dtype for scoring many tokens (inference.open_for_inference)
    decode_dtype: torch.dtype = torch.float32  # and for generating a few rows at a time

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def save_run(path: str | Path, model: GPT, tokenizer: Tokenizer, stage: str, extra: dict | None = None,
             trainer_state: dict | None = None, metrics: list[dict] | None = None, adapter=None,
             merged: bool = True) -> Path:
    """Write the run dir. `adapter` (lora.Adapters): a LoRA run's, saved beside the weights, which
    are the model's own with it merged in (merged=True) or without it (the base weights)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # float tensors as fp32; an INT8 model's int8 weights stay int8 (next to their fp32 scales)
    state = adapter.merged_state(model) if adapter is not None and merged else model.state_dict()
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in state.items()}
    save_safetensors(state, tmp / WEIGHTS)
    tokenizer.save(tmp / TOKENIZER)
    meta = {"picochat_version": __version__, "stage": stage, "model": model.config.to_dict(),
            "tokenizer_fingerprint": tokenizer.fingerprint(), **(extra or {})}
    if getattr(model, "quantization", None):
        meta["quantization"] = model.quantization
    if adapter is not None:
        meta["lora"] = {**adapter.describe(), "merged": merged}
        save_safetensors({k: v.to("cpu", torch.float32).contiguous() for k, v in adapter.tensors().items()},
                         tmp / ADAPTER)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta["lora"], indent=2) + "\n")
    (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER)
    if metrics is not None:
        (tmp / METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics))
    for f in tmp.iterdir():
        fsync(f)
    fsync(tmp)
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def _read_config(path: Path) -> tuple[dict, ModelConfig]:
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise PicochatError(f"corrupt run dir {path}: {CONFIG} is unreadable ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise PicochatError(f"corrupt run dir {path}: {CONFIG} has no \"model\" object")
    try:
        return meta, ModelConfig.from_dict(meta["model"])
    except PicochatError as e:
        raise PicochatError(f"corrupt run dir {path}: {CONFIG}: {e}") from None


def _recover(path: Path) -> Path:
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():  # a crash between the two renames of save_run
        os.replace(old, path)
    if path.is_file():
        raise PicochatError(f"{path} is a file, not a run dir (a run dir is the directory a training stage "
                            "wrote, with model.safetensors and config.json)")
    if not path.is_dir():
        raise PicochatError(f"run dir {path} does not exist")
    return path


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl, one object per line. A torn last line (a kill during an append) is dropped
    with a warning; a bad line before the last one is corruption."""
    file = Path(path) / METRICS
    if not file.is_file():
        return []
    lines = [line for line in file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                log(f"warning: {file}: its last line is incomplete (a run killed while writing it); ignored")
                break
            raise PicochatError(f"corrupt run dir {path}: {METRICS} line {i + 1} is not a JSON object ({e})") from None
        out.append(row)
    return out


def load_run(path: str | Path, device: torch.device | str = "cpu", trainer_state: bool = False,
             int8: bool = False, adapter: str = "merge") -> RunDir:
    """Load and validate a run dir. Anything missing, truncated or inconsistent is a PicochatError.
    An INT8 run dir (`picochat quantize`) loads straight into the int8 model; int8=True quantizes a
    float one after loading (int8.quantize_model), and is a no-op for one that already is. An
    unmerged LoRA run's adapter is merged into the weights as they load, or with adapter="keep"
    (resuming its training) returned beside the base model as RunDir.adapter."""
    path = _recover(Path(path))
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (path / name).is_file():
            raise PicochatError(f"corrupt run dir {path}: {name} is missing")
    meta, config = _read_config(path)
    quant = meta.get("quantization")
    if quant and (not isinstance(quant, dict) or quant.get("method") != int8lib.METHOD):
        raise PicochatError(f"run dir {path}: unknown quantization {quant!r} in {CONFIG}")
    if quant and trainer_state:
        raise PicochatError(f"run dir {path} is INT8-quantized (inference only): it has no trainer "
                            "state and cannot be resumed or trained")
    tokenizer = Tokenizer.load(path / TOKENIZER)
    check_tokenizer(tokenizer, config, meta, where=str(path))
    try:
        weights = load_file(path / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as e:
        raise PicochatError(f"corrupt run dir {path}: {WEIGHTS} cannot be read ({e})") from None
    with torch.device("meta"):
        model = GPT(config)
        if quant:
            int8lib.quantized_skeleton(model, bool(quant.get("embeddings")))
    # an INT8 run dir's dtypes are part of its layout (a float tensor there would be cast silently)
    expected = {k: (v.shape, v.dtype if quant else None) for k, v in model.state_dict().items()}
    got = {k: (v.shape, v.dtype if quant else None) for k, v in weights.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:3]
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:3]
        raise PicochatError(f"corrupt run dir {path}: weights do not match config.json "
                            f"(missing {missing}, wrong shape or dtype {wrong})")
    model = model.to_empty(device=device)
    model.load_state_dict(weights)
    lora = meta.get("lora")
    adapters = None
    if lora and not lora.get("merged", True):
        from .lora import Adapters
        try:
            tensors = load_file(path / ADAPTER)
        except (SafetensorError, OSError, ValueError) as e:
            raise PicochatError(f"corrupt run dir {path}: {ADAPTER} cannot be read ({e})") from None
        adapters = Adapters.from_saved(model, lora, tensors, str(path))
        if adapter != "keep":  # the model as loaded has it merged in (a re-save, as quantize's, says so)
            model.load_state_dict(adapters.merged_state(model))
            meta["lora"], adapters = {**lora, "merged": True}, None
    if quant:
        int8lib.finish_loading(model)
    elif int8:
        int8lib.quantize_model(model)
        meta["quantized_on_load"] = True  # evals file their results apart from the fp32 model's
    model.set_rotary(2 * config.sequence_len, device=device)
    state = None
    if trainer_state:
        if not (path / TRAINER).is_file():
            raise PicochatError(f"run dir {path} has no {TRAINER}: it cannot be resumed")
        try:
            state = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a truncated pickle
            raise PicochatError(f"corrupt run dir {path}: {TRAINER} cannot be read ({e})") from None
    return RunDir(path, model, tokenizer, meta, state, read_metrics(path), adapters)


def check_tokenizer(tokenizer: Tokenizer, config: ModelConfig, meta: dict | None = None, where: str = "") -> None:
    """A model only works with the tokenizer it was trained with: same size, same merges."""
    if tokenizer.vocab_size != config.vocab_size:
        raise PicochatError(f"tokenizer does not match the checkpoint {where}: vocab size "
                            f"{tokenizer.vocab_size} vs the model's {config.vocab_size}")
    fp = (meta or {}).get("tokenizer_fingerprint")
    if fp and fp != tokenizer.fingerprint():
        raise PicochatError(f"tokenizer does not match the checkpoint {where}: different merges "
                            "(fingerprint mismatch)")
