"""The speedrun's recipes, one row each: the pretraining data and the configs of its stages.
`picochat speedrun --preset NAME` runs a row; the README's table is this one.

A preset is data: each stage's own config (PretrainConfig, MidtrainConfig, SFTConfig, RLConfig),
with its paths left empty for the speedrun to fill in. The speedrun and the plan read them as they
are, so a stage setting a recipe changes is one keyword here. Mixture specs name tasks
(tasks/registry.py) with `{data}` for the data dir, weights as multiples of a task or `=N`
examples (tasks/mixture.py). Steps of 0 mean: pretraining, `tokens_params_ratio` tokens per
parameter; midtraining and SFT, one pass over their mixture. A chat stage's grad_accum is that of
one process: under torchrun it is divided by the processes, to keep the recipe's global batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .common import format_count
from .config import NANOCHAT_FEATURES, ModelConfig, ModelFeatures
from .data.datasets import DATASETS
from .model import num_params
from .optim import NANOCHAT_OPTIM
from .tasks.registry import EVALS
from .train.pretrain import PretrainConfig, model_config, plan_pretrain
from .train.rl import RLConfig
from .train.sft import MidtrainConfig, SFTConfig
from .train.stage import TrainPlan

# nanochat's chat stages: its October 2025 mid_train.py (as the MacBook recipe used it), and at HEAD
# 92d63d4 chat_sft.py (SmolTalk, MMLU's auxiliary train set 3 times, GSM8K's 4, packed) and chat_rl.py
NANOCHAT_MID = ("smoltalk:{data}/smoltalk:1,mmlu:{data}/mmlu:1,gsm8k:{data}/gsm8k:1,identity::20,"
                "spelling:{data}/words/words_alpha.txt:2")
NANOCHAT_SFT = "smoltalk:{data}/smoltalk:1,mmlu:{data}/mmlu:3,gsm8k:{data}/gsm8k:4"
NANOCHAT_RL = "gsm8k:{data}/gsm8k:1"
# nanochat's SFT optimizer at HEAD: the pretraining one at 0.8 of its rates, no weight decay on the
# matrices, Muon momentum 0.85 -> 0.95 over 300 steps, a 50% warmdown to zero
NANOCHAT_SFT_OPTIM = dataclasses.replace(NANOCHAT_OPTIM, weight_decay=0.0, wd_schedule="constant", muon_momentum=0.95,
                                         muon_momentum_warmup_steps=300, muon_momentum_final=None, warmup_steps=0,
                                         warmdown_frac=0.5, final_lr_frac=0.0)
# the offline presets: the built-in identity set, arithmetic that needs the calculator, and questions
# on the same Python documentation the model was pretrained on
OFFLINE_CHAT = "identity::100,arithmetic::0.5,pydocs::2"
# every dataset an eval reads: CORE's bundle and the chat evals'
EVAL_DATASETS = ("core", *dict.fromkeys(s.dataset for s in EVALS.values() if s.dataset))
CHARS_PER_TOKEN = 4.8  # nanochat's tokenizer on FineWeb-Edu: for how many shards a budget needs


def pretraining(**kw) -> PretrainConfig:
    """A recipe's pretraining: a validation bpb every 250 steps on 1M tokens unless it says."""
    return PretrainConfig(data=[], save="", **{"eval_every": 250, "eval_tokens": 1 << 20, **kw})


def nanochat_pretraining(depth: int, ratio: float = 12, batch: int = 32) -> PretrainConfig:
    """nanochat's base_train at HEAD 92d63d4: its network, optimizer and budget (the batch and the
    rates follow from the model), context 2,048, vocabulary 32,768."""
    return pretraining(depth=depth, sizing="nanochat", seq_len=2048, vocab_size=32768, batch_size=batch,
                       tokens_params_ratio=ratio, budget="nanochat", features=NANOCHAT_FEATURES, optim=NANOCHAT_OPTIM)


