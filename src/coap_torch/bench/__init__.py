"""The main job, ``coap-bench``: train the same small model once per optimizer and compare them.

Needs the ``bench`` extra (``pip install "coap-torch[bench]"``: scikit-learn, tqdm, numpy). It is
never imported by :mod:`coap_torch` itself, and the extra's modules are imported only when a
benchmark runs.
"""

from __future__ import annotations

__all__: list[str] = []
