"""The control signal of a ControlNet run: edge maps of the images, and how well samples follow them.

The control map of an image ``x`` (``(N, 1, H, W)`` in ``[-1, 1]``) is :func:`edge_map`: the Sobel
gradient magnitude of ``(x + 1) / 2`` (intensity in ``[0, 1]``; replicate padding, so the border makes
no edges), thresholded at ``threshold`` into ``{0, 1}``. A step from black to white across a pixel
gives a magnitude of 4, so the presets' thresholds (1.0 to 1.5) keep the strokes' outlines and drop
the soft ramps of the upsampled digits.

Control fidelity (:func:`edge_f1`) scores samples generated from control maps ``c``: with ``e`` the
edge map of the samples (the same :func:`edge_map`), it is the F1 score of the edge pixels, pooled
over all samples and pixels::

    F1 = 2 |e AND c| / (|e| + |c|)

(the harmonic mean of the precision ``|e AND c| / |e|`` and the recall ``|e AND c| / |c|``). It is 1
when every sample has exactly the edges it was asked for; a UNet that ignores the control scores the
overlap of typical digit outlines (the frozen UNet's figure in the table).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SOBEL_X", "edge_f1", "edge_map", "sobel_magnitude"]

#: The horizontal Sobel kernel; its transpose is the vertical one.
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def sobel_magnitude(images: Tensor) -> Tensor:
    """The Sobel gradient magnitude of each channel of ``images`` (``[-1, 1]``, read as ``[0, 1]`` intensity).

    >>> step = torch.tensor([[-1.0, -1.0, 1.0, 1.0]]).expand(4, 4).reshape(1, 1, 4, 4)
    >>> sobel_magnitude(step)[0, 0, 0].tolist()
    [0.0, 4.0, 4.0, 0.0]
    """
    unit = (images.float() + 1) / 2
    channels = unit.shape[1]
    kx = torch.tensor(SOBEL_X, device=unit.device).expand(channels, 1, 3, 3)
    padded = F.pad(unit, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx, groups=channels)
    gy = F.conv2d(padded, kx.transpose(2, 3), groups=channels)
    return torch.sqrt(gx.square() + gy.square())


def edge_map(images: Tensor, threshold: float) -> Tensor:
    """``{0, 1}`` edge maps of ``images`` (``(N, C, H, W)`` in ``[-1, 1]``), one channel: the Sobel magnitude of
    the channel mean above ``threshold``."""
    gray = images.float().mean(dim=1, keepdim=True)
    return (sobel_magnitude(gray) > threshold).float()


def edge_f1(samples: Tensor, control: Tensor, threshold: float) -> dict[str, float]:
    """How well ``samples`` follow their ``control`` maps: the pooled F1 of edge pixels, with its precision and
    recall (see the module's text); 1.0 where neither has an edge pixel.

    >>> c = edge_map(torch.tensor([[-1.0, -1.0, 1.0, 1.0]]).expand(4, 4).reshape(1, 1, 4, 4), 1.0)
    >>> edge_f1(c * 2 - 1, c, 1.0)["f1"] < 1.0  # the edges of an edge map are not the edge map
    True
    """
    edges = edge_map(samples, threshold)
    control = control.float()
    both = float((edges * control).sum())
    found, wanted = float(edges.sum()), float(control.sum())
    if found + wanted == 0:
        return {"f1": 1.0, "precision": 1.0, "recall": 1.0}
    return {
        "f1": 2 * both / (found + wanted),
        "precision": both / found if found else 0.0,
        "recall": both / wanted if wanted else 0.0,
    }