def nanochat_sft(pretrain: PretrainConfig) -> SFTConfig:
    """nanochat's chat_sft at HEAD: packed rows of its mixture, one pass, pretraining's batch."""
    rows = pretrain.batch_size
    per_step = plan_pretrain(pretrain, model_config(pretrain, pretrain.vocab_size), 1).tokens_per_step
    return fine_tuning(NANOCHAT_SFT, batch_size=rows, grad_accum=per_step // (rows * pretrain.seq_len), packed=True,
                       lr_scale=0.8, optim=NANOCHAT_SFT_OPTIM)


def midtraining(data: str = OFFLINE_CHAT, **kw) -> MidtrainConfig:
    return MidtrainConfig(load="", data=data, save="", **{"batch_size": 16, **kw})


def fine_tuning(data: str = OFFLINE_CHAT, **kw) -> SFTConfig:
    return SFTConfig(load="", data=data, save="", **{"batch_size": 16, **kw})


def reinforcement(task: str, steps: int, prompts: int = 16, group: int = 16, rows: int = 0, **kw) -> RLConfig:
    """RL as the speedrun runs it: every sampled row decodes at once, `rows` train at a time (0:
    all of them), and no held-out eval of its own (the speedrun evaluates every stage after it)."""
    return RLConfig(load="", task=task, save="", steps=steps, prompts_per_step=prompts, group_size=group,
                    rollout_rows=prompts * group, batch_size=rows or prompts * group, eval_examples=0, **kw)


