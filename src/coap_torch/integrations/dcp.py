"""Loading ``torch.distributed.checkpoint`` checkpoints written by earlier releases.

``dcp.load`` requires every entry of the state dict it fills to be in the checkpoint, the options
of each param group included. A release that adds a COAP option (``conv_projection`` and
``state_dtype`` came after 0.1.0) therefore cannot load an earlier release's checkpoint with the
default planner ("Missing key in checkpoint state_dict: optimizer.param_groups.0.state_dtype").
:class:`CoapLoadPlanner` lets those options, and only those, be missing: the optimizer then does
what its ``load_state_dict`` does for a ``torch.save`` checkpoint without them (it keeps its own
COAP options; ``scale`` absent means 1.0). Every tensor, and every other entry, must still be
there, as with the default planner.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint import DefaultLoadPlanner

from ..optim._options import COAP_OPTIONS
from ..optim._storage import Int8Options

__all__ = ["CoapLoadPlanner"]

#: Param-group entries that a checkpoint of an earlier release may lack.
OPTIONAL_GROUP_KEYS = frozenset((*COAP_OPTIONS, *Int8Options.__dataclass_fields__))


class CoapLoadPlanner(DefaultLoadPlanner):
    """``dcp.load``'s default planner, except that COAP options missing from a checkpoint's param
    groups (options added by a later release) are left out of the load instead of refused.

    Use it to resume from a checkpoint of an earlier release::

        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path,
                 planner=CoapLoadPlanner())
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    """

    def create_local_plan(self) -> Any:
        if self.metadata is None or not self.flatten_state_dict:
            return super().create_local_plan()
        saved = self.metadata.state_dict_metadata
        for key in [key for key in self.state_dict if key not in saved]:
            path = self.mappings[key]
            if len(path) >= 3 and path[-3] == "param_groups" and path[-1] in OPTIONAL_GROUP_KEYS:
                # Out of the load, and out of the dict handed to load_state_dict, which then treats
                # the option as a checkpoint of that release would: absent.
                del self.state_dict[key], self.mappings[key]
                group: Any = self.original_state_dict
                for part in path[:-1]:
                    group = group[part]
                del group[path[-1]]
        return super().create_local_plan()
