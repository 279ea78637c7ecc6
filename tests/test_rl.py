"""RL (GRPO): advantages and the loss against hand-written ones, REINFORCE at one epoch, clipping,
masking, all-equal groups, exact resume, bad input at start-up, and an improvement on held-out
arithmetic from a mediocre SFT model."""

import math

import pytest
import torch
from safetensors.torch import load_file

from picochat.common import PicochatError
from picochat.config import ModelConfig
from picochat.engine import Completion
from picochat.model import GPT
from picochat.run_dir import load_run
from picochat.tokenizer import Tokenizer
from picochat.train.rl import (RLConfig, Rollouts, completion_row, group_advantages, grpo_loss, pad_rows, plan_rl,
                               rl_train, well_formed_call)

from .conftest import cpu_controls, run_cli

TEXT = "What is 12 + 30? The answer is 42. Compute 7 * 6, then 100 - 58. " * 30


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, also inside the stages (which would take every core): tiny models gain little
    from a second one, and on a busy machine OpenMP's spinning threads make every op many times
    slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("picochat.train.stage.set_threads", lambda: None)  # every stage's start_stage
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], 300)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=2, n_kv_head=1, sequence_len=64))
    with torch.no_grad():  # random output projections too, so every parameter gets a gradient
        for block in m.blocks:
            block.attn.c_proj.weight.normal_(std=0.02)
            block.mlp.c_proj.weight.normal_(std=0.02)
        m.lm_head.weight.normal_(std=0.05)
    return m


def _group(tok):
    """A prompt and 4 completions of known tokens; the second and fourth call the calculator, so
    they hold forced tokens (the tool output)."""
    sid = tok.special_id
    prompt = [tok.bos_id, sid("<|user_start|>"), *tok.encode("What is 12 + 30?"), sid("<|user_end|>"),
              sid("<|assistant_start|>")]
    call = [sid("<|python_start|>"), *tok.encode("12+30"), sid("<|python_end|>")]
    out = [sid("<|output_start|>"), *tok.encode("42"), sid("<|output_end|>")]
    said = tok.encode("The answer is 42.")
    comps = [
        Completion(tok.encode("The answer is 41."), [False] * len(tok.encode("The answer is 41.")), "stop", ""),
        Completion(call + out + said, [False] * len(call) + [True] * len(out) + [False] * len(said), "stop", ""),
        Completion(tok.encode("7 * 6"), [False] * len(tok.encode("7 * 6")), "length", ""),
        Completion(call + out, [False] * len(call) + [True] * len(out), "stop", ""),
    ]
    return prompt, comps


