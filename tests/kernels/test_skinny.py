"""Few-row products on the CPU: `CPULinear` gives nn.Linear's numbers, taking the transposed
product only for few rows and large weights; the decode step's prepared products equal the sum."""

import pytest
import torch

from rlhf.kernels import cpu_linear, onednn, skinny
from rlhf.kernels.cpu_linear import CPULinear, use_cpu_linears
from rlhf.kernels.skinny import SKINNY_ROWS


def test_same_outputs_for_few_and_many_rows(monkeypatch):
    monkeypatch.setattr(skinny, "SKINNY_MIN_WEIGHT", 256)  # the 8 x 4 layer stays below it
    monkeypatch.setattr(onednn, "onednn_enabled", lambda: False)  # the BLAS path
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8, bias=False),
                                torch.nn.GELU(), torch.nn.Linear(8, 4))
    few, many = torch.randn(2, 3, 16), torch.randn(SKINNY_ROWS + 1, 16)
    expected = model(few), model(many)
    assert use_cpu_linears(model) == 3
    calls = []
    original_mm = torch.mm

    def counting_mm(*args, **kwargs):
        calls.append(args[0].shape)
        return original_mm(*args, **kwargs)

    torch.mm = counting_mm
    try:
        got = model(few), model(many)
    finally:
        torch.mm = original_mm
    # The 6-row input went through the transposed product in the two large layers; the 65-row
    # one did not, nor did the small last layer.
    assert calls == [torch.Size([32, 16]), torch.Size([8, 32])]
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_subclassed_linears_keep_their_forward():
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = torch.nn.Sequential(Scaled(4, 4), torch.nn.Linear(4, 4))
    assert use_cpu_linears(model) == 1
    assert type(model[0]) is Scaled and type(model[1]) is CPULinear


@pytest.mark.parametrize("path", ["plain", "transposed", "packed"])
def test_residual_products_equal_the_sum_on_every_path(monkeypatch, path):
    if path == "packed" and not onednn._onednn_for("onednn"):
        pytest.skip("this torch build has no oneDNN linear")
    torch.manual_seed(0)
    x, residual = torch.randn(8, 16), torch.randn(8, 32)
    weight, bias = torch.randn(32, 16), torch.randn(32)
    monkeypatch.setattr(skinny, "SKINNY_MIN_WEIGHT", 1 << 18 if path == "plain" else 256)
    monkeypatch.setattr(skinny, "PACKED_MIN_WEIGHT", 1 << 17 if path == "plain" else 256)
    monkeypatch.setattr(onednn, "decode_packing_enabled", lambda: path == "packed")
    for b in (None, bias):
        got = skinny.few_row_linear_add(weight, b)(residual, x)
        torch.testing.assert_close(got, residual + torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    if path == "plain":  # the plain product without a bias is one addmm, the addition included
        assert skinny.few_row_linear_add(weight).func is torch.addmm
