"""The command line: flags become config dataclasses, and a stage function does the work."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .common import DEVICES, DTYPES, PicochatError, first_line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} (default auto: cuda > mps > cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute dtype (auto: bf16 on CUDA and on CPUs with native bf16, else fp32)")


def _stage_flags(p: argparse.ArgumentParser) -> None:
    """What every training stage (pretrain, midtrain, sft, rl) takes: seed, checkpoints, resume, memory."""
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (and at the end)")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--stop-at", type=int, default=0, help="stop after this step, resumable with --resume")
    p.add_argument("--resume", action="store_true", help="continue the run in --save exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run dir")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute activations in the backward pass: much less memory, ~30%% more compute")


def _int8_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--int8", action="store_true",
                   help="quantize the model's weights to INT8 at load time (see picochat quantize)")


def _sampling_flags(p: argparse.ArgumentParser, temperature: float, max_tokens: int, seed: int | None) -> None:
    p.add_argument("--load", required=True, help="run dir")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--seed", type=int, default=seed)
    _int8_flag(p)
    _common(p)


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, help="text files or directories (.txt, .jsonl, .parquet)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: train one on --data)")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocab when training a tokenizer here")
    p.add_argument("--save", required=True, help="run dir to write")
    p.add_argument("--depth", type=int, default=4, help="model size preset (see the README's depth table)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--window-pattern", default="SSSL", help="per-layer S(liding)/L(ong) attention pattern")
    p.add_argument("--window", type=int, default=0, help="sliding window in tokens (default seq-len/4)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--total-batch-tokens", type=int, default=0,
                   help="tokens per optimizer step, by gradient accumulation (default one micro-batch)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (default from --tokens-params-ratio)")
    p.add_argument("--tokens-params-ratio", type=float, default=20.0)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--head-lr", type=float, default=0.004)
    p.add_argument("--warmup-frac", type=float, default=0.0)
    p.add_argument("--warmdown-frac", type=float, default=0.2)
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--eval-every", type=int, default=0, help="validation bpb every N steps (and at the end)")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--sample-every", type=int, default=0)
    p.add_argument("--cache-dir", help="where tokenized data is cached (default: <save>.cache)")
    _stage_flags(p)
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="picochat", description="Train a small ChatGPT-style model from scratch, and use it.")
    parser.add_argument("--version", action="version", version=f"picochat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tok = sub.add_parser("tokenizer", help="train or evaluate a BPE tokenizer")
    toksub = tok.add_subparsers(dest="action", required=True, parser_class=_Parser)
    t = toksub.add_parser("train", help="train byte-level BPE on text")
    t.add_argument("--data", nargs="+", required=True)
    t.add_argument("--vocab-size", type=int, default=32768)
    t.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop reading text after this many characters")
    t.add_argument("--save", required=True, help="tokenizer.json to write")
    t = toksub.add_parser("eval", help="bytes per token on several kinds of text")
    t.add_argument("--tokenizer", required=True, help="tokenizer.json, or a run dir")

    data = sub.add_parser("data", help="prepare or download pretraining text")
    datasub = data.add_subparsers(dest="action", required=True, parser_class=_Parser)
    d = datasub.add_parser("prepare", help="turn text files into parquet shards with a `text` column")
    d.add_argument("--data", nargs="+", required=True)
    d.add_argument("--save", required=True, help="output directory")
    d.add_argument("--shard-chars", type=int, default=50_000_000)
    d = datasub.add_parser("download", help="fetch FineWeb-Edu parquet shards (resumable)")
    d.add_argument("--save", required=True, help="output directory")
    d.add_argument("--num-shards", type=int, default=8)
    d.add_argument("--start", type=int, default=0)
    d.add_argument("--base-url", default=None, help="URL pattern with {index}; default FineWeb-Edu 100B shuffled")

    p = sub.add_parser("pretrain", help="pretrain a base model")
    _train_flags(p)

    for name, stage_help in (("midtrain", "teach a base model the chat format and tool use (packed conversations)"),
                             ("sft", "supervised fine-tuning on whole conversations")):
        c = sub.add_parser(name, help=stage_help)
        c.add_argument("--load", required=True, help="run dir to start from")
        c.add_argument("--data", required=True,
                       help='task mixture, e.g. "gsm8k:train.jsonl:1,arithmetic::0.5,chat.jsonl:2"')
        c.add_argument("--save", required=True, help="run dir to write")
        c.add_argument("--seq-len", type=int, default=0, help="default: the model's context")
        c.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
        c.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
        c.add_argument("--steps", type=int, default=0, help="default: one pass over the mixture")
        c.add_argument("--lr-scale", type=float, default=1.0 if name == "midtrain" else 0.1,
                       help="multiplies the pretraining learning rates")
        c.add_argument("--compile", action="store_true")
        _stage_flags(c)
        _common(c)

    c = sub.add_parser("rl", help="reinforcement learning (GRPO) on graded tasks, calculator on")
    c.add_argument("--load", required=True, help="a chat run dir (midtrain or sft) to start from")
    c.add_argument("--task", "--data", dest="task", required=True,
                   help='graded task mixture, e.g. "gsm8k:../data/gsm8k:1,arc:../data/arc:0.5,arithmetic::1" '
                        "(weights are sampling weights)")
    c.add_argument("--save", required=True, help="run dir to write")
    c.add_argument("--group-size", type=int, default=16, help="completions sampled per prompt")
    c.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step (rows = this x group size)")
    c.add_argument("--steps", type=int, default=100, help="optimizer steps")
    c.add_argument("--max-tokens", type=int, default=256, help="reply length cap of a rollout")
    c.add_argument("--temperature", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=50)
    c.add_argument("--epochs", type=int, default=1,
                   help="optimizer steps per batch of rollouts (> 1: clipped importance ratio)")
    c.add_argument("--clip", type=float, default=0.2, help="clip range of the importance ratio")
    c.add_argument("--kl", type=float, default=0.0, help="KL penalty (k3) to the --load model; 0: none")
    c.add_argument("--no-std", action="store_true", help="advantages = reward - group mean, not divided by std")
    c.add_argument("--format-reward", type=float, default=0.0,
                   help="reward added for a well-formed calculator call whose output is not an error")
    c.add_argument("--batch-size", type=int, default=16, help="training rows per micro-batch")
    c.add_argument("--rollout-rows", type=int, default=64, help="rows decoding at once during rollouts")
    c.add_argument("--lr-scale", type=float, default=0.05, help="multiplies the pretraining learning rates")
    c.add_argument("--eval-task", default="", help="held-out mixture (default: the tasks' test split; "
                                                   "synthetic tasks: a test seed)")
    c.add_argument("--eval-every", type=int, default=0, help="held-out pass@k every N steps (and at the end)")
    c.add_argument("--eval-examples", type=int, default=100, help="held-out questions per eval (0: none)")
    c.add_argument("--eval-k", type=int, default=1, help="samples per question: pass@k (k=1: greedy)")
    _stage_flags(c)
    _common(c)

    ev = sub.add_parser("eval", help="evaluate a model")
    evsub = ev.add_subparsers(dest="action", required=True, parser_class=_Parser)
    e = evsub.add_parser("bpb", help="bits per byte on held-out text")
    e.add_argument("--load", required=True)
    e.add_argument("--data", nargs="+", required=True)
    e.add_argument("--seq-len", type=int, default=0, help="default: the model's")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-tokens", type=int, default=1_000_000, help="evaluate at most this many tokens")
    _int8_flag(e)
    _common(e)
    e = evsub.add_parser("core", help="the DCLM CORE metric of a base model (few-shot, 22 tasks)")
    e.add_argument("--load", required=True)
    e.add_argument("--data", help="the CORE eval bundle: a directory, or a URL of its zip "
                                  "(default: download nanochat's eval_bundle.zip once, then use the cache)")
    e.add_argument("--limit", type=int, help="at most N examples per task")
    e.add_argument("--tasks", help="comma-separated task labels (default: all of core.yaml)")
    e.add_argument("--results", help="per-example JSONL (default: <load>/evals/core.jsonl)")
    _int8_flag(e)
    _common(e)
    for name, what in (("arc", "ARC-Easy and ARC-Challenge (categorical)"), ("mmlu", "MMLU, 57 subjects (categorical)"),
                       ("gsm8k", "GSM8K with the calculator (generative)"),
                       ("humaneval", "HumanEval, run in a sandbox (generative)"),
                       ("spelling", "spelling and letter counting (generative)"),
                       ("arithmetic", "synthetic arithmetic with the calculator (generative, built in)"),
                       ("chat", "all six ChatCORE tasks, and ChatCORE")):
        e = evsub.add_parser(name, help=what)
        e.add_argument("--load", required=name != "humaneval", help="run dir to evaluate")
        e.add_argument("--data", help="the task's files, or a directory laid out like ../shared/data "
                                      "(default: $PICOCHAT_DATA)")
        e.add_argument("--split", help="dataset split (default: test)")
        e.add_argument("--limit", type=int, help="the first N examples only")
        e.add_argument("--num-samples", type=int, default=1, help="k samples per question: pass@k (generative)")
        e.add_argument("--max-tokens", type=int, help="reply length cap (generative; default per task)")
        e.add_argument("--temperature", type=float, help="default: 0 (greedy) for k=1, else 0.8")
        e.add_argument("--top-k", type=int, default=50)
        e.add_argument("--seed", type=int, default=0)
        e.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward (categorical)")
        if name == "humaneval":
            e.add_argument("--canonical", action="store_true",
                           help="grade the reference solutions instead of a model (checks the sandbox)")
        _int8_flag(e)
        _common(e)

    s = sub.add_parser("sample", help="continue a prompt with a trained model")
    s.add_argument("--prompt", default="")
    s.add_argument("--num-samples", type=int, default=1)
    _sampling_flags(s, temperature=0.8, max_tokens=128, seed=0)

    c = sub.add_parser("chat", help="talk to a chat model in the terminal")
    c.add_argument("--prompt", help="answer this one message and exit")
    c.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster tokens once the first reply has compiled it")
    _sampling_flags(c, temperature=0.6, max_tokens=512, seed=None)

    v = sub.add_parser("serve", help="serve a chat model: OpenAI-compatible HTTP API and web chat page")
    v.add_argument("--load", required=True, help="run dir")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
    v.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    v.add_argument("--max-concurrent", type=int, default=8, help="rows decoded together in one batch")
    v.add_argument("--max-queue", type=int, default=64, help="requests that may wait; beyond it: 503")
    v.add_argument("--api-key", default=os.environ.get("PICOCHAT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default $PICOCHAT_API_KEY; /health stays open)")
    _int8_flag(v)
    _common(v)

    q = sub.add_parser("quantize", help="write an INT8 (weight-only) copy of a run dir, for inference")
    q.add_argument("--load", required=True, help="float run dir")
    q.add_argument("--save", required=True, help="run dir to write (must not exist)")
    q.add_argument("--embeddings", action="store_true", help="quantize the token embedding too (per-row scales)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --save")

    r = sub.add_parser("speedrun", help="the whole pipeline in one command (offline by default)")
    r.add_argument("--preset", default="tiny",
                   help="smoke (one minute), tiny (offline default, 15-20 min on 2 CPU cores), small, d8, d12, d20")
    r.add_argument("--data", nargs="+", help="your own text instead of the builtin offline corpus")
    r.add_argument("--save", default="runs/speedrun", help="output directory")
    r.add_argument("--steps", type=int, default=0, help="override the preset's step count")
    r.add_argument("--eval-data", help="a directory laid out like ../shared/data (CORE bundle, ARC, MMLU, GSM8K, "
                                       "HumanEval, words) for the report card's evals (default: $PICOCHAT_DATA; "
                                       "without it only the built-in evals run)")
    r.add_argument("--usd-per-hour", type=float, help="the machine's price, for the report's cost column "
                                                      "(default: a guess for the device)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    r.add_argument("--compile", action="store_true")
    _common(r)

    r = sub.add_parser("report", help="the report card of a pipeline's run dirs (report.md with plots)")
    r.add_argument("--load", nargs="+", required=True, help="run dirs: base, mid, sft, rl (any subset)")
    r.add_argument("--save", default="report.md", help="the markdown file to write (plots go next to it)")
    r.add_argument("--title", default="picochat report card")
    r.add_argument("--usd-per-hour", type=float, help="the machine's price, for the cost column "
                                                      "(default: a guess for the training device)")
    return parser


# ----------------------------------------------------------------------------- commands

def _cmd_tokenizer(a) -> None:
    from .tokenizer import Tokenizer, eval_tokenizer, format_eval_table, train_tokenizer
    if a.action == "train":
        train_tokenizer(a.data, a.vocab_size, save=a.save, max_chars=a.max_chars)
    else:
        path = os.path.join(a.tokenizer, "tokenizer.json") if os.path.isdir(a.tokenizer) else a.tokenizer
        print(format_eval_table(eval_tokenizer(Tokenizer.load(path))))


def _cmd_data(a) -> None:
    if a.action == "prepare":
        from .data.prepare import prepare_shards
        prepare_shards(a.data, a.save, shard_chars=a.shard_chars)
    else:
        from .data.download import download_shards
        kw = {"base_url": a.base_url} if a.base_url else {}
        download_shards(a.save, a.num_shards, start=a.start, **kw)


def _cmd_pretrain(a) -> None:
    from .optim import OptimConfig
    from .train.pretrain import PretrainConfig, pretrain
    optim = OptimConfig(matrix_lr=a.matrix_lr, embedding_lr=a.embedding_lr, head_lr=a.head_lr,
                        warmup_frac=a.warmup_frac, warmdown_frac=a.warmdown_frac)
    cfg = PretrainConfig(
        data=a.data, save=a.save, tokenizer=a.tokenizer, vocab_size=a.vocab_size, depth=a.depth,
        seq_len=a.seq_len, window_pattern=a.window_pattern, window=a.window, batch_size=a.batch_size,
        total_batch_tokens=a.total_batch_tokens, steps=a.steps, tokens_params_ratio=a.tokens_params_ratio,
        optim=optim, device=a.device, dtype=a.dtype, compile=a.compile, grad_checkpoint=a.grad_checkpoint,
        seed=a.seed,
        eval_every=a.eval_every, eval_tokens=a.eval_tokens, sample_every=a.sample_every,
        save_every=a.save_every, log_every=a.log_every, stop_at=a.stop_at, resume=a.resume,
        overwrite=a.overwrite, cache_dir=a.cache_dir)
    _print_summary(pretrain(cfg))


def _print_summary(result: dict) -> None:
    """A training stage's summary as one JSON line on stdout (rank 0 only under torchrun)."""
    from . import distributed
    result.pop("metrics")
    if distributed.is_main():
        print(json.dumps(result))