class LogitsSpy(torch.nn.Module):
    """Wraps a GPT so that the logits of its last call keep their gradient (to see which positions
    the loss reaches)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.logits = model, None

    def forward(self, x, y, loss_reduction="mean"):
        self.logits = self.model(x)
        self.logits.retain_grad()
        return torch.nn.functional.cross_entropy(self.logits.flatten(0, 1), y.flatten(), ignore_index=-1,
                                                 reduction=loss_reduction)


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


# ----------------------------------------------------------------------------- advantages

def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(rewards, std=True)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))  # mean 0.5, std 0.5
    mean, std = 0.375, math.sqrt(((1 - .375) ** 2 + (.5 - .375) ** 2 + 2 * .375 ** 2) / 4)
    torch.testing.assert_close(adv[2], (torch.tensor([1.0, 0.5, 0.0, 0.0]) - mean) / std)
    assert torch.equal(adv[1], torch.zeros(4)) and torch.equal(adv[3], torch.zeros(4))  # std 0: no NaN
    no_std = group_advantages(rewards, std=False)
    torch.testing.assert_close(no_std[2], torch.tensor([0.625, 0.125, -0.375, -0.375]))
    assert torch.equal(no_std[3], torch.zeros(4))


def test_rows_mask_the_prompt_and_forced_tool_output_and_keep_the_stop_token(tok):
    prompt, comps = _group(tok)
    end = tok.special_id("<|assistant_end|>")
    seq, target = completion_row(prompt, comps[1], end)
    assert seq == prompt + comps[1].tokens + [end]
    assert target == [False] * len(prompt) + [not f for f in comps[1].forced] + [True]
    seq, target = completion_row(prompt, comps[2], end)  # cut by length: no stop token
    assert seq == prompt + comps[2].tokens and target[-1]
    x, y, adv = pad_rows([(*completion_row(prompt, c, end), a) for c, a in zip(comps, [1.0, -1.0, -1.0, 1.0])],
                         tok.bos_id)
    out_start = tok.special_id("<|output_start|>")
    assert not (y == out_start).any() and not (y == tok.special_id("<|user_start|>")).any()
    assert (y[:, :len(prompt) - 1] == -1).all()
    assert int((y != -1).sum()) == sum(len(c.tokens) - sum(c.forced) + (c.finish_reason == "stop") for c in comps)


def test_well_formed_call_needs_a_forced_output_that_is_no_error(tok):
    prompt, comps = _group(tok)
    assert well_formed_call(tok, comps[1]) and well_formed_call(tok, comps[3])
    assert not well_formed_call(tok, comps[0])
    sid = tok.special_id
    err = [sid("<|python_start|>"), *tok.encode("1/0"), sid("<|python_end|>"), sid("<|output_start|>"),
           *tok.encode("error: division by zero"), sid("<|output_end|>")]
    flags = [False] * 5 + [True] * (len(err) - 5)
    assert not well_formed_call(tok, Completion(err, flags[:len(err)], "stop", ""))
    unanswered = [sid("<|python_start|>"), *tok.encode("1+2")]  # cut before <|python_end|>
    assert not well_formed_call(tok, Completion(unanswered, [False] * len(unanswered), "length", ""))


# ----------------------------------------------------------------------------- the loss

def test_one_epoch_loss_is_reinforce_by_hand(tok, model):
    """4 completions with rewards 1, 0, 0, 1: advantages +1, -1, -1, +1; the loss is
    -sum_t A * log p(token_t) / number of sampled tokens, with its gradient; forced and prompt
    tokens are not in it, and the ratio is 1 (REINFORCE)."""
    prompt, comps = _group(tok)
    end = tok.special_id("<|assistant_end|>")
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))[0]
    rows = [(*completion_row(prompt, c, end), float(a)) for c, a in zip(comps, adv)]
    x, y, a = pad_rows(rows, tok.bos_id)
    count = int((y != -1).sum())

    model.zero_grad()
    loss = grpo_loss(model, (x, y, a, torch.zeros(0, 0), torch.zeros(0, 0)))[0] / count
    loss.backward()
    got = _grads(model)

    model.zero_grad()
    hand, n = torch.zeros(()), 0
    for (seq, target, adv_r) in rows:  # each row alone, unpadded
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0], dim=-1)
        for t in range(1, len(seq)):
            if target[t]:
                hand = hand - adv_r * logp[t - 1, seq[t]]
                n += 1
    assert n == count
    (hand / n).backward()
    want = _grads(model)
    # the ratio is exactly 1, so the loss's value is -sum A / n; its gradient is REINFORCE's
    want_value = -sum(adv_r * sum(target[1:]) for _, target, adv_r in rows) / n
    torch.testing.assert_close(loss.detach(), torch.tensor(want_value), rtol=1e-6, atol=1e-7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in got)


def test_masked_positions_get_no_gradient(tok, model):
    prompt, comps = _group(tok)
    end = tok.special_id("<|assistant_end|>")
    x, y, a = pad_rows([(*completion_row(prompt, c, end), s) for c, s in zip(comps, [1.0, -1.0, -1.0, 1.0])],
                       tok.bos_id)
    spy = LogitsSpy(model)
    grpo_loss(spy, (x, y, a, torch.zeros(0, 0), torch.zeros(0, 0)), kl=0.0)[0].backward()
    per_position = spy.logits.grad.abs().sum(-1)
    assert (per_position[y == -1] == 0).all()  # prompt, forced tool output, padding
    assert (per_position[y != -1] > 0).all()


def test_clipping_zeroes_the_gradient_outside_the_trust_region(tok, model):
    """ratio 1.5 with A > 0 and ratio 0.5 with A < 0 are clipped (no gradient); ratio 1.5 with
    A < 0 and ratio 0.5 with A > 0 are not (the pessimistic, unclipped term is taken)."""
    prompt, comps = _group(tok)
    end = tok.special_id("<|assistant_end|>")
    row = completion_row(prompt, comps[0], end)
    x, y, _ = pad_rows([(*row, 0.0)] * 4, tok.bos_id)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    with torch.no_grad():
        logp = -model(x, y, loss_reduction="none").view(y.shape)
    shift = torch.tensor([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]).view(4, 1)
    old = logp - shift  # ratio = exp(logp - old) = 1.5, 1.5, 0.5, 0.5
    spy = LogitsSpy(model)
    loss, stats = grpo_loss(spy, (x, y, adv, old, torch.zeros(0, 0)), clip=0.2)
    loss.backward()
    per_row = spy.logits.grad.abs().sum((1, 2))
    assert per_row[0] == 0 and per_row[2] == 0
    assert per_row[1] > 0 and per_row[3] > 0
    n = int((y[0] != -1).sum())
    assert int(stats["clipped"]) == 2 * n
    # per token: -1.2 (clipped, A = 1), +1.5 (unclipped, A = -1), +0.8 (clipped), -0.5 (unclipped)
    torch.testing.assert_close(loss.detach(), torch.tensor(n * 0.6), rtol=1e-5, atol=1e-5)


def test_kl_penalty_is_k3_to_the_reference(tok, model):
    prompt, comps = _group(tok)
    end = tok.special_id("<|assistant_end|>")
    x, y, _ = pad_rows([(*completion_row(prompt, c, end), 0.0) for c in comps], tok.bos_id)
    adv = torch.zeros(4)  # only the KL term is left
    with torch.no_grad():
        logp = -model(x, y, loss_reduction="none").view(y.shape)
    ref = logp - 0.3 * (y != -1)
    loss, _ = grpo_loss(model, (x, y, adv, torch.zeros(0, 0), ref), kl=0.5)
    d = torch.tensor(-0.3)
    want = 0.5 * (torch.exp(d) - d - 1) * int((y != -1).sum())
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-6)
    same, _ = grpo_loss(model, (x, y, adv, torch.zeros(0, 0), logp), kl=0.5)
    assert abs(float(same.detach())) < 1e-6


def test_all_equal_groups_add_nothing_and_are_counted(tok, model, monkeypatch):
    """Group 1: rewards 1, 0, 0, 1; group 2: all wrong. Group 2's rows are not trained on at all:
    the micro-batches hold group 1's 4 rows only, and all_equal says half of the groups."""
    from picochat.tasks.arithmetic import Arithmetic
    from picochat.tasks.mixture import Mixture
    prompt, comps = _group(tok)
    task = Mixture([(Arithmetic(size=10, seed=0), 1.0)], seed=0)
    cfg = RLConfig(load="-", task="arithmetic::1", save="-", group_size=4, prompts_per_step=2, batch_size=3)
    data = Rollouts(model, tok, task, cfg, plan_rl(cfg, model.config.sequence_len, 1), torch.device("cpu"),
                    torch.float32)
    conv_right = {"messages": [], "answer": 42, "task": 0}
    conv_wrong = {"messages": [], "answer": -1, "task": 0}
    texts = ["The answer is 41.", "The answer is 42.", "7 * 6", "= 42"]
    comps = [Completion(c.tokens, c.forced, c.finish_reason, t) for c, t in zip(comps, texts)]
    monkeypatch.setattr(data, "sample_groups",
                        lambda idx, first=0: [(conv_right, prompt, comps), (conv_wrong, prompt, comps)])
    batches = [data.next_batch() for _ in range(data.micro_batches)]
    assert data.micro_batches == 3 and [len(b[0]) for b in batches] == [3, 1, 0]  # 4 rows of 8
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == [-1.0, -1.0, 1.0, 1.0]
    stats = data.step_stats()
    assert stats["all_equal"] == 0.5 and stats["pass@1"] == 0.25 and stats["reward"] == 0.25
    empty, _ = grpo_loss(model, batches[2])
    empty.backward()  # an empty micro-batch is a valid no-op for the loop
    assert float(empty.detach()) == 0.0


