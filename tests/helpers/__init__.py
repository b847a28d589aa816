"""What the test folders share: the optimizer database (:mod:`helpers.optim_db`), the small net and
its training loop (:mod:`helpers.nets`), the gloo launcher (:mod:`helpers.launch`) and the FSDP2
nets (:mod:`helpers.fsdp`). The float64 oracle is its own package, :mod:`reference`.

``tests`` is on ``sys.path`` through pytest's ``pythonpath`` setting (``pyproject.toml``): the
helpers import as ``helpers.*`` from every folder, and from the processes the distributed tests
spawn (they start with the parent's ``sys.path``).
"""
