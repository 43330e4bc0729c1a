"""The SDQ search as a pass over a prepared GraphModule whose quantizers are ``"sdq"`` quantizers.

The paper (Huang et al., ICML 2022) states that Differentiable Bitwidth Parameters (DBPs) drive a stochastic
choice between adjacent bit-widths and that a search phase yields the mixed-precision plan; its schedule,
cost term and rounding were not available. This search is our design (docs/design.md, section "SDQ search"):

1. **Units.** Layers that must share bits (:func:`~fxquant.passes.analysis.layer_graph.tie_groups`) form one *unit*
   per role (weights, activations), with one shared DBP and one shared noise draw per step. A unit with a
   member whose bits are fixed (first/last layer, a per-layer override, a non-SDQ quantizer, or activations
   that are not searched) is fixed at those bits.
2. **Search.** Every searched unit starts at ``Budget.max_bits``. Each step samples every unit's choice,
   and minimises ``task loss + λ·max(0, E[cost]/budget − 1)`` where ``E[cost]`` is the exact expected cost
   under the keep-probabilities (:mod:`~fxquant.passes.analysis.cost_model`); model weights and quantizer
   parameters train with SGD (momentum), DBPs with plain SGD at their own rate. At the end of every
   interval, a unit whose keep-probability is below ``threshold`` steps down one bit (down to
   ``Budget.min_bits``) and its DBP restarts. Under a ``latency_ms`` budget a unit's *ladder* holds only the
   bit-widths that are cheaper on the target than the next higher one (:func:`with_ladders`), and "one bit
   down" means the next rung: on a core where 3-7 bits run the same int8 kernel as 8, a unit goes 8 -> 2.
3. **Sensitivity.** While a unit sits at ``k`` bits, its DBPs record the task-loss gradient reaching their
   relaxed samples, ``∂L/∂z ≈ L(k) − L(k − 1)`` (see :mod:`fxquant.quantizers.sdq`); its mean, summed over
   the unit's members and negated, is the measured loss ``m(k)`` of the step from ``k`` to ``k − 1``.
   Single measurements are noisy (a few steps each, often of either sign), so the rounding uses the
   noise-power model ``s(k) = A·4^(−k)`` (quantization-noise power grows 4× per bit removed; a step from
   ``k`` down to ``l`` costs ``A·(4^(−l) − 4^(−k))/3``, which is ``A·4^(−k)`` for ``l = k − 1``), with ``A``
   fitted to all of the unit's measurements by least squares and floored at 1% of the median positive
   ``A`` of all units (a unit with no measurable loss is the cheapest, but not free).
4. **Rounding** (:func:`round_to_budget`): deterministic and budget-exact. While the plan is over budget,
   lower the unit with the smallest ``s(k)`` per unit of cost saved; then, optionally, raise the unit with
   the largest ``s(k + 1)`` per unit of cost added while the budget still holds.

The loop checkpoints (model, DBPs, bits, optimizer, RNG states, step) so that a resumed search continues
from the saved step and reproduces the uninterrupted run bit for bit (same seed, same loader order).
"""