def _cmd_chat_train(a) -> None:
    from .train.sft import ChatTrainConfig, chat_train
    cfg = ChatTrainConfig(load=a.load, data=a.data, save=a.save, stage="mid" if a.command == "midtrain" else "sft",
                          seq_len=a.seq_len, batch_size=a.batch_size, grad_accum=a.grad_accum, steps=a.steps,
                          lr_scale=a.lr_scale, device=a.device, dtype=a.dtype, compile=a.compile,
                          grad_checkpoint=a.grad_checkpoint, seed=a.seed,
                          save_every=a.save_every, log_every=a.log_every, stop_at=a.stop_at, resume=a.resume,
                          overwrite=a.overwrite)
    _print_summary(chat_train(cfg))


def _cmd_rl(a) -> None:
    from .train.rl import RLConfig, rl_train
    cfg = RLConfig(load=a.load, task=a.task, save=a.save, group_size=a.group_size, prompts_per_step=a.prompts_per_step,
                   steps=a.steps, max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k or None,
                   epochs=a.epochs, clip=a.clip, kl=a.kl, std=not a.no_std, format_reward=a.format_reward,
                   batch_size=a.batch_size, rollout_rows=a.rollout_rows, lr_scale=a.lr_scale, eval_task=a.eval_task,
                   eval_every=a.eval_every, eval_examples=a.eval_examples, eval_k=a.eval_k, device=a.device,
                   dtype=a.dtype, seed=a.seed, save_every=a.save_every, log_every=a.log_every, stop_at=a.stop_at,
                   resume=a.resume, overwrite=a.overwrite, grad_checkpoint=a.grad_checkpoint)
    _print_summary(rl_train(cfg))


