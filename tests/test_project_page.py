"""The usage snippets of the paper's project page run as written (code written for the paper's
release keeps working with ours).

The snippet below is the project page's, character for character except for the indentation of
its continuation lines; ``model`` and ``learning_rate`` are what a user's script defines.
"""

from __future__ import annotations

import textwrap

import torch

PROJECT_PAGE_SNIPPET = """
from coap_torch import CoapAdamW, CoapAdafactor
# AdamW
optimizer = AdamW(model.parameters(), lr=learning_rate)
# CoapAdamW
optimizer = CoapAdamW(params=model.parameters(),
                      lr=learning_rate,
                      rank_ratio_matrix=2,
                      rank_ratio_cnn=2,
                      update_interval=32,
                      reproject_factor=5)
# CoapAdafactor
optimizer = CoapAdafactor(params=model.parameters(),
                          lr=learning_rate,
                          rank_ratio_matrix=2,
                          rank_ratio_cnn=2,
                          update_interval=32,
                          reproject_factor=5)
"""


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10),
    )  # fmt: skip


def test_project_page_snippet_runs_as_written_and_each_optimizer_trains():
    namespace = {"model": _model(), "learning_rate": 1e-3, "AdamW": torch.optim.AdamW}
    exec(textwrap.dedent(PROJECT_PAGE_SNIPPET), namespace)  # noqa: S102 - the snippet under test
    # Each assignment in turn, trained for a few steps on a fixed batch. (CoapAdafactor multiplies
    # the lr by the weights' RMS, scale_parameter=True, as transformers' and the release's do.)
    for line in ("AdamW(", "CoapAdamW(", "CoapAdafactor("):
        start = PROJECT_PAGE_SNIPPET.index(f"optimizer = {line}")
        end = PROJECT_PAGE_SNIPPET.find("# ", start)
        model = _model()
        scope = {**namespace, "model": model}
        exec(PROJECT_PAGE_SNIPPET[start : end if end > 0 else None], scope)  # noqa: S102
        optimizer = scope["optimizer"]
        x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
        losses = []
        for _ in range(15):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0], line


def test_the_page_adafactor_uses_the_given_lr_not_relative_steps():
    from coap_torch import CoapAdafactor

    optimizer = CoapAdafactor(params=_model().parameters(), lr=1e-3, rank_ratio_matrix=2)
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-3 and group["relative_step"] is None  # "relative exactly when no lr is given"
