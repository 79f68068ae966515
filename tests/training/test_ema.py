"""The EMA of a plain (unsharded) model, by hand; the sharded engines are checked against this
in tests/distributed/test_sharded_ema.py."""

import torch

from rlhf.training.ema import EMA


def _model() -> torch.nn.Module:
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    model.bias.requires_grad_(False)  # frozen: not averaged
    return model


def test_average_by_hand_and_written_back():
    model = _model()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # 0.5 * 1 + 0.5 * 3 = 2
    with torch.no_grad():
        model.weight.fill_(6.0)
    ema.update(model)  # 0.5 * 2 + 0.5 * 6 = 4
    assert sorted(ema.state_dict()) == ["weight"]
    assert torch.equal(ema.state_dict()["weight"], torch.full((1, 2), 4.0))
    with torch.no_grad():
        model.bias.fill_(7.0)
    ema.copy_to(model)
    assert torch.equal(model.weight.detach(), torch.full((1, 2), 4.0))
    assert float(model.bias) == 7.0  # the frozen parameter is left alone


def test_the_average_is_a_copy_and_survives_a_checkpoint():
    model = _model()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(11.0)  # the model moves; the average was taken from a copy
    assert torch.equal(ema.state_dict()["weight"], torch.ones(1, 2))
    ema.update(model)  # 0.9 * 1 + 0.1 * 11 = 2
    restored = EMA(_model(), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.state_dict()["weight"], torch.full((1, 2), 2.0))
