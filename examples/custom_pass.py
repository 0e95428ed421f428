"""Write, register and use a pass from a recipe: every ReLU becomes a LeakyReLU."""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import sparsifx
from sparsifx import PassBase, PassResult, validate


@sparsifx.register_pass("leaky_relu")
class LeakyReLUPass(PassBase):
    """relu(x) -> leaky_relu(x, negative_slope). Parameter: negative_slope in [0, 1]."""

    in_place = True  # call() rewrites gm and returns it (False: a functional pass returning a new module)

    def __init__(self, *, negative_slope: float = 0.01):
        self.slope = validate.number("negative_slope", negative_slope, 0.0, 1.0)

    def call(self, gm):
        mods = dict(gm.named_modules())
        relus = [n for n in gm.graph.nodes if n.target in (F.relu, torch.relu) or type(mods.get(n.target)) is nn.ReLU]
        for node in relus:
            with gm.graph.inserting_after(node):
                leaky = gm.graph.call_function(F.leaky_relu, (node.args[0], self.slope))
            node.replace_all_uses_with(leaky)
            gm.graph.erase_node(node)
        gm.recompile()
        return PassResult(gm, modified=bool(relus))


RECIPE = "stages: [{pass: leaky_relu, negative_slope: 0.1}, {pass: magnitude, sparsity: 0.5}]"

if __name__ == "__main__":
    torch.manual_seed(0)
    gm = sparsifx.sparsify(torchvision.models.resnet18(weights=None), RECIPE, torch.randn(1, 3, 64, 64))
    print("leaky_relu nodes:", sum(n.target is F.leaky_relu for n in gm.graph.nodes))
    print("history:", [(h.name, h.modified) for h in gm.meta["history"]])
