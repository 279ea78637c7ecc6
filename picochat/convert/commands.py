"""`picochat export` and `picochat import`: a run dir to a transformers directory, and a
transformers directory or a nanochat checkpoint dir, local or on the Hub, to a run dir. Either writes
its output under a temporary name and renames it into place, so a failure leaves nothing
half-written."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common import PicochatError, log
from ..settings import check, setting
from .source import FORMATS

STAGES = ("base", "mid", "sft", "rl")


@dataclass
class ExportConfig:
    load: str = setting(help="the run dir to export (an INT8 one is dequantized)")
    save: str = setting(help="the directory to write: AutoModelForCausalLM.from_pretrained(DIR) loads it")
    format: str = setting("hf", "hf: a transformers model directory", choices=("hf",))
    dtype: str = setting("fp32", "the precision of the saved weights", choices=("fp32", "bf16"))
    overwrite: bool = setting(False, "replace an existing --save directory")
    push: str | None = setting(None, "then upload it to this Hub model repo, created if missing, through the Hub's "
                                     "own client (HF_TOKEN or `hf auth login` authenticates; HF_ENDPOINT names "
                                     "another Hub)", metavar="USER/NAME")


@dataclass
class ImportConfig:
    load: str = setting(help="the directory to import, or a Hub model repo, downloaded into the Hub client's cache "
                             "(HF_ENDPOINT names another Hub, HF_TOKEN reads private and gated repos)",
                        metavar="DIR|OWNER/NAME[@REVISION]")
    save: str = setting(help="the run dir to write")
    format: str | None = setting(None, "hf: a transformers NanoChat (or picochat-exported) directory; nanochat: a "
                                       "nanochat checkpoint dir (model_NNNNNN.pt, meta_NNNNNN.json, tokenizer.pkl) "
                                       "(default: what its files are)", choices=FORMATS)
    stage: str | None = setting(None, "which stage the model is, for the evals and the report (default: what the "
                                      "directory says, else from a nanochat dir's name, else sft)",
                                choices=STAGES)
    step: int = setting(0, "nanochat: the checkpoint's step (0: the last)", low=0)
    tokenizer: str | None = setting(None, "nanochat: its tokenizer.pkl (default: in the dir or a tokenizer/ dir "
                                          "above it)")
    overwrite: bool = setting(False, "replace an existing --save run dir")


def _fresh(save: Path, overwrite: bool) -> Path:
    """The temporary directory next to `save` that will become it."""
    if save.exists() and not overwrite:
        raise PicochatError(f"{save} already exists (use --overwrite to replace it)")
    tmp = save.with_name(save.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _into_place(tmp: Path, save: Path) -> None:
    if save.exists():
        shutil.rmtree(save)
    tmp.rename(save)


def float_weights(model) -> dict[str, torch.Tensor]:
    """The model's weights in fp32, an INT8 model's dequantized."""
    state = {k: v.float() for k, v in model.state_dict().items() if v.is_floating_point()}
    for name, module in model.named_modules():
        if hasattr(module, "dequantize"):
            for key in [k for k in state if k.startswith(f"{name}.")]:
                del state[key]
            state[f"{name}.weight"] = module.dequantize().float()
    return state


def export(cfg: ExportConfig) -> Path:
    from ..data.hub import check_repo_id
    from ..run_dir import load_run
    from .hf import write_dir
    from .layout import NATIVE, REMOTE, why_remote
    check(cfg)
    if cfg.push:
        check_repo_id(cfg.push)
    run = load_run(cfg.load, "cpu")
    if run.meta.get("quantization"):
        log(f"export: {cfg.load} is INT8: its weights are dequantized to {cfg.dtype} (the quantization error stays)")
    weights = float_weights(run.model)
    reasons = why_remote(run.config, weights)
    architecture = REMOTE if reasons else NATIVE
    if reasons:
        log(f"export: transformers' NanoChat cannot compute this model ({'; '.join(reasons)}): writing picochat's own "
            "architecture, which loads with trust_remote_code=True")
    else:
        log("export: as transformers' NanoChat (model_type nanochat, no remote code), residual scales folded")
    save = Path(cfg.save)
    tmp = _fresh(save, cfg.overwrite)
    tmp.mkdir(parents=True)
    try:
        write_dir(tmp, run.config, weights, run.tokenizer, architecture,
                  torch.bfloat16 if cfg.dtype == "bf16" else torch.float32,
                  {"stage": run.meta.get("stage"), "source": str(cfg.load), "version": run.meta.get("picochat_version"),
                   "model": run.config.to_dict()})
        _into_place(tmp, save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remote = ", trust_remote_code=True" if reasons else ""
    where = str(save)
    log(f"export: wrote {save}")
    if cfg.push:
        from ..data.hub import upload
        log(f"export: uploading {save} to the Hub's {cfg.push}")
        log(f"export: uploaded: {upload(save, cfg.push, f'picochat export of {Path(cfg.load).name}')}")
        where = cfg.push
    log(f"Next: AutoModelForCausalLM.from_pretrained({where!r}{remote}), AutoTokenizer.from_pretrained({where!r}{remote})")
    return save


def import_model(cfg: ImportConfig) -> Path:
    from ..model import GPT
    from ..run_dir import save_run
    check(cfg)
    save = Path(cfg.save)
    if save.exists() and not cfg.overwrite:
        raise PicochatError(f"{save} already exists (use --overwrite to replace it)")
    source = _source(cfg)
    src = Path(source.path)
    if source.format == "hf":
        from .hf import read_dir
        config, weights, tok, said = read_dir(src)
        stage, origin = cfg.stage or said.get("stage") or "sft", {"format": "hf", "path": str(src), **source.origin}
    else:
        from .nanochat import read_checkpoint
        config, weights, tok, said = read_checkpoint(src, source.step, cfg.tokenizer)
        stage = cfg.stage or _nanochat_stage(src)
        origin = {"format": "nanochat", "path": str(src), **source.origin, **said}
    with torch.device("meta"):
        model = GPT(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != got:
        wrong = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))[:3]
        raise PicochatError(f"{src}: its weights do not fit its own config ({', '.join(wrong)})")
    model = model.to_empty(device="cpu")
    model.load_state_dict(weights)
    save_run(save, model, tok, stage=stage, extra={"imported_from": origin})  # atomic: whole or not there
    log(f"import: wrote {save} ({stage}, {model.num_params() / 1e6:.1f}M parameters). Next: picochat chat --load {save}")
    return save


def _source(cfg: ImportConfig):
    """--load as a local folder in a known format, downloading a Hub repo's files first."""
    from ..data.hub import endpoint, model_ref
    from .source import Source, check_format, from_hub
    src = Path(cfg.load)
    if src.exists():
        if not src.is_dir():
            raise PicochatError(f"--load: {src} is not a directory")
        fmt = cfg.format or check_format(str(src), [p.name for p in src.iterdir()], None)
        return Source(str(src), fmt, {}, cfg.step or None)
    ref = model_ref(cfg.load)
    if ref is None:
        raise PicochatError(f"--load: {cfg.load} is neither a directory nor a Hub model repo (OWNER/NAME[@REVISION])")
    log(f"import: {cfg.load} is no local directory: looking for it on the Hub ({endpoint()})")
    return from_hub(*ref, cfg.format, cfg.step or None)


def _nanochat_stage(src: Path) -> str:
    """nanochat's checkpoint dirs say which stage: base_checkpoints, mid_checkpoints,
    chatsft_checkpoints, chatrl_checkpoints."""
    for part in reversed(src.resolve().parts):
        for prefix, stage in (("base", "base"), ("mid", "mid"), ("chatsft", "sft"), ("chatrl", "rl")):
            if part.startswith(prefix + "_checkpoints"):
                return stage
    return "sft"
