"""``coap-bench step``: the four COAP optimizers (and CoapAdamW against torch.optim.AdamW): optimizer-state
bytes, step time, refresh cost.

Three sections, each printed as a table and written to a JSON file:

1. **State bytes** after one step of ``CoapAdamW``, ``CoapAdamW8bit``, ``CoapAdafactor`` and
   ``CoapAdafactor8bit`` (rank r; Adafactor with ``beta1=0.9``), each against its closed form
   (``coap_*_bytes`` in :mod:`~coap_bench.step.formulas`: README's table with the block count
   rounded up and ``min_8bit_size`` applied to every moment), and ``torch.optim.AdamW``'s
   ``8 * m * n``. ``--state-dtype bf16`` keeps ``P`` and the moments not stored 8-bit in bfloat16
   (COAP's ``state_dtype``): 2 bytes a value in the closed forms.
2. **Step time** of one optimizer step on a single ``nn.Parameter`` with a fixed random gradient:
   for each of the four optimizers its steady step (no refresh of ``P``), its Eq. 2 refresh step,
   its low-cost-SVD refresh step, and the step amortised over a full ``T_u * lambda`` cycle, as
   ratios to the matmul floor (the two ``(m, n, r)`` matmuls ``G P`` and ``U P^T``), with the
   ratio 8-bit / 32-bit of the same optimizer; and CoapAdamW's step against
   ``torch.optim.AdamW`` (``foreach=False`` and ``foreach=True``) and against the *floor*: the
   two matmuls plus Adam's elementwise moment update on the ``m * r`` projected entries, all
   timed in the same run. ``(m, n)`` is the matrix the optimizer works on, ``P`` (n, r): the
   weight with ``P`` on its input side, its transpose with ``P`` on its first axis (the library's
   default, the smaller side, does that to wide weights); the floor follows the optimizer's layout
   (``--projection-side`` sets it).
3. **Refresh cost** at one shape: ``correlation_aware_step`` and the warm-started ``low_cost_svd``
   as ratios to a full ``torch.linalg.svd(G, full_matrices=False)`` (GaLore's per-refresh cost),
   and the closed-form Eq. 2 step against an autograd reference of the same step.

Run ``coap-bench step --help`` for the options; ``--quick`` is a smoke test that finishes in
seconds. Targets are printed as PASS / FAIL markers; nothing is asserted.
"""

from .benchmark import run_step

__all__ = ["run_step"]
