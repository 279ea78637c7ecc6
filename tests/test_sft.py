import torch
from safetensors.torch import load_file

from picochat.conversation import render_conversation
from picochat.run_dir import load_run
from picochat.tasks import build_mixture
from picochat.train.sft import MidtrainConfig, PaddedConversations, SFTConfig, chat_train

from .conftest import cpu_controls


def test_padding_and_masked_positions_add_nothing_to_the_loss(tiny_base):
    run = load_run(tiny_base)
    task = build_mixture("arithmetic::1,identity::1", seed=0)
    batches = PaddedConversations(task, run.tokenizer, batch_size=4, seq_len=128, seed=0)
    x, y = batches.next_batch()
    assert (x.size(1) == y.size(1)) and (y == -1).any()
    together = run.model(x, y, loss_reduction="sum")
    # each conversation alone, unpadded, gives the same summed loss: padding contributes nothing
    alone = torch.zeros(())
    for i in batches.order._order[:4]:
        ids, mask = render_conversation(run.tokenizer, task[int(i)], max_tokens=129)
        xi = torch.tensor([ids[:-1]])
        yi = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])
        alone = alone + run.model(xi, yi, loss_reduction="sum")
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-3)
    # targets are exactly the assistant's tokens: every user token is masked
    user_start = run.tokenizer.special_id("<|user_start|>")
    assert not (y == user_start).any()


def test_midtrain_rows_are_packed_with_masked_user_turns(tiny_base, tmp_path):
    result = chat_train(MidtrainConfig(load=str(tiny_base), data="arithmetic::1", save=str(tmp_path / "mid"),
                                       batch_size=4, steps=3, controls=cpu_controls(dtype="fp32")))
    assert result["steps"] == 3 and all(m["tokens"] < 4 * 128 for m in result["metrics"])
    assert load_run(tmp_path / "mid").meta["stage"] == "mid"


def test_sft_resumes_exactly(tiny_base, tmp_path):
    def cfg(save, **kw):
        return SFTConfig(load=str(tiny_base), data="arithmetic::1,identity::2", save=str(save), lr_scale=1.0,
                         batch_size=4, steps=8, controls=cpu_controls(dtype="fp32", seed=7, **kw))
    straight = chat_train(cfg(tmp_path / "a"))
    chat_train(cfg(tmp_path / "b", stop_at=4))
    resumed = chat_train(cfg(tmp_path / "b", resume=True))
    assert [m["loss"] for m in resumed["metrics"]] == [m["loss"] for m in straight["metrics"]]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_teaches_arithmetic_with_the_calculator(tiny_base, tmp_path):
    """From a base model that never saw the chat format, SFT on the synthetic arithmetic task makes
    the model call the calculator with the question's operands and report the result."""
    from picochat.evals.chat_eval import evaluate_task
    from picochat.tasks.arithmetic import Arithmetic

    held_out = Arithmetic(size=30, seed=12345)  # training uses seed 42: different questions
    kw = dict(max_tokens=40, save=False)
    before = evaluate_task(load_run(tiny_base), "arithmetic", held_out, **kw)["accuracy"]
    chat_train(SFTConfig(load=str(tiny_base), data="arithmetic::1", save=str(tmp_path / "sft"), lr_scale=1.0,
                         batch_size=16, steps=500, controls=cpu_controls(dtype="fp32", log_every=50)))
    after = evaluate_task(load_run(tmp_path / "sft"), "arithmetic", held_out, **kw)["accuracy"]
    assert before <= 0.1
    assert after >= 0.6, after
