"""Transposed decode matmuls: same numbers as nn.Linear, only for few rows and large weights,
and the layers restored after."""

import torch

from rlhf.rollout import skinny
from rlhf.rollout.skinny import SKINNY_ROWS, skinny_matmuls


def test_same_outputs_for_few_and_many_rows_and_forward_restored(monkeypatch):
    monkeypatch.setattr(skinny, "SKINNY_MIN_WEIGHT", 256)  # the 8 x 4 layer stays below it
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8, bias=False),
                                torch.nn.GELU(), torch.nn.Linear(8, 4))
    few, many = torch.randn(2, 3, 16), torch.randn(SKINNY_ROWS + 1, 16)
    expected = model(few), model(many)
    calls = []
    original_mm = torch.mm

    def counting_mm(*args, **kwargs):
        calls.append(args[0].shape)
        return original_mm(*args, **kwargs)

    with skinny_matmuls(model):
        torch.mm = counting_mm
        try:
            got = model(few), model(many)
        finally:
            torch.mm = original_mm
        assert "forward" in model[0].__dict__
    # The 6-row input went through the transposed product in the two large layers; the 65-row
    # one did not, nor did the small last layer.
    assert calls == [torch.Size([32, 16]), torch.Size([8, 32])]
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not any("forward" in layer.__dict__ for layer in model)


def test_subclassed_linears_keep_their_forward():
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    layer = Scaled(4, 4)
    with skinny_matmuls(layer):
        assert "forward" not in layer.__dict__


def test_residual_products_equal_the_sum_on_every_path(monkeypatch):
    from rlhf.models import onednn

    torch.manual_seed(0)
    x, residual = torch.randn(8, 16), torch.randn(8, 32)
    weight, bias = torch.randn(32, 16), torch.randn(32)
    for min_weight, oned in ((1 << 18, False), (256, False), (256, True)):  # plain, transposed, packed
        if oned and not onednn.onednn_enabled():
            continue
        monkeypatch.setattr(skinny, "SKINNY_MIN_WEIGHT", min_weight)
        monkeypatch.setattr(onednn, "onednn_enabled", lambda oned=oned: oned)
        for b in (None, bias):
            got = skinny.few_row_linear_add(weight, b)(residual, x)
            torch.testing.assert_close(got, residual + torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    # The plain product without a bias is one addmm, the addition included.
    monkeypatch.setattr(skinny, "SKINNY_MIN_WEIGHT", 1 << 18)
    assert skinny.few_row_linear_add(weight).func is torch.addmm
