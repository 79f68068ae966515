"""A head computing the loss: `lm_forward_nll` gives the same loss and gradients as from full
logits, a tied embedding adds its rows into the head's gradient, plain forwards are untouched,
and models it cannot serve keep their logits. Nothing is patched: the layers get subclasses."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, GPT2Config, Gemma2Config, LlamaConfig, Qwen2Config

from rlhf.data.sft_dataset import IGNORE_INDEX, SFTExample, collate_padded, collate_padding_free
from rlhf.config_sections import LoraConfig
from rlhf.kernels import fused_head
from rlhf.kernels.cpu_linear import use_cpu_linears
from rlhf.kernels.fused_head import LossHead, TiedEmbedding, loss_head, use_fused_head_loss
from rlhf.models.lora import apply_lora
from rlhf.kernels.lm_loss import lm_forward_nll

CONFIGS = {  # llama-tied's embedding has a padding row (its lookup gets no gradient)
    "llama-tied": LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              tie_word_embeddings=True, pad_token_id=0),
    "llama": LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "gpt2": GPT2Config(vocab_size=97, n_positions=128, n_embd=32, n_layer=2, n_head=4),
}


def _batch(padding_free: bool):
    generator = torch.Generator().manual_seed(0)
    examples = []
    for prompt, answer in ((5, 7), (9, 3), (2, 11)):
        ids = torch.randint(0, 97, (prompt + answer,), generator=generator).tolist()
        examples.append(SFTExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return collate_padding_free(examples) if padding_free else collate_padded(examples, pad_token_id=0)


def _loss_and_grads(model, batch):
    model.zero_grad()
    nll, n = lm_forward_nll(model, batch)
    nll.backward()
    return nll.detach(), n, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padding_free", [True, False])
def test_loss_and_every_gradient_equal_full_logits(name, padding_free):
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(CONFIGS[name]).eval()  # no dropout: both sides equal
    use_cpu_linears(plain)
    fused = copy.deepcopy(plain)
    assert use_fused_head_loss(fused)
    batch = _batch(padding_free)
    expected, expected_n, expected_grads = _loss_and_grads(plain, batch)
    calls = []
    real = fused_head.linear_cross_entropy
    fused_head.linear_cross_entropy = lambda *a: calls.append(1) or real(*a)
    try:
        got, n, grads = _loss_and_grads(fused, batch)
    finally:
        fused_head.linear_cross_entropy = real
    assert calls == [1] and n == expected_n == batch.num_target_tokens
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], expected_grads[key], rtol=1e-4, atol=1e-6, msg=key)


class _CountDenseEmbeddingGradients(TorchDispatchMode):
    """Dense vocabulary-sized gradients of embedding lookups (GPT-2's positions not counted)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.aten.embedding_dense_backward.default and args[2] == 97
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["llama-tied", "gpt2"])
def test_tied_embedding_adds_its_rows_into_the_head_gradient(name):
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(CONFIGS[name]).eval()
    fused = copy.deepcopy(plain)
    assert use_fused_head_loss(fused)
    assert fused.get_input_embeddings().weight is fused.lm_head.weight
    assert type(fused.get_input_embeddings()) is TiedEmbedding and type(fused.lm_head) is LossHead
    first, second = _batch(padding_free=False), _batch(padding_free=True)
    second.input_ids[0, 3:6] = 0  # real tokens with the padding id: the lookup gives them no gradient
    ids = torch.randint(0, 97, (2, 9))
    fused(input_ids=ids)  # a forward whose graph is dropped leaves nothing behind for the next

    def accumulate(model):
        # Two micro-batches into one gradient (the second adds into .grad), the loss scaled as
        # the stages scale it, then a backward through plain logits (PPO's log-probs).
        model.zero_grad()
        counter = _CountDenseEmbeddingGradients()
        with counter:
            for batch in (first, second):
                nll, _ = lm_forward_nll(model, batch)
                (nll / 7).backward()
        with_loss = counter.calls
        with counter:
            model(input_ids=ids).logits.logsumexp(-1).sum().backward()
        return with_loss, counter.calls - with_loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_dense, plain_logits_dense, expected = accumulate(plain)
    fused_dense, fused_logits_dense, got = accumulate(fused)
    assert (plain_dense, plain_logits_dense) == (2, 1)
    assert (fused_dense, fused_logits_dense) == (0, 1)  # the lookup's rows went into the head's buffer
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_an_untied_copy_keeps_each_weight_its_own_gradient():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama-tied"]).eval()
    plain = copy.deepcopy(model)
    assert use_fused_head_loss(model)
    # Untied after the switch (as a resize or an adapter may do): the head gets its own weight.
    for each in (model, plain):
        each.lm_head.weight = torch.nn.Parameter(each.lm_head.weight.detach().clone())
    batch = _batch(padding_free=False)
    _, _, expected = _loss_and_grads(plain, batch)
    _, _, got = _loss_and_grads(model, batch)
    for key in ("lm_head.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_plain_forwards_unchanged_and_a_copy_uses_its_own_weights():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]).eval()
    ids = torch.randint(0, 97, (2, 9))
    before = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fused_head_loss(model) and use_fused_head_loss(model)  # twice: swapped once
    assert type(model.lm_head) is LossHead and model.state_dict().keys() == state.keys()
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    copied = copy.deepcopy(model)
    assert loss_head(copied) is copied.lm_head  # the copy's own head, with its own weight
    with torch.no_grad():
        copied.lm_head.weight.mul_(2)
    assert not torch.allclose(copied(input_ids=ids).logits, before)
    batch = _batch(padding_free=False)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    assert lm_forward_nll(model, batch)[1] == batch.num_target_tokens
    # The head called with targets is the loss of those rows, as cross-entropy of its logits.
    hidden, targets = torch.randn(5, 64), torch.randint(0, 97, (5,))
    expected = torch.nn.functional.cross_entropy(model.lm_head(hidden), targets, reduction="sum")
    torch.testing.assert_close(model.lm_head(hidden, targets=targets), expected, rtol=1e-5, atol=1e-5)


def test_models_it_cannot_serve_keep_their_logits():
    softcapped = AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128))
    assert not use_fused_head_loss(softcapped)  # its forward softcaps the head's output
    # LoRA on the head after the switch (the stage's order): the wrapped head gives logits.
    lora_head = AutoModelForCausalLM.from_config(CONFIGS["llama"]).eval()
    assert use_fused_head_loss(lora_head)
    lora_head = apply_lora(lora_head, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert type(lora_head.get_output_embeddings()) is not LossHead
    assert loss_head(lora_head) is None  # its loss comes from the logits
    batch = _batch(padding_free=False)
    nll, n = lm_forward_nll(lora_head, batch)
    assert torch.isfinite(nll) and n == batch.num_target_tokens


class _HeadProductDtypes(TorchDispatchMode):
    """Dtypes of the products that give vocabulary-wide (97) outputs: the head's logits."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.linear) \
                and out.shape[-1] == 97:
            self.dtypes.add(out.dtype)
        return out


def test_under_autocast_the_head_computes_in_bf16_and_the_fp32_weights_get_their_gradients():
    # Mixed precision as the single strategy runs it (rlhf/models/autocast.py): fp32 weights,
    # products in bf16. The fused loss gives the plain head's loss and gradients to bf16
    # rounding, in fp32, and the tied embedding's rows still reach the head's gradient.
    from rlhf.models.autocast import use_autocast

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(CONFIGS["llama-tied"]).eval()
    fused = copy.deepcopy(plain)
    fp32 = copy.deepcopy(plain)
    assert use_fused_head_loss(fused) and type(fused.get_input_embeddings()) is TiedEmbedding
    for model in (plain, fused):
        use_autocast(model, torch.bfloat16)
    batch = _batch(padding_free=False)
    expected, _, expected_grads = _loss_and_grads(plain, batch)
    exact, _, _ = _loss_and_grads(fp32, batch)
    products = _HeadProductDtypes()
    with products:
        got, _, grads = _loss_and_grads(fused, batch)
    assert products.dtypes == {torch.bfloat16}
    assert got.dtype == torch.float32 and got != exact  # bf16 rounding shows
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert grads.keys() == expected_grads.keys()
    for key in grads:
        assert grads[key].dtype == torch.float32
        scale = expected_grads[key].abs().max()
        torch.testing.assert_close(grads[key], expected_grads[key], rtol=0, atol=float(2e-2 * scale), msg=key)
