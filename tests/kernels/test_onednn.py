"""oneDNN linear layers: the values and gradients of F.linear, the kernels chosen by the CPU
and kernels.cpu_matmul (RLHF_CPU_MATMUL) alone, and layers that must keep F.linear keep it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.config_sections import KernelsConfig
from rlhf.kernels import onednn
from rlhf.kernels.cpu_linear import CPULinear, use_cpu_linears
from rlhf.kernels.skinny import few_row_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


@pytest.fixture
def enabled(monkeypatch):
    monkeypatch.setattr(onednn, "onednn_enabled", lambda: True)
    monkeypatch.setattr(onednn, "decode_packing_enabled", lambda: True)


@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_f_linear(bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 48, requires_grad=True)
    weight = torch.randn(40, 48, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    grad_out = torch.randn(3, 5, 40)

    def run(fn):
        out = fn(x, weight, b)
        grads = torch.autograd.grad(out, [x, weight] + ([b] if bias else []), grad_out)
        return out, grads

    (ours, our_grads), (theirs, their_grads) = run(onednn.linear), run(F.linear)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for got, expected in zip(our_grads, their_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the no-autograd path
        torch.testing.assert_close(onednn.linear(x, weight, b), theirs, rtol=1e-5, atol=1e-5)


def test_gradient_of_a_non_contiguous_upstream_and_empty_inputs():
    torch.manual_seed(0)
    weight = torch.randn(16, 8, requires_grad=True)
    x = torch.randn(4, 6, 8, requires_grad=True)
    # A slice of the output (as PPO takes logits[:, :-1]) sends back a non-contiguous gradient.
    ours = torch.autograd.grad(onednn.linear(x, weight)[:, :-1].square().sum(), [x, weight])
    theirs = torch.autograd.grad(F.linear(x, weight)[:, :-1].square().sum(), [x, weight])
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert onednn.linear(torch.randn(0, 8), weight).shape == (0, 16)


def test_other_dtypes_and_sharded_weights_keep_f_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(onednn, "_product", lambda *a: calls.append(1))
    weight = torch.randn(4, 4)
    onednn.linear(torch.randn(2, 4, dtype=torch.bfloat16), weight.bfloat16())
    zero3 = torch.nn.Parameter(weight.clone())
    zero3.ds_id = 7  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    onednn.linear(torch.randn(2, 4), zero3)
    assert calls == []
    onednn.linear(torch.randn(2, 4), weight)
    assert calls == [1]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def test_a_model_with_cpu_linears_trains_like_the_plain_one_and_copies_keep_their_own_weights(enabled):
    plain = tiny_llama()
    swapped = copy.deepcopy(plain)
    assert use_cpu_linears(swapped) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert use_cpu_linears(swapped) == 0  # already swapped
    assert all(type(m) is CPULinear for m in swapped.modules() if isinstance(m, torch.nn.Linear))
    assert swapped.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, 101, (3, 12), generator=torch.Generator().manual_seed(1))
    calls = []
    real = onednn.linear
    onednn.linear = lambda *a: calls.append(1) or real(*a)  # noqa: E731
    try:
        losses = []
        for model in (plain, swapped):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
    finally:
        onednn.linear = real
    assert len(calls) == 2 * 7 + 1  # the swapped model's layers went through oneDNN, the plain one's not
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), swapped.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)

    # A deep copy computes with its own weights: changing them changes only its output.
    twin = copy.deepcopy(swapped)
    with torch.no_grad():
        before = swapped(input_ids=ids).logits
        twin.lm_head.weight.mul_(2)  # tied to the embedding: every layer's input changes too
        assert torch.equal(swapped(input_ids=ids).logits, before)
        assert not torch.allclose(twin(input_ids=ids).logits, before)


def test_nothing_is_rebound_on_a_module():
    model = tiny_llama()
    use_cpu_linears(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_the_choice_follows_the_config_and_the_cpu(monkeypatch):
    def choice(value, vendor="AuthenticAMD", capability="AVX512", decode=False):
        monkeypatch.setattr(onednn, "_cpu_vendor", lambda: vendor)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        onednn._onednn_for.cache_clear()
        onednn._packing_for.cache_clear()
        previous = onednn._matmul[0]
        try:
            onednn.set_cpu_matmul(value)
            return onednn.decode_packing_enabled() if decode else onednn.onednn_enabled()
        finally:
            onednn._matmul[0] = previous
            onednn._onednn_for.cache_clear()
            onednn._packing_for.cache_clear()

    assert choice("blas") is False
    assert choice("onednn", vendor="GenuineIntel", capability="AVX2") is True
    assert choice("auto") is (torch.backends.mkl.is_available())
    assert choice("auto", vendor="GenuineIntel") is False  # MKL uses AVX-512 on Intel itself
    assert choice("auto", capability="AVX2") is False
    # Decode steps pack for oneDNN on any CPU, training's BLAS chips included, unless told blas.
    for vendor, capability in (("AuthenticAMD", "AVX2"), ("GenuineIntel", "AVX512"), ("AuthenticAMD", "AVX512")):
        assert choice("auto", vendor, capability, decode=True) is True
    assert choice("blas", decode=True) is False
    with pytest.raises(ValueError, match="kernels.cpu_matmul"):
        choice("fast")


def test_the_environment_overrides_the_config_and_the_run_records_it(monkeypatch):
    monkeypatch.setenv("RLHF_CPU_MATMUL", "blas")
    monkeypatch.setenv("RLHF_TUNE_HOST_MEMORY", "0")
    effective = KernelsConfig(cpu_matmul="onednn").effective()
    assert (effective.cpu_matmul, effective.tune_host_memory) == ("blas", False)
    monkeypatch.delenv("RLHF_CPU_MATMUL")
    monkeypatch.delenv("RLHF_TUNE_HOST_MEMORY")
    assert KernelsConfig(cpu_matmul="onednn").effective() == KernelsConfig(cpu_matmul="onednn")


@pytest.mark.parametrize("rows", [1, 3, 8, 32])
def test_packed_decode_weights_give_the_plain_product(enabled, rows):
    torch.manual_seed(0)
    weight, bias = torch.randn(1024, 512), torch.randn(1024)  # 2^19 elements: above the packing size
    layer = few_row_linear(weight, bias)
    assert layer.func is onednn.packed_linear
    x = torch.randn(rows, 512)
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    assert few_row_linear(torch.randn(16, 16)).func is F.linear  # small weights stay as they are
