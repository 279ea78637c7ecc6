"""The head and its loss a chunk of rows at a time (picochat/loss.py) against the unchunked
cross-entropy of the soft-capped logits: the losses and both gradients, for every reduction."""

import pytest
import torch
import torch.nn.functional as F

from picochat.loss import chunk_rows, head_loss, softcap


def reference(x, w, y, vocab, cap, reduction):
    return F.cross_entropy(softcap(x @ w.t(), vocab, cap), y, ignore_index=-1, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [None, 128], ids=["one-chunk", "three-chunks"])
def test_the_chunked_loss_equals_the_whole_one(dtype, reduction, chunk):
    vocab, padded, rows = 100, 128, 300  # the head's rows padded beyond the vocabulary
    assert rows <= chunk_rows(vocab)
    torch.manual_seed(0)
    x = torch.randn(rows, 32, requires_grad=True)
    w = (0.5 * torch.randn(padded, 32)).requires_grad_()
    y = torch.randint(0, vocab, (rows,))
    y[::7] = -1  # ignored
    upstream = torch.randn(rows) if reduction == "none" else torch.tensor(2.0)
    results = []
    for chunked in (False, True):
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if chunked:
                loss = head_loss(x, w, y, vocab, 15.0, reduction, chunk)
            else:
                loss = reference(x, w, y, vocab, 15.0, reduction)
        loss.backward(upstream)
        results.append((loss.detach(), x.grad, w.grad))
    (want, want_dx, want_dw), (got, dx, dw) = results
    assert got.shape == want.shape and (got[y == -1] == 0).all() if reduction == "none" else got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert (dw[vocab:] == 0).all()  # padding rows are never tokens
    # fp32: the same sums; bf16: the products round at bf16 (8 bits), in another order
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    for a, b in ((dx, want_dx), (dw, want_dw)):
        assert (a - b).abs().max() <= tol * b.abs().max()


def test_no_tensor_of_logits_is_kept_for_the_backward_pass():
    rows, vocab, width = 512, 4096, 64
    x, w = torch.randn(rows, width, requires_grad=True), torch.randn(vocab, width, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        head_loss(x, w, torch.randint(0, vocab, (rows,)), vocab, 15.0).backward()
        head_loss(x, w, torch.randint(0, vocab, (rows,)), vocab, 15.0, "none").sum().backward()
    assert kept and max(kept) == vocab * width  # the weight (or its gradient), not rows x vocab


def test_no_gradient_is_made_where_none_is_asked():
    x, w, y = torch.randn(10, 8), torch.randn(20, 8), torch.randint(0, 20, (10,))
    with torch.no_grad():
        loss = head_loss(x, w, y, 20, 15.0, "none")
    torch.testing.assert_close(loss, reference(x, w, y, 20, 15.0, "none"))
    with pytest.raises(ValueError, match="reduction must be mean, sum or none"):
        head_loss(x, w, y, 20, 15.0, "avg")


def _saved_bytes(loss: torch.Tensor, skip: set) -> int:
    """Bytes of the tensors the autograd graph behind `loss` keeps (a compiled graph's included)."""
    seen, total, todo, visited = set(skip), 0, [loss.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        for t in getattr(fn, "saved_tensors", None) or ():
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        todo.extend(f for f, _ in fn.next_functions)
    return total


def test_compiled_the_loss_runs_eagerly_where_its_logits_would_be_big(monkeypatch):
    """Traced by torch.compile, the loss keeps the micro-batch's logits whole; past
    COMPILED_LOGITS_BYTES it runs after a graph break, keeping what it keeps eagerly, with the same
    loss and gradients."""
    from picochat import loss as loss_module
    from picochat.config import ModelConfig
    from picochat.model import GPT
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_depth(2, vocab_size=4096, sequence_len=128))
    x = torch.randint(0, 4096, (2, 128))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    logits = 2 * 128 * 4096 * 4
    kept = {}
    for limit in (1 << 40, 0):
        monkeypatch.setattr(loss_module, "COMPILED_LOGITS_BYTES", limit)
        torch._dynamo.reset()
        loss = torch.compile(model, dynamic=False)(x, x)
        kept[limit] = _saved_bytes(loss, weights)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        want = model(x, x)
        want.backward()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
        model.zero_grad(set_to_none=True)
    assert kept[1 << 40] > kept[0] + 0.4 * logits  # compiled through: a share of the logits kept; else none