# ----------------------------------------------------------------------------- end to end

SFT_STEPS = 40  # enough to know the chat format; bench/bench_rl.py starts RL from a better model


@pytest.fixture(scope="module")
def sft_model(tiny_base, tmp_path_factory):
    """A chat model that has seen the arithmetic format (and is mostly wrong)."""
    from picochat.train.sft import SFTConfig, chat_train
    save = tmp_path_factory.mktemp("rl") / "sft"
    chat_train(SFTConfig(load=str(tiny_base), data="arithmetic::1", save=str(save), lr_scale=1.0,
                         batch_size=16, steps=SFT_STEPS, controls=cpu_controls(dtype="fp32", log_every=50)))
    return save


def _rl(load, save, **kw):
    controls = {k: kw.pop(k) for k in ("stop_at", "resume") if k in kw}
    args = dict(load=str(load), task="arithmetic::1", save=str(save), group_size=4, prompts_per_step=4, steps=4,
                max_tokens=40, batch_size=6, rollout_rows=16, eval_examples=0,
                controls=cpu_controls(dtype="fp32", seed=3, **controls))
    args.update(kw)
    return rl_train(RLConfig(**args))


def test_rl_resumes_exactly(sft_model, tmp_path):
    """Two epochs per rollout batch and a KL penalty: stopping after step 1 leaves rollouts to reuse
    in the checkpoint; the resumed run must take exactly the straight run's steps."""
    kw = dict(epochs=2, kl=0.05, format_reward=0.1)
    straight = _rl(sft_model, tmp_path / "a", **kw)
    _rl(sft_model, tmp_path / "b", stop_at=1, **kw)
    resumed = _rl(sft_model, tmp_path / "b", resume=True, **kw)
    losses = [m["loss"] for m in straight["metrics"]]
    assert [m["loss"] for m in resumed["metrics"]] == losses
    assert [m["reward"] for m in resumed["metrics"]] == [m["reward"] for m in straight["metrics"]]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(m["all_equal"] < 1 for m in straight["metrics"])  # there was something to learn from
    assert straight["metrics"][1]["kl"] > 0 and "clipped" in straight["metrics"][1]
    assert load_run(tmp_path / "a").meta["stage"] == "rl"