@dataclass(frozen=True)
class Preset:
    name: str
    about: str  # what it is meant for
    pretrain: PretrainConfig  # its `data` is the speedrun's: pretrain_data below, or --data
    mid: MidtrainConfig | None  # None: no midtraining (nanochat at HEAD goes from pretraining to SFT)
    sft: SFTConfig
    rl: RLConfig | None = None  # None: no RL stage
    pretrain_data: str = "builtin"  # the offline corpus, or a shard dataset (fineweb-edu, climbmix)
    tokenizer_chars: int = 2_000_000_000  # text the tokenizer trains on, at most
    eval_limits: tuple = (None, None, None)  # examples per eval: categorical, generative, CORE task (None: all)
    mps_dtype: str = "auto"  # the precision on an Apple GPU (the MacBook recipe trained in bf16)
    fp8: bool = False  # pretraining in FP8 where the GPU has it (nanochat's speedrun: --fp8)

    def model_config(self) -> ModelConfig:
        return model_config(self.pretrain, self.pretrain.vocab_size)

    @property
    def params(self) -> int:
        return num_params(self.model_config())

    def pretrain_plan(self, world: int = 1) -> TrainPlan:
        return plan_pretrain(self.pretrain, self.model_config(), world)

    @property
    def shards(self) -> int:
        """Pretraining shards to fetch: the budget's characters with a tenth to spare, and one
        more that validation takes."""
        if self.pretrain_data == "builtin":
            return 0
        per_shard = DATASETS[self.pretrain_data].source.chars_per_shard
        return math.ceil(self.pretrain_plan().tokens * CHARS_PER_TOKEN * 1.1 / per_shard) + 1

    @property
    def downloads(self) -> bool:
        """Whether it trains on datasets it must fetch (the offline presets read the data dir's
        eval sets only if they happen to be there)."""
        return self.pretrain_data != "builtin"

    def datasets(self, evals: bool = False) -> list[str]:
        """The datasets its stages read; with `evals`, and those of its evals (a downloading
        preset runs them all: CORE and every chat eval)."""
        specs = " ".join((self.mid.data if self.mid else "", self.sft.data, self.rl.task if self.rl else ""))
        names = [self.pretrain_data] if self.downloads else []
        for name, d in DATASETS.items():
            if "{data}/" + d.place in specs and name not in names:
                names.append(name)
        if evals and self.downloads:
            names += [n for n in EVAL_DATASETS if n not in names]
        return names

    def eval_names(self) -> list[str]:
        """The evals a run of it makes (an offline preset also makes those whose data it finds)."""
        have = self.datasets(evals=True)
        return (["core"] if "core" in have else []) + [n for n, s in EVALS.items() if not s.dataset or s.dataset in have]

    def configs(self, out: Path, data_root: Path, world: int = 1, text: list[str] | None = None) -> dict:
        """Every stage's config as the speedrun runs it (and its plan plans it): run dirs in `out`,
        mixtures read from `data_root`, pretraining on `text`, and a chat stage's accumulation
        divided by the processes (the recipe's global batch is that of one process)."""
        def chat(cfg, load: str, save: str):
            return replace(cfg, load=str(out / load), data=cfg.data.format(data=data_root), save=str(out / save),
                           grad_accum=max(1, cfg.grad_accum // world))
        replace = dataclasses.replace
        configs = {"pretrain": replace(self.pretrain, data=list(text or []), save=str(out / "base"),
                                       tokenizer=str(out / "tokenizer.json"), cache_dir=str(out / "token_cache"))}
        if self.mid is not None:
            configs["mid"] = chat(self.mid, "base", "mid")
        configs["sft"] = chat(self.sft, "mid" if self.mid is not None else "base", "sft")
        if self.rl is not None:
            configs["rl"] = replace(self.rl, load=str(out / "sft"), task=self.rl.task.format(data=data_root),
                                    save=str(out / "rl"))
        return configs

    def miniature(self) -> Preset:
        """The same stages and data mixtures at toy scale: a check of the pipeline and the data, in
        minutes on a CPU, before spending days on the real thing."""
        replace = dataclasses.replace
        rl = self.rl and replace(self.rl, steps=min(self.rl.steps, 2), prompts_per_step=2, group_size=4, max_tokens=32,
                                 rollout_rows=8, batch_size=min(self.rl.batch_size, 8))
        return replace(
            self, name=f"{self.name} (miniature)", tokenizer_chars=2_000_000, eval_limits=(8, 2, 4), rl=rl,
            pretrain=replace(self.pretrain, depth=2, sizing="table", seq_len=128, vocab_size=512, batch_size=4,
                             total_batch_tokens=1024, steps=8, window_pattern="SL", eval_every=4, eval_tokens=4096),
            mid=self.mid and replace(self.mid, steps=4, batch_size=4, grad_accum=1),
            sft=replace(self.sft, steps=4, batch_size=4, grad_accum=1))


PRESETS = {p.name: p for p in [
    Preset("smoke", "a one-minute check of the pipeline",
           pretraining(depth=2, seq_len=128, vocab_size=512, batch_size=4, total_batch_tokens=512, steps=10,
                       eval_every=5, eval_tokens=2048),
           midtraining(steps=5), fine_tuning(steps=5, lr_scale=0.5),
           reinforcement("arithmetic::1", steps=2, prompts=4, group=4, max_tokens=64), eval_limits=(10, 2, 4)),
    # tiny is sized for 2 CPU cores: measured 10m09s with native bf16 (2026-12-04, value embeddings
    # and smear); in fp32 15m46s and 19m57s on two CPUs without, before them
    Preset("tiny", "a 2-core CPU, offline (the default): 10 min with native bf16, 15-20 without",
           pretraining(depth=4, seq_len=256, vocab_size=4096, batch_size=16, total_batch_tokens=8192, steps=150,
                       eval_every=25, eval_tokens=32768),
           midtraining(steps=40), fine_tuning(steps=150, lr_scale=0.5),
           reinforcement("arithmetic::1", steps=30, prompts=8, group=8, max_tokens=64), eval_limits=(200, 20, 40)),
    Preset("small", "a laptop GPU or an M-series Mac, offline",
           pretraining(depth=6, seq_len=512, vocab_size=8192, batch_size=16, total_batch_tokens=32768, steps=1000,
                       eval_every=100),
           midtraining(steps=200), fine_tuning(steps=600, lr_scale=0.5),
           reinforcement("arithmetic::1", steps=100, prompts=8, group=16, max_tokens=64),
           eval_limits=(500, 50, 200)),
    Preset("d8", "one GPU: nanochat's recipe at depth 8 (HEAD)", nanochat_pretraining(8), None,
           nanochat_sft(nanochat_pretraining(8)), reinforcement(NANOCHAT_RL, steps=467, rows=8),
           pretrain_data="climbmix"),
    Preset("d12", "one big GPU: nanochat's recipe at depth 12 (HEAD)", nanochat_pretraining(12), None,
           nanochat_sft(nanochat_pretraining(12)), reinforcement(NANOCHAT_RL, steps=467, rows=8),
           pretrain_data="climbmix"),
    Preset("d20", "an 8-GPU node: nanochat's recipe at depth 20 (HEAD)", nanochat_pretraining(20), None,
           nanochat_sft(nanochat_pretraining(20)), reinforcement(NANOCHAT_RL, steps=467, rows=8),
           pretrain_data="climbmix", fp8=True),
    # nanochat's runs/speedrun.sh at HEAD: d24, 8 tokens per scaling parameter, 16 rows a GPU,
    # ClimbMix, then SFT (its leaderboard's GPT-2 CORE in 1.65 h on 8 x H100, with FP8)
    Preset("gpt2", "an 8-GPU node: nanochat's GPT-2 speedrun (d24, HEAD)", nanochat_pretraining(24, ratio=8, batch=16),
           None, nanochat_sft(nanochat_pretraining(24, ratio=8, batch=16)), pretrain_data="climbmix", fp8=True),
    # the MacBook Air model card: 16 x 1024, 8/8 heads, context 1024, vocab 65,536; ~442M tokens of
    # FineWeb-Edu pretraining (54,000 steps of 8 x 1024 tokens; the card's ~60,000 steps were of
    # about 7,400), ~33M tokens of midtraining on pretraining text and conversations, then 1,000 SFT
    # steps at batch 8; bf16 on MPS; no RL
    Preset("picochat-335m", "a 16 GB Apple-silicon Mac: the MacBook Air model (335M), about 6 days",
           pretraining(depth=16, seq_len=1024, vocab_size=65536, batch_size=8, total_batch_tokens=8192, steps=54_000,
                       window_pattern="L", eval_every=2000, eval_tokens=1 << 18, features=ModelFeatures()),
           midtraining("text:{data}/fineweb-edu:1," + NANOCHAT_MID, steps=4_000, batch_size=8),
           fine_tuning("smoltalk:{data}/smoltalk:=10000,gsm8k:{data}/gsm8k:1,arc-easy:{data}/arc:1,"
                       "arc-challenge:{data}/arc:1,identity::=1000,spelling:{data}/words/words_alpha.txt:=600",
                       steps=1000, batch_size=8),
           pretrain_data="fineweb-edu", mps_dtype="bf16"),
]}


def preset_table() -> str:
    """The README's table of presets, made from PRESETS (tests/test_speedrun.py keeps them equal)."""
    def steps(n: int) -> str:
        return f"{n:,}" if n else "one pass"

    rows = ["| preset | model | context / vocab | pretraining | mid / SFT steps | RL | meant for |",
            "|---|---|---|---|---|---|---|"]
    for p in PRESETS.values():
        data = "offline corpus" if not p.downloads else p.pretrain_data
        rl = f"{p.rl.steps} steps, {p.rl.task.split(':')[0]}" if p.rl else "none"
        plan, c = p.pretrain_plan(), p.pretrain
        mid = steps(p.mid.steps) if p.mid is not None else "none"
        rows.append(f"| `{p.name}` | depth {c.depth}, {p.params / 1e6:.1f}M | {c.seq_len:,} / {c.vocab_size:,} "
                    f"| {data}: {plan.steps:,} steps x {plan.tokens_per_step:,} = {format_count(plan.tokens)} tokens "
                    f"| {mid} / {steps(p.sft.steps)} | {rl} | {p.about} |")
    return "\n".join(rows)
