"""`picochat speedrun --preset NAME`: a recipe of presets.py from data to report card, in one command.

    data -> corpus -> tokenizer -> base (+ evals) -> mid (+ evals) -> sft (+ evals) -> rl (+ evals) -> report

The offline presets (smoke, tiny, small) need no network and no data: they pretrain on the text
this machine already has (the installed Python's documentation and docstrings) and teach the chat
stages identity, arithmetic with the calculator, and questions on that same documentation. The
download presets (d8, d12, d20, picochat-335m) first fetch what the data dir lacks, then train on
FineWeb-Edu, SmolTalk, MMLU, GSM8K and ARC as their recipes say.

The plan comes first (plan.py; --dry-run prints it and stops). Each step that finishes is recorded
in <save>/speedrun.json, so --resume after a kill anywhere skips what is done and resumes the
training stage that was running from its last checkpoint. The last line says how to talk to the
model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from .common import PicochatError, autocast, choose_device, choose_dtype, log, write_atomic
from .conversation import render_for_completion
from .data.datasets import data_dir, dataset_path, is_present, shard_files
from .data.sources import TEXT_FILES
from .fp8 import fp8_problem
from .inference import LoadOptions, open_for_inference
from .lora import LoraConfig
from .presets import PRESETS, Preset
from .settings import check, flags_of, leaves, setting
from .train.stage import Controls

STATE_FILE = "speedrun.json"
SAMPLE_PROMPTS = ["The", "In Python, a list", "The function returns", "If the file"]
CHAT_PROMPTS = ["Who are you?", "What is 4821 * 377?", "What is the capital of France?"]
SPEEDRUN_RUN_FLAGS = ("seed", "device", "dtype", "compile", "fp8", "grad_checkpoint", "wandb", "resume", "overwrite")


@dataclass
class SpeedrunConfig:
    preset: str = setting("tiny", "the recipe (presets.py; the README's table): "
                          + "; ".join(f"{p.name}: {p.about}" for p in PRESETS.values()), choices=tuple(PRESETS))
    miniature: bool = setting(False, "the preset's stages and data at toy scale (depth 2, a few steps): a check of "
                                     "the pipeline and its downloads in minutes on a CPU")
    dry_run: bool = setting(False, "print the plan (stages, data, steps, memory, time here) and stop; writes and "
                                   "downloads nothing", defines_run=False)
    measure_steps: int = setting(1, "training steps the dry run times on this device for its time estimate "
                                    "(0: none)", low=0, defines_run=False)
    data: list[str] | None = setting(None, f"your own text to pretrain on instead of the preset's: {TEXT_FILES}")
    data_dir: str | None = setting(None, "where datasets live and are downloaded to (default: $PICOCHAT_DATA, "
                                         "else ~/.cache/picochat/data); the offline presets also run every eval "
                                         "whose data is there", defines_run=False)
    save: str = setting("runs/speedrun", "output directory", defines_run=False)
    steps: int = setting(0, "pretraining steps (default: the preset's)", low=0)
    lora: int | None = setting(None, "fine-tune (SFT, and RL) through LoRA adapters of this rank on the frozen "
                                     "model, merged into its run dirs, instead of training every weight "
                                     "(default: every weight)", low=1, metavar="RANK")
    usd_per_hour: float | None = setting(None, "the machine's price, for the report's cost column (default: a "
                                               "guess for the device)", low=0, defines_run=False)
    controls: Controls = setting(factory=Controls, flags=SPEEDRUN_RUN_FLAGS)


def chosen_preset(cfg: SpeedrunConfig) -> Preset:
    preset = PRESETS[cfg.preset]
    if cfg.miniature:
        preset = preset.miniature()
    if cfg.steps:
        preset = dataclasses.replace(preset, pretrain=dataclasses.replace(preset.pretrain, steps=cfg.steps))
    if cfg.lora:
        lora = LoraConfig(lora=cfg.lora)
        preset = dataclasses.replace(preset, sft=dataclasses.replace(preset.sft, adapters=lora),
                                     rl=preset.rl and dataclasses.replace(preset.rl, adapters=lora))
    return preset


def speedrun(cfg: SpeedrunConfig):
    """Run the preset (or, with dry_run, return its plan); returns the report's path."""
    from .plan import make_plan
    check(cfg)
    preset = chosen_preset(cfg)
    device = distributed.local_device(choose_device(cfg.controls.device))
    dtype_name = preset.mps_dtype if device.type == "mps" and cfg.controls.dtype == "auto" else cfg.controls.dtype
    dtype = choose_dtype(dtype_name, device)
    root = data_dir(cfg.data_dir)
    world = distributed.setup(device)[1]
    text_chars = _text_chars(cfg.data) if cfg.data or not preset.downloads else None
    if cfg.dry_run:
        plan = make_plan(preset, root, device, dtype, world, cfg.measure_steps, text_chars, bool(cfg.data))
        plan.next = (f"picochat speedrun --preset {cfg.preset}" + (" --miniature" if cfg.miniature else "")
                     + (f" --lora {cfg.lora}" if cfg.lora else "")
                     + (f" --data-dir {cfg.data_dir}" if cfg.data_dir else "") + f" --save {cfg.save}")
        return plan
    record = SpeedrunRecord.open(Path(cfg.save), cfg)
    plan = make_plan(preset, root, device, dtype, world, 0, text_chars, bool(cfg.data))
    log(plan.describe())
    record.notes["plan"] = {s.name: s.train.to_dict() for s in plan.stages if s.train is not None}
    return Speedrun(cfg, preset, plan, record, dtype_name).run()


