"""clone_module (the copy ``trace`` makes) and submodule (the fast lookup of the channel passes)."""

import pytest
import torch
import torch.nn as nn
import torchvision

from sparsifx.module_utils import clone_module, submodule


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["efficientnet_b0", "swin_t"])
def test_clone_matches_deepcopy_and_shares_nothing(name):
    model = torchvision.models.get_model(name).eval()
    clone = clone_module(model).eval()
    _same_state(model, clone)
    ptrs = {t.data_ptr() for t in model.state_dict().values()}
    assert not ptrs & {t.data_ptr() for t in clone.state_dict().values()}
    assert [type(p) for p in model.parameters()] == [type(p) for p in clone.parameters()]
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        next(clone.parameters()).zero_()
    assert next(model.parameters()).abs().sum() > 0


def test_clone_keeps_ties_hooks_and_requires_grad():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.cfg = [1, 2]
            self.register_buffer("scale", torch.ones(4))
            self.a.bias.requires_grad_(False)

        def forward(self, x):
            return self.b(self.a(x)) * self.scale

    m = Tied()
    calls = []
    m.a.register_forward_hook(lambda mod, i, o: calls.append(1))
    c = clone_module(m)
    assert c.b.weight is c.a.weight and c.a.weight is not m.a.weight
    assert not c.a.bias.requires_grad and isinstance(c.a.weight, nn.Parameter)
    c.cfg.append(3)
    assert m.cfg == [1, 2]
    c(torch.randn(2, 4))
    assert calls == [1]


def test_clone_falls_back_to_deepcopy_for_custom_copying():
    lstm = nn.LSTM(4, 8)
    c = clone_module(nn.Sequential(lstm))[0]
    assert type(c) is nn.LSTM and c.weight_ih_l0.data_ptr() != lstm.weight_ih_l0.data_ptr()
    x = torch.randn(3, 1, 4)
    torch.testing.assert_close(c(x)[0], lstm(x)[0])
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    gm_clone = clone_module(gm)
    assert isinstance(gm_clone, torch.fx.GraphModule) and gm_clone.code == gm.code
    assert gm_clone.get_submodule("0").weight is not gm.get_submodule("0").weight


def test_submodule_matches_get_submodule():
    model = torchvision.models.resnet18()
    for name, module in model.named_modules():
        assert submodule(model, name) is module
    with pytest.raises(AttributeError):
        submodule(model, "layer1.9")
