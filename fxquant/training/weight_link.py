"""Copy the training of a prepared model back into the float model it was prepared from.

SDQ trains the weights together with the bit-width parameters; the paper's final stage continues from those
weights at the chosen bits. :func:`fxquant.prepare` works on a copy, so the search keeps a
:class:`WeightLink` between the user's model and its own copy: the prepared graph shares the copy's leaf
modules (convolutions, linears, batch norms, anything else with parameters), so after training the copy
holds the trained values under the model's own names.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from fxquant.errors import ConfigError
from fxquant.quantizers.base import Quantizer

__all__ = ["WeightLink"]


class WeightLink:
    """A private copy of ``model`` (:attr:`working`) whose parameters and buffers can be written back."""

    def __init__(self, model: nn.Module):
        self.target = model
        self.working = copy.deepcopy(model)
        # taken before tracing: passes may rewrite a GraphModule's tree, never the leaf modules it shares
        self._modules_by_name = dict(self.working.named_modules())

    def check_shared(self, gm: fx.GraphModule) -> None:
        """Raise when a trained parameter of ``gm`` (outside the quantizers) is not the working copy's own,
        e.g. weights folded into new tensors (``fold_bn="inference"``): writing back would lose them."""
        known = {id(p) for m in self._modules_by_name.values() for p in m.parameters(recurse=False)}
        known |= {id(p) for m in gm.modules() if isinstance(m, Quantizer) for p in m.parameters()}
        foreign = [name for name, p in gm.named_parameters() if id(p) not in known]
        if foreign:
            raise ConfigError(
                f"cannot write the trained weights back into the model: {', '.join(sorted(foreign))} "
                "are new tensors, not the model's (fold_bn='inference' folds batch norms into new weights; "
                "use fold_bn='qat' or 'none')"
            )

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy every parameter and buffer of the working copy into the model."""
        for name, source in self._modules_by_name.items():
            dest = self.target.get_submodule(name) if name else self.target
            for table in ("_parameters", "_buffers"):
                for key, value in getattr(source, table).items():
                    old = getattr(dest, table).get(key)
                    if value is None or old is None:
                        continue
                    old.copy_(value.detach().to(old.device))