def _cmd_eval(a) -> None:
    if a.action == "bpb":
        from .evals.bpb import eval_bpb_files
        bpb = eval_bpb_files(a.load, a.data, seq_len=a.seq_len, batch_size=a.batch_size, max_tokens=a.max_tokens,
                             device=a.device, dtype=a.dtype, int8=a.int8)
        print(json.dumps({"bpb": round(bpb, 6)}))
    elif a.action == "core":
        from .evals.core import eval_core, format_core_table
        tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] if a.tasks else None
        print(format_core_table(eval_core(a.load, a.data, limit=a.limit, tasks=tasks, device=a.device,
                                          dtype=a.dtype, results=a.results, int8=a.int8)))
    elif a.action == "humaneval" and a.canonical:
        from .evals.chat_eval import humaneval_canonical
        print(json.dumps(humaneval_canonical(a.data, a.limit)))
    else:
        from .evals.chat_eval import GROUPS, format_chat_results, run_chat_evals
        if not a.load:
            raise PicochatError("eval humaneval needs --load RUN (or --canonical)")
        out = run_chat_evals(a.load, GROUPS.get(a.action, [a.action]), a.data, split=a.split, limit=a.limit,
                             num_samples=a.num_samples, max_tokens=a.max_tokens, temperature=a.temperature,
                             top_k=a.top_k, seed=a.seed, batch_tokens=a.batch_tokens, device=a.device,
                             dtype=a.dtype, int8=a.int8)
        print(format_chat_results(out))