def test_bad_input_fails_at_start_up(tiny_base, sft_model, tmp_path):
    def err(**kw):
        with pytest.raises(PicochatError) as e:
            _rl(kw.pop("load", sft_model), tmp_path / "x", **kw)
        return str(e.value)

    assert "at least 2" in err(group_size=1)
    assert "no grader" in err(task="identity::1")
    assert "RL needs a chat model (midtrain/sft first)" in err(load=tiny_base)
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text('{"question": "What is 1 + 1?", "solution": "2"}\n')
    assert "lacks the field(s) answer" in err(task=f"gsm8k:{bad}")
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    assert "no grader" in err(task=str(chat))
    assert not (tmp_path / "x").exists()
    r = run_cli("rl", "--load", str(sft_model), "--task", "arithmetic::1", "--save", str(tmp_path / "y"),
                "--group-size", "1")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_rl_with_lora_resumes_exactly(sft_model, tmp_path):
    """GRPO through adapters on the frozen SFT model: rollouts sample from base + adapters, and a
    resumed run takes the straight run's steps; the run dir holds the merged model."""
    from picochat.lora import LoraConfig
    kw = dict(epochs=2, kl=0.05, format_reward=0.1, adapters=LoraConfig(lora=4, lora_lr=1e-2))
    straight = _rl(sft_model, tmp_path / "a", **kw)
    _rl(sft_model, tmp_path / "b", stop_at=1, **kw)
    resumed = _rl(sft_model, tmp_path / "b", resume=True, **kw)
    assert [m["loss"] for m in resumed["metrics"]] == [m["loss"] for m in straight["metrics"]]
    assert [m["reward"] for m in resumed["metrics"]] == [m["reward"] for m in straight["metrics"]]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(sft_model / "model.safetensors")
    assert not torch.equal(a["blocks.0.attn.c_q.weight"], base["blocks.0.attn.c_q.weight"])  # merged in
    assert torch.equal(a["x0_lambdas"], base["x0_lambdas"])  # frozen
    assert load_run(tmp_path / "a").meta["lora"]["merged"]
