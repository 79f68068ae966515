"""The chunked linear + cross-entropy: hand-computed numbers, and the loss and gradients of
`F.linear` + the project's LM loss (`rlhf.algorithms.losses.lm_nll`, which the logits path of
SFT and PPO-ptx runs) over several chunks and vocabulary slices."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.algorithms.losses import lm_nll
from rlhf.kernels import linear_cross_entropy as lce
from rlhf.kernels.linear_cross_entropy import linear_cross_entropy


def test_hand_computed_loss_and_hidden_gradient():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    # logits [1, 0, 0] and [0, 1, 0]; targets 0 and 2.
    loss = linear_cross_entropy(hidden, weight, None, torch.tensor([0, 2]))
    e = math.e
    assert loss.item() == pytest.approx(2 * math.log(e + 2) - 1, rel=1e-6)
    loss.backward()
    # Row gradient = (softmax - one-hot) · weight: only the first two vocabulary rows have weight.
    expected = torch.tensor([[e / (e + 2) - 1, 1 / (e + 2)], [1 / (e + 2), e / (e + 2)]])
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_bias,frozen_weight", [(False, False), (True, False), (False, True)])
def test_equals_full_logits_over_chunks_and_slices(monkeypatch, with_bias, frozen_weight):
    vocab, dim, rows = 300, 24, 37
    monkeypatch.setattr(lce, "CPU_CHUNK_BYTES", 4 * vocab * 8)  # 8 rows a chunk: 5 chunks, the last short
    monkeypatch.setattr(lce, "VOCAB_SLICE", 128)  # 3 slices, the last short
    torch.manual_seed(0)
    hidden = torch.randn(rows, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.3).requires_grad_(not frozen_weight)
    bias = torch.randn(vocab, requires_grad=True) if with_bias else None
    targets = torch.randint(0, vocab, (rows,))
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]

    expected, _ = lm_nll(F.linear(hidden, weight, bias), targets)
    expected_grads = torch.autograd.grad(expected * 0.5, inputs)
    got = linear_cross_entropy(hidden, weight, bias, targets)
    got_grads = torch.autograd.grad(got * 0.5, inputs)  # a scaled loss scales the gradients
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, bias, targets), expected, rtol=1e-5, atol=1e-4)


def test_a_second_backward_is_refused():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(10, 8), None, torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_no_rows_give_zero_loss_and_zero_gradients():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    dirty = torch.full((10, 8), 7.0)  # freed just before: an uninitialised gradient would likely reuse it
    del dirty
    loss = linear_cross_entropy(hidden, weight, None, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_half_precision_weights_give_the_full_logits_loss(monkeypatch):
    monkeypatch.setattr(lce, "CPU_CHUNK_BYTES", 4 * 200 * 8)  # several chunks
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(200, 16) * 0.3).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 200, (30,))
    expected, _ = lm_nll(F.linear(hidden, weight), targets)
    expected_grads = torch.autograd.grad(expected, [hidden, weight])
    got = linear_cross_entropy(hidden, weight, None, targets)
    got_grads = torch.autograd.grad(got, [hidden, weight])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-2)
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)


def test_under_autocast_products_are_bf16_and_gradients_fp32(monkeypatch):
    # Mixed precision: fp32 weights under bf16 autocast. Several chunks and vocabulary slices, so
    # the weight gradient is summed over bf16 products into fp32.
    monkeypatch.setattr(lce, "CPU_CHUNK_BYTES", 4 * 200 * 8)
    monkeypatch.setattr(lce, "VOCAB_SLICE", 64)
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = (torch.randn(200, 16) * 0.3).requires_grad_()
    bias = (torch.randn(200) * 0.1).requires_grad_()
    targets = torch.randint(0, 200, (30,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = lm_nll(F.linear(hidden, weight, bias), targets)
    expected_grads = torch.autograd.grad(expected, [hidden, weight, bias])
    exact, _ = lm_nll(F.linear(hidden, weight, bias), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, bias, targets)
    got_grads = torch.autograd.grad(got, [hidden, weight, bias])
    assert got.dtype == torch.float32 and got != exact  # computed in bf16, not fp32
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-2)
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2)


def test_the_weight_gradient_sink_holds_the_gradient_autograd_delivers():
    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    targets = torch.tensor([1, 0, 10, 3, 3])
    sink: list[torch.Tensor] = []
    loss = linear_cross_entropy(hidden, weight, None, targets, sink)
    assert len(sink) == 1 and sink[0].shape == weight.shape
    buffer = sink.pop().data_ptr()  # dropped, as a holder must (autograd copies a shared gradient)
    (loss * 0.5).backward()
    # The same buffer, scaled in place by the backward, became the weight's gradient.
    assert weight.grad.data_ptr() == buffer
    expected = torch.autograd.grad(F.cross_entropy(hidden @ weight.t(), targets, reduction="sum") * 0.5, weight)[0]
    torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-6)
    frozen: list[torch.Tensor] = []
    linear_cross_entropy(hidden, weight.detach(), None, targets, frozen).backward()
    assert frozen == []  # no weight gradient, nothing handed out
