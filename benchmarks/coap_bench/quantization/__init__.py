"""``coap-bench quantization``: block-wise 8-bit quantization backends for optimizer state, compared on
this machine.

The 8-bit COAP optimizers (``CoapAdamW8bit``, ``CoapAdafactor8bit``) store each moment as uint8
codes of a dynamic code map with one float32 absmax per block of 256 values, quantized and
dequantized by the pure-torch codec in ``coap_torch.functional.quantization``. This command puts
that codec next to the libraries that offer the same kind of state:

* **ours**: ``coap_torch.functional.quantization.quantize_blockwise`` / ``dequantize_blockwise``
  (signed map for first moments, unsigned map for second moments); also, for second moments,
  **ours, sqrt-stored**: what the 8-bit optimizers actually do with ``v`` (quantize ``sqrt(v)``
  with the unsigned map, square after dequantizing);
* **bitsandbytes**: ``bitsandbytes.functional.quantize_blockwise`` / ``dequantize_blockwise``
  with ``blocksize=256``: the default (signed) dynamic map for signed data, and
  ``create_dynamic_map(signed=False)`` (the map bitsandbytes' 8-bit optimizers use for their
  second state) for non-negative data;
* **torchao (eager)**: ``torchao.optim.subclass_8bit.OptimState8bit``, the tensor subclass of
  torchao's ``AdamW8bit``: ``OptimState8bit.zeros(shape, signed, block_size=256)``, quantized by
  ``copy_`` from a float tensor and read back by ``dequantize()``;
* **torchao (compiled)**: the helpers that subclass uses (``scale_tensor`` +
  ``quantize_8bit_with_qmap``, ``dequant_with_qmap``) under ``torch.compile``, as torchao's
  optimizers run them (compilation time reported apart; ``--no-compile`` skips it).

For each backend and each kind of data (normal values, signed; squared normal values, unsigned,
like second moments), at one moment shape (default ``5632x512``: the moment of a ``2048x5632``
matrix at rank 512):

1. **time** of quantize and of dequantize (median of ``--repeats`` samples, the backends timed
   round-robin so that load from other processes hits them alike), their sum, and the ratio of
   the sum to ours measured in the same run (also from the fastest samples);
2. **round-trip error**: ``max |x - deq(q(x))| / max |x|``, the same per block of 256 against the
   block's absmax, the mean relative error ``mean(|x - deq(q(x))| / |x|)`` over non-zero ``x``,
   the relative RMS error, and the fraction of non-zero values decoded as 0;
3. **dependency size**: what installing the backend adds (``du`` of its site-packages folders,
   and the installed size of each requirement other than torch).

Backends that cannot be imported (or fail at their first call) are skipped with a line that says
why. The results are printed as tables and written to JSON (``results/bench_quantization.json``).
bitsandbytes and torchao are *not* dependencies of coap-torch: install them to compare
(``pip install bitsandbytes``; ``pip install --no-deps torchao``), uninstall them afterwards.
"""

from .benchmark import run_quantization

__all__ = ["run_quantization"]