def _cmd_sample(a) -> None:
    from .sample import sample
    for text in sample(a.load, a.prompt, a.max_tokens, a.temperature, a.top_k, a.num_samples, a.seed, a.device,
                       a.top_p, int8=a.int8):
        print(text)
        print("-" * 40)


def _cmd_chat(a) -> None:
    from .chat import chat
    chat(a.load, a.prompt, a.temperature, a.top_k, a.top_p, a.max_tokens, a.seed, a.device, int8=a.int8,
         compile=a.compile)


def _cmd_serve(a) -> None:
    from .serve import ServeConfig, serve
    serve(ServeConfig(load=a.load, host=a.host, port=a.port, max_concurrent=a.max_concurrent,
                      max_queue=a.max_queue, api_key=a.api_key, device=a.device, dtype=a.dtype,
                      int8=a.int8))


def _cmd_speedrun(a) -> None:
    from .speedrun import SpeedrunConfig, speedrun
    report = speedrun(SpeedrunConfig(preset=a.preset, data=a.data, save=a.save, steps=a.steps, eval_data=a.eval_data,
                                     usd_per_hour=a.usd_per_hour, overwrite=a.overwrite, compile=a.compile,
                                     device=a.device, dtype=a.dtype))
    print(f"report: {report}")


def _cmd_quantize(a) -> None:
    from .quant import quantize_run
    print(json.dumps(quantize_run(a.load, a.save, embeddings=a.embeddings, overwrite=a.overwrite)))


def _cmd_report(a) -> None:
    from .report import report_card
    print(f"report: {report_card(a.load, a.save, title=a.title, usd_per_hour=a.usd_per_hour)}")


COMMANDS = {"tokenizer": _cmd_tokenizer, "data": _cmd_data, "pretrain": _cmd_pretrain, "midtrain": _cmd_chat_train,
            "sft": _cmd_chat_train, "rl": _cmd_rl, "eval": _cmd_eval,
            "sample": _cmd_sample, "chat": _cmd_chat, "speedrun": _cmd_speedrun,
            "serve": _cmd_serve, "report": _cmd_report, "quantize": _cmd_quantize}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except PicochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from . import distributed
        if not distributed.peer_lost(e):
            raise
        print(f"error: rank {distributed.rank()}: lost contact with the other processes (one died or stopped "
              f"answering; see the first failing rank's output): {first_line(e, 300)}", file=sys.stderr, flush=True)
        # exit now: tearing down a process group whose peer is gone can abort the process (SIGABRT
        # from the backend's destructor); the run dir on disk is whole either way
        sys.stdout.flush()
        os._exit(1)
    finally:
        if "torch.distributed" in sys.modules:  # commands that never load torch stay fast
            from . import distributed
            distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
