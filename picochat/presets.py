"""The speedrun's recipes, one row each: the model, the pretraining data and budget, and the data
mixtures and steps of every later stage. `picochat speedrun --preset NAME` runs a row; the
README's table is this one.

Mixture specs name tasks (tasks/registry.py) with `{data}` for the data dir, weights as multiples
of a task or `=N` examples (tasks/mixture.py). Steps of 0 mean: pretraining, `tokens_params_ratio`
tokens per parameter; midtraining and SFT, one pass over their mixture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .common import format_count
from .config import ModelConfig
from .data.datasets import DATASETS
from .tasks.registry import EVALS

# nanochat's chat stages (its mid_train.py, chat_sft.py, chat_rl.py), as the d8/d12/d20 recipes use them
NANOCHAT_MID = ("smoltalk:{data}/smoltalk:1,mmlu:{data}/mmlu:1,gsm8k:{data}/gsm8k:1,identity::20,"
                "spelling:{data}/words/words_alpha.txt:2")
NANOCHAT_SFT = ("arc-easy:{data}/arc:1,arc-challenge:{data}/arc:1,gsm8k:{data}/gsm8k:1,smoltalk:{data}/smoltalk:=10000,"
                "identity::20,spelling:{data}/words/words_alpha.txt:=600")
# the offline presets: the built-in identity set, arithmetic that needs the calculator, and questions
# on the same Python documentation the model was pretrained on
OFFLINE_CHAT = "identity::100,arithmetic::0.5,pydocs::2"
# every dataset an eval reads: CORE's bundle and the chat evals'
EVAL_DATASETS = ("core", *dict.fromkeys(s.dataset for s in EVALS.values() if s.dataset))
CHARS_PER_TOKEN = 4.8  # nanochat's tokenizer on FineWeb-Edu: for how many shards a budget needs


@dataclass(frozen=True)
class Preset:
    name: str
    about: str  # what it is meant for
    depth: int
    seq_len: int
    vocab_size: int
    batch_size: int  # rows per micro-batch (pretraining)
    total_batch_tokens: int  # tokens per optimizer step
    pretrain_steps: int = 0  # 0: tokens_params_ratio tokens per parameter
    tokens_params_ratio: float = 20.0
    window_pattern: str = "SSSL"
    pretrain_data: str = "builtin"  # the offline corpus, or a shard dataset (fineweb-edu, climbmix)
    tokenizer_chars: int = 2_000_000_000  # text the tokenizer trains on, at most
    eval_every: int = 250  # validation bpb every N pretraining steps
    eval_tokens: int = 1 << 20
    mid_data: str = OFFLINE_CHAT
    mid_steps: int = 0
    mid_rows: int = 16  # rows per midtraining micro-batch
    mid_accum: int = 1
    sft_data: str = OFFLINE_CHAT
    sft_steps: int = 0
    sft_rows: int = 16
    sft_accum: int = 1
    sft_lr_scale: float | None = None  # None: SFT's own default
    rl_task: str = ""  # "": no RL stage
    rl_steps: int = 0
    rl_prompts: int = 16
    rl_group: int = 16
    rl_rows: int = 0  # training rows per micro-batch (0: the whole step's prompts x group)
    rl_max_tokens: int = 256
    eval_limits: tuple = (None, None, None)  # examples per eval: categorical, generative, CORE task (None: all)
    mps_dtype: str = "auto"  # the precision on an Apple GPU (the MacBook recipe trained in bf16)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_depth(self.depth, vocab_size=self.vocab_size, sequence_len=self.seq_len,
                                      window_pattern=self.window_pattern)

    @property
    def params(self) -> int:
        return self.model_config().num_params()

    @property
    def steps(self) -> int:
        return self.pretrain_steps or max(1, round(self.tokens_params_ratio * self.params / self.total_batch_tokens))

    @property
    def tokens(self) -> int:
        return self.steps * self.total_batch_tokens

    @property
    def shards(self) -> int:
        """Pretraining shards to fetch: the budget's characters with a tenth to spare, and one
        more that validation takes."""
        if self.pretrain_data == "builtin":
            return 0
        per_shard = DATASETS[self.pretrain_data].source.chars_per_shard
        return math.ceil(self.tokens * CHARS_PER_TOKEN * 1.1 / per_shard) + 1

    @property
    def downloads(self) -> bool:
        """Whether it trains on datasets it must fetch (the offline presets read the data dir's
        eval sets only if they happen to be there)."""
        return self.pretrain_data != "builtin"

    @staticmethod
    def chat_accum(accum: int, world: int) -> int:
        """A chat stage's micro-batches per process: its recipe's batch is of one process, so
        that more processes keep the same global batch."""
        return max(1, accum // world)

    @property
    def rl_micro_rows(self) -> int:
        return self.rl_rows or self.rl_prompts * self.rl_group

    def datasets(self, evals: bool = False) -> list[str]:
        """The datasets its stages read; with `evals`, and those of its evals (a downloading
        preset runs them all: CORE and every chat eval)."""
        specs = " ".join((self.mid_data, self.sft_data, self.rl_task))
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

    def miniature(self) -> Preset:
        """The same stages and data mixtures at toy scale: a check of the pipeline and the data, in
        minutes on a CPU, before spending days on the real thing."""
        return dataclasses.replace(
            self, name=f"{self.name} (miniature)", depth=2, seq_len=128, vocab_size=512, batch_size=4,
            total_batch_tokens=1024, pretrain_steps=8, window_pattern="SL", tokenizer_chars=2_000_000, eval_every=4,
            eval_tokens=4096, mid_steps=4, mid_rows=4, mid_accum=1, sft_steps=4, sft_rows=4, sft_accum=1,
            rl_steps=min(self.rl_steps, 2), rl_prompts=2, rl_group=4, rl_max_tokens=32, eval_limits=(8, 2, 4))


PRESETS = {p.name: p for p in [
    Preset("smoke", "a one-minute check of the pipeline", depth=2, seq_len=128, vocab_size=512, batch_size=4,
           total_batch_tokens=512, pretrain_steps=10, eval_every=5, eval_tokens=2048, mid_steps=5, sft_steps=5, sft_lr_scale=0.5,
           rl_task="arithmetic::1", rl_steps=2, rl_prompts=4, rl_group=4, rl_max_tokens=64, eval_limits=(10, 2, 4)),
    # tiny is sized for 2 CPU cores: measured 11m21s with native bf16, 15m46s and 19m57s in fp32
    Preset("tiny", "a 2-core CPU, offline (the default): 11 min with native bf16, 15-20 without", depth=4, seq_len=256, vocab_size=4096,
           batch_size=16, total_batch_tokens=8192, pretrain_steps=150, eval_every=25, eval_tokens=32768,
           mid_steps=40, sft_steps=150, sft_lr_scale=0.5, rl_task="arithmetic::1", rl_steps=30, rl_prompts=8, rl_group=8,
           rl_max_tokens=64, eval_limits=(200, 20, 40)),
    Preset("small", "a laptop GPU or an M-series Mac, offline", depth=6, seq_len=512, vocab_size=8192, batch_size=16,
           total_batch_tokens=32768, pretrain_steps=1000, eval_every=100, mid_steps=200, sft_steps=600, sft_lr_scale=0.5,
           rl_task="arithmetic::1", rl_steps=100, rl_prompts=8, rl_group=16, rl_max_tokens=64,
           eval_limits=(500, 50, 200)),
    Preset("d8", "one GPU: nanochat's recipe at depth 8", depth=8, seq_len=1024, vocab_size=32768, batch_size=16,
           total_batch_tokens=131072, pretrain_data="fineweb-edu", mid_data=NANOCHAT_MID, mid_rows=16, mid_accum=8,
           sft_data=NANOCHAT_SFT, sft_rows=8, sft_accum=4, rl_task="gsm8k:{data}/gsm8k:1", rl_steps=467, rl_rows=8),
    Preset("d12", "one big GPU: nanochat's recipe at depth 12", depth=12, seq_len=2048, vocab_size=65536,
           batch_size=16, total_batch_tokens=524288, pretrain_data="fineweb-edu", mid_data=NANOCHAT_MID, mid_rows=16,
           mid_accum=16, sft_data=NANOCHAT_SFT, sft_rows=8, sft_accum=4, rl_task="gsm8k:{data}/gsm8k:1",
           rl_steps=467, rl_rows=8),
    Preset("d20", "an 8-GPU node: nanochat's d20 speedrun (561M)", depth=20, seq_len=2048, vocab_size=65536,
           batch_size=32, total_batch_tokens=524288, pretrain_data="fineweb-edu", mid_data=NANOCHAT_MID, mid_rows=32,
           mid_accum=8, sft_data=NANOCHAT_SFT, sft_rows=8, sft_accum=4, rl_task="gsm8k:{data}/gsm8k:1",
           rl_steps=467, rl_rows=8),
    # the MacBook Air model card: 16 x 1024, 8/8 heads, context 1024, vocab 65,536; ~442M tokens of
    # FineWeb-Edu pretraining (54,000 steps of 8 x 1024 tokens; the card's ~60,000 steps were of
    # about 7,400), ~33M tokens of midtraining on pretraining text and conversations, then 1,000 SFT
    # steps at batch 8; bf16 on MPS; no RL
    Preset("picochat-335m", "a 16 GB Apple-silicon Mac: the MacBook Air model (335M), about 6 days", depth=16,
           seq_len=1024, vocab_size=65536, batch_size=8, total_batch_tokens=8192, pretrain_steps=54_000,
           window_pattern="L", pretrain_data="fineweb-edu", eval_every=2000, eval_tokens=1 << 18,
           mid_data="text:{data}/fineweb-edu:1," + NANOCHAT_MID, mid_steps=4_000, mid_rows=8,
           sft_data=("smoltalk:{data}/smoltalk:=10000,gsm8k:{data}/gsm8k:1,arc-easy:{data}/arc:1,"
                     "arc-challenge:{data}/arc:1,identity::=1000,spelling:{data}/words/words_alpha.txt:=600"),
           sft_steps=1000, sft_rows=8, mps_dtype="bf16"),
]}


def preset_table() -> str:
    """The README's table of presets, made from PRESETS (tests/test_speedrun.py keeps them equal)."""
    def steps(n: int) -> str:
        return f"{n:,}" if n else "one pass"

    rows = ["| preset | model | context / vocab | pretraining | mid / SFT steps | RL | meant for |",
            "|---|---|---|---|---|---|---|"]
    for p in PRESETS.values():
        data = "offline corpus" if not p.downloads else p.pretrain_data
        rl = f"{p.rl_steps} steps, {p.rl_task.split(':')[0]}" if p.rl_task else "none"
        rows.append(f"| `{p.name}` | depth {p.depth}, {p.params / 1e6:.1f}M | {p.seq_len:,} / {p.vocab_size:,} "
                    f"| {data}: {p.steps:,} steps x {p.total_batch_tokens:,} = {format_count(p.tokens)} tokens "
                    f"| {steps(p.mid_steps)} / {steps(p.sft_steps)} | {rl} | {p.about} |")
    return "\n".join(rows)
