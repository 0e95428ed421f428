"""``channel_prune`` says when little was pruned: achieved vs requested, barriers ranked, typed error on demand."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torchvision

import sparsifx
from sparsifx.errors import PassError, RecipeError
from sparsifx.passes.channels import ChannelPrune
from sparsifx.passes.channels.outcome import ChannelShortfallError, PruneOutcome
from sparsifx.selection import LayerSelection
from sparsifx.tracing import trace

X = (torch.randn(1, 3, 16, 16),)
LOGGER = "sparsifx.passes.channels.prune"


@torch.fx.wrap
def mystery(x):
    """A user op the channel analysis has no rule for: a barrier."""
    return x.flip(1)


class Blocked(nn.Module):
    """a1 and a2 (128 channels, coupled by the residual add) feed ``mystery``; only head's 8 can prune."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
        self.head, self.fc = nn.Conv2d(64, 8, 1), nn.Linear(8, 10)

    def forward(self, x):
        y = self.a1(x)
        y = y + self.a2(torch.relu(y))
        return self.fc(self.head(mystery(y)).mean((2, 3)))


def blocked() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return trace(Blocked().eval(), X)


def test_barrier_shortfall_warns_names_the_barrier_and_reaches_the_report(caplog):
    gm = blocked()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = ChannelPrune(ratio=0.5)(gm)
    assert result.modified is True
    outcome = gm.meta["channel_outcome"]
    # a1 + a2 + head = 136 channels requested (fc's 10 classes are a model output: not counted); 4 of head's removed
    assert (outcome.channels, outcome.removed, outcome.requested) == (136, 4, 0.5)
    assert outcome.achieved == pytest.approx(4 / 136) and outcome.shortfall
    assert outcome.blockers == [
        {"op": "mystery", "reason": "no channel rule for this op", "nodes": ["mystery"], "channels": 128}
    ]
    assert gm.meta["channel_barriers"][0]["channels"] == 128
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "mystery" in warnings[0].getMessage() and "128 channels" in warnings[0].getMessage()
    report = sparsifx.report(gm)
    assert any("pruned little" in n and "mystery" in n for n in report.notes)
    assert "mystery" in str(report) and "2.9%" in str(report)


def test_min_achieved_ratio_raises_a_typed_error_before_zeroing():
    gm = blocked()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(ChannelShortfallError, match=r"mystery.*128 channels.*min_achieved_ratio 0.3") as info:
        ChannelPrune(ratio=0.5, min_achieved_ratio=0.3)(gm)
    assert isinstance(info.value, PassError)
    assert isinstance(info.value.outcome, PruneOutcome) and info.value.outcome.removed == 4
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert "channel_plan" not in gm.meta


def test_min_achieved_ratio_from_a_recipe_and_its_validation():
    recipe = {"stages": [{"pass": "channel_prune", "ratio": 0.5, "min_achieved_ratio": 0.3}]}
    with pytest.raises(ChannelShortfallError):
        sparsifx.sparsify(Blocked().eval(), recipe, X)
    for bad in (1.5, -0.1, "high", True):
        with pytest.raises(RecipeError, match="min_achieved_ratio"):
            ChannelPrune.from_params({"min_achieved_ratio": bad})
    assert ChannelPrune.from_params({"min_achieved_ratio": None}).min_achieved_ratio is None


def test_channels_not_requested_do_not_count():
    """Ignoring the layers behind the barrier leaves head's 8 channels as the request: no shortfall."""
    gm = blocked()
    ChannelPrune(ratio=0.5, min_achieved_ratio=0.45, selection=LayerSelection(ignore=("a1", "a2")))(gm)
    outcome = gm.meta["channel_outcome"]
    assert (outcome.channels, outcome.removed, outcome.shortfall) == (8, 4, False)
    assert outcome.blockers == []  # mystery holds a1/a2 whole, but they were not asked for


def test_normal_model_prunes_what_was_asked_without_warning(caplog):
    torch.manual_seed(0)
    gm = trace(torchvision.models.resnet18(num_classes=10).eval(), (torch.randn(1, 3, 32, 32),))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ChannelPrune(ratio=0.5, min_achieved_ratio=0.45)(gm)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    outcome = gm.meta["channel_outcome"]
    assert outcome.channels == 4800 and outcome.achieved == pytest.approx(0.5) and not outcome.blockers
    assert not any("pruned little" in n for n in gm.meta["report_notes"])
    assert outcome.to_dict()["removed"] == 2400


def test_ratio_zero_requests_nothing():
    gm = blocked()
    ChannelPrune(ratio=0.0, min_achieved_ratio=0.5)(gm)
    assert gm.meta["channel_outcome"].channels == 0 and not gm.meta["channel_outcome"].shortfall