def shown(result) -> str:
    """What the command prints: the plan of a dry run, else where the report is."""
    if isinstance(result, Path):
        return f"report: {result}"
    return f"{result.describe()}\n\nNext: {result.next}"


def _text_chars(paths: list[str] | None) -> int:
    """Characters of the pretraining text: the user's files, or the offline corpus's cap."""
    if not paths:
        from .data.builtin import CORPUS_CHARS
        return CORPUS_CHARS
    from .data.sources import list_files
    return sum(p.stat().st_size for p in list_files(paths))


@dataclass
class SpeedrunRecord:
    """<save>/speedrun.json: the settings that define the run and every step done, with its time."""
    path: Path
    settings: dict
    done: dict  # step -> seconds
    notes: dict  # the plan, and what later steps need: the text, samples, answers

    @classmethod
    def open(cls, out: Path, cfg: SpeedrunConfig) -> SpeedrunRecord:
        settings = {leaf.field.name: getattr(leaf.holder, leaf.field.name) for leaf in leaves(cfg) if leaf.defines_run}
        path = out / STATE_FILE
        if cfg.controls.resume:
            if not path.is_file():
                raise PicochatError(f"--resume: nothing to resume in {out} (no {STATE_FILE}); start it without "
                                    "--resume")
            saved = json.loads(path.read_text())
            flags = flags_of(SpeedrunConfig)
            differ = [f"{flags[k]} {settings[k]!r} (the run has {saved['settings'][k]!r})"
                      for k in settings if k in saved["settings"] and saved["settings"][k] != settings[k]]
            if differ:
                raise PicochatError(f"--resume: {out} is another run: {'; '.join(differ)}. Give the same settings, or "
                                    "another --save")
            log(f"resuming the speedrun in {out}: done {', '.join(saved['done']) or 'nothing yet'}")
            return cls(path, settings, saved["done"], saved["notes"])
        if out.exists():
            if not cfg.controls.overwrite:
                raise PicochatError(f"{out} already exists (use --resume to continue it, or --overwrite to replace it)")
            if distributed.is_main():
                shutil.rmtree(out)
        distributed.barrier()
        record = cls(path, settings, {}, {})
        record.write()
        return record

    def write(self) -> None:
        if distributed.is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps({"settings": self.settings, "done": self.done, "notes": self.notes},
                                               indent=1))


