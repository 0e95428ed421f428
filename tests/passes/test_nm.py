"""Pass ``nm``: exactly N non-zeros per M along the input dimension, by magnitude; GPU lowering."""

import pytest
import torch
import torch.nn as nn
import torchvision

import sparsifx
from sparsifx.errors import RecipeError
from sparsifx.masking import effective_weight, get_mask, is_masked
from sparsifx.passes.nm import NMSparsity, is_nm, nm_mask


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_mask_exact_and_by_magnitude(n, m):
    w = torch.randn(16, 32)
    mask = nm_mask(w, n, m)
    groups = mask.reshape(-1, m)
    assert torch.equal(groups.sum(1), torch.full((groups.shape[0],), float(n)))
    kept = (w.abs().reshape(-1, m) * groups).masked_fill(groups == 0, float("inf")).min(1).values
    dropped = (w.abs().reshape(-1, m) * (1 - groups)).max(1).values
    assert bool((kept >= dropped).all())  # every kept weight outweighs every dropped one in its group
    assert is_nm(mask, n, m) and not is_nm(torch.ones_like(w), n, m)


def test_nm_pass_on_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    gm = sparsifx.trace(model)
    x = torch.randn(2, 3, 32, 32)
    result = NMSparsity()(gm)
    assert result.modified and result.gm is gm
    gm.graph.lint()
    extra = gm.meta["report_extra"]
    assert "skipped" in extra["conv1"]["nm"] and not is_masked(gm.conv1)  # 3*7*7 = 147 is not a multiple of 4
    masked = [(n, m) for n, m in gm.named_modules() if is_masked(m)]
    assert len(masked) == 20  # 19 convs after conv1 + fc
    for name, mod in masked:
        assert is_nm(get_mask(mod), 2, 4), name
        w = effective_weight(mod).reshape(mod.weight.shape[0], -1).reshape(-1, 4)
        assert bool(((w != 0).sum(1) == 2).all()), name
    with torch.no_grad():
        y = gm(x)
    assert y.shape == (2, 10)
    assert NMSparsity()(gm).modified is False  # the same masks again


def test_nm_recipe_overrides_and_validation():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    out = sparsifx.sparsify(model, {"stages": [{"pass": "nm", "by_name": {"2": {"n": 1, "m": 8}}}]})
    assert is_nm(get_mask(out.get_submodule("0")), 2, 4) and is_nm(get_mask(out.get_submodule("2")), 1, 8)
    with pytest.raises(RecipeError, match="n"):
        NMSparsity(n=4, m=4)
    with pytest.raises(RecipeError, match="m"):
        NMSparsity(m=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_semi_structured_needs_cuda():
    gm = sparsifx.trace(nn.Sequential(nn.Linear(64, 64)))
    with pytest.raises(sparsifx.SparsifxError, match="CUDA"):
        NMSparsity(semi_structured=True)(gm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_semi_structured_on_gpu():
    from sparsifx.backends.semi_structured import SemiStructuredLinear

    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).half().cuda().eval()
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    masked = sparsifx.sparsify(model, {"stages": [{"pass": "nm"}]})
    with torch.no_grad():
        ref = masked(x)
    out = sparsifx.sparsify(model, {"stages": [{"pass": "nm", "semi_structured": True}]})
    assert isinstance(out.get_submodule("0"), SemiStructuredLinear)
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref, rtol=1e-2, atol=1e-2)