class Speedrun:
    def __init__(self, cfg: SpeedrunConfig, preset: Preset, plan, record: SpeedrunRecord, dtype: str):
        self.cfg, self.preset, self.plan, self.record = cfg, preset, plan, record
        self.out, self.root = Path(cfg.save), plan.data_root
        self.dtype = dtype  # the precision's name (the MacBook recipe's bf16 on MPS)

    def run(self) -> Path:
        p = self.preset
        steps = [("data", self.fetch_data)] if p.downloads else []
        steps += [("corpus", self.corpus), ("tokenizer", self.tokenizer),
                 ("pretrain", self.pretrain), ("base evals", lambda: self.evaluate("base"))]
        if p.mid is not None:
            steps += [("mid", lambda: self.chat_stage("mid")), ("mid evals", lambda: self.evaluate("mid"))]
        steps += [("sft", lambda: self.chat_stage("sft")), ("sft evals", lambda: self.evaluate("sft"))]
        if p.rl is not None:
            steps += [("rl", self.rl), ("rl evals", lambda: self.evaluate("rl"))]
        t_all = time.perf_counter()
        for i, (name, fn) in enumerate(steps, 1):
            if name in self.record.done:
                log(f"speedrun [{i}/{len(steps)}] {name}: done before, skipped")
                continue
            log(f"speedrun [{i}/{len(steps)}] {name}")
            t0 = time.perf_counter()
            fn()
            self.record.done[name] = round(time.perf_counter() - t0, 1)
            self.record.write()
        report = self.report()
        final = "rl" if p.rl is not None else "sft"
        log(f"speedrun done in {time.perf_counter() - t_all:.0f}s: report at {report}")
        log(f"Next: picochat chat --load {self.out / final}   (or: picochat serve --load {self.out / final})")
        return report

    # ------------------------------------------------------------------ steps

    def controls(self, stage: str, **kw) -> Controls:
        """The controls of a training stage: the speedrun's own, --grad-checkpoint where the plan
        says the stage needs it, and a resume of the stage's run dir if a kill left one."""
        r = self.cfg.controls
        resume = (self.out / stage / "config.json").is_file()
        fit = self.plan.fits.get(stage)
        ckpt = r.grad_checkpoint or bool(fit and fit.grad_checkpoint)
        if ckpt and not r.grad_checkpoint:
            log(f"{stage}: --grad-checkpoint on: {fit.describe()}")
        return dataclasses.replace(r, dtype=self.dtype, grad_checkpoint=ckpt, resume=resume, overwrite=not resume,
                                   given=None, **kw)

    def config(self, stage: str, **controls):
        """The stage's config from the preset, as the plan planned it, with the speedrun's controls."""
        cfg = self.preset.configs(self.out, self.root, distributed.world_size(), self.record.notes.get("text"))[stage]
        return dataclasses.replace(cfg, controls=self.controls(stage, **controls))

    def fetch_data(self) -> None:
        from .data.download import DownloadConfig, download
        missing = [d.name for d in self.plan.data if not d.present]
        if not missing:
            return
        if distributed.world_size() > 1:
            raise PicochatError(f"the data dir {self.root} lacks {', '.join(missing)}: download it first, in one "
                                f"process: picochat data download {' '.join(missing)} --data-dir {self.root} "
                                f"--num-shards {self.preset.shards}")
        log(f"data: fetching {', '.join(missing)} ({self.plan.download_mb:,.0f} MB) into {self.root}")
        download(DownloadConfig(names=missing, data_dir=str(self.root), num_shards=max(1, self.preset.shards)))

    def corpus(self) -> None:
        if self.cfg.data:
            text = list(self.cfg.data)
        elif not self.preset.downloads:
            from .data.builtin import build_builtin_corpus
            log("building the offline corpus from this machine's Python documentation")
            with distributed.main_first():
                text = [str(p) for p in build_builtin_corpus(self.out / "corpus")]
        else:
            shards = shard_files(self.preset.pretrain_data, self.root)
            if len(shards) < self.preset.shards:
                raise PicochatError(f"{self.preset.pretrain_data}: {len(shards)} shards in {self.root}, the run needs "
                                    f"{self.preset.shards}: picochat data download {self.preset.pretrain_data} "
                                    f"--num-shards {self.preset.shards}")
            text = [str(p) for p in shards[:self.preset.shards]]
        self.record.notes["text"] = text

    def tokenizer(self) -> None:
        from .tokenizer import train_tokenizer
        with distributed.main_first():
            if distributed.is_main():
                train_tokenizer(self.record.notes["text"], self.preset.pretrain.vocab_size,
                                save=str(self.out / "tokenizer.json"), max_chars=self.preset.tokenizer_chars)

    def pretrain(self) -> None:
        from .train.pretrain import pretrain
        pretrain(self.config("pretrain", fp8=self.fp8()))

    def fp8(self) -> bool | None:
        """--fp8 as typed; else the preset's preference where the GPU has FP8, with one warning
        line where it has not."""
        asked = self.cfg.controls.fp8
        if asked is not None or not self.preset.fp8:
            return asked
        problem = fp8_problem(self.plan.device)
        if problem:
            log(f"warning: the {self.preset.name} preset pretrains in FP8 where the GPU has it, and {problem}: "
                "pretraining in bf16")
        return problem is None

    def chat_stage(self, stage: str) -> None:
        from .train.sft import chat_train
        chat_train(self.config(stage, log_every=10))

    def rl(self) -> None:
        from .train.rl import rl_train
        rl_train(self.config("rl", log_every=max(1, self.preset.rl.steps // 10), compile=False))

    def evaluate(self, stage: str) -> None:
        """A stage's evals, saved into its run dir for the report card (rank 0; the others wait):
        CORE and greedy samples for the base model; for the chat stages every chat eval whose data
        is in the data dir (the built-in ones always) and greedy answers to a few prompts."""
        if distributed.is_main():
            notes = _evaluate(self.out / stage, self.root, self.preset.eval_limits, self.cfg.controls.device, self.dtype)
            self.record.notes.setdefault("answers", {})[stage] = notes
        distributed.barrier()

    def report(self) -> Path:
        from .report import report_card, table
        from .tasks.pydocs import sample_questions
        references = dict(sample_questions())
        notes = self.record.notes
        stages = [s for s in ("base", "mid", "sft", "rl") if (self.out / s / "config.json").is_file()]
        answers = {s: a for s, a in notes.get("answers", {}).items() if s != "base"}
        samples = notes.get("answers", {}).get("base", {})
        prompts = CHAT_PROMPTS + list(references)
        text = notes.get("text", [])
        extra = {
            "Samples from the base model (greedy)": "\n".join(f"- `{p}` → {s[len(p):]!r}" for p, s in samples.items()),
            "Chat answers (greedy, calculator on)": table(
                ["prompt"] + [s.upper() for s in answers],
                [[f"`{p}`"] + [repr(a.get(p, "")) for a in answers.values()] for p in prompts])
            + "\n\nThe Python questions are held out of training; their documentation says:\n"
            + "\n".join(f"- {q} {a}" for q, a in references.items()),
            "Data": f"{len(text)} source(s): " + ", ".join(f"`{p}`" for p in text[:8])
                    + (f" and {len(text) - 8} more" if len(text) > 8 else "") + f"; datasets from `{self.root}`",
        }
        title = f"picochat speedrun — preset `{self.preset.name}`"
        return report_card([self.out / s for s in stages], self.out / "report.md", title=title,
                           usd_per_hour=self.cfg.usd_per_hour, extra=extra, timings=dict(self.record.done))


def _evaluate(run_dir: Path, root: Path, limits: tuple, device: str, dtype: str) -> dict[str, str]:
    from .decode_batch import GenRequest
    from .engine import Engine
    from .evals.chat_eval import build_eval_task, evaluate_task
    from .sample import SamplingOptions, continuations
    from .tasks.pydocs import sample_questions
    from .tasks.registry import EVALS
    categorical, generative, core = limits
    run = open_for_inference(LoadOptions(str(run_dir), device=device, dtype=dtype))
    if run.meta["stage"] == "base":
        if is_present("core", root):
            from .evals.core import run_core
            run_core(run, dataset_path("core", root), limit=core)
        greedy = SamplingOptions(temperature=0.0, max_tokens=48)
        return {p: continuations(run, p, greedy)[0] for p in SAMPLE_PROMPTS}
    for name, spec in EVALS.items():
        if spec.dataset and not is_present(spec.dataset, root):
            continue
        # the built-in evals are cheap (short replies) and the ones that always run: take more
        limit = categorical if spec.kind == "categorical" else \
            (max(generative or 0, 100) if generative and not spec.dataset else generative)
        path = dataset_path(spec.dataset, root) if spec.dataset else None
        evaluate_task(run, name, build_eval_task(name, str(path) if path else None), limit=limit)
    prompts = CHAT_PROMPTS + [q for q, _ in sample_questions()]
    requests = [GenRequest(render_for_completion(run.tokenizer, {"messages": [{"role": "user", "content": p}]}),
                           max_tokens=64, temperature=0.0, key=p) for p in prompts]
    with autocast(run.device, run.decode_dtype):
        answers = {p: c[0].text for p, c in Engine(run.model, run.tokenizer).complete(requests)}
    return {p: answers[p] for p in prompts}

