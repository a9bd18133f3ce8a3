"""Distributed K-FAC on ``torch.distributed`` (KAISA's gradient workers, SP-NGD's owners).

See :mod:`curvlab.kfac.distributed.runtime` for the design; :mod:`.assignment` for the grid and
the layer placement; :mod:`.comm` for the bucketed collectives and their counts; :mod:`.cost`
for the communication/work cost model (ResNet-50 shapes built in).
"""

from curvlab.kfac.distributed.assignment import Assignment, assign_layers, grid_groups, layer_cost
from curvlab.kfac.distributed.comm import CommStats, Communicator, pack_triu, unpack_triu
from curvlab.kfac.distributed.cost import RESNET50, resnet50_layers, step_cost
from curvlab.kfac.distributed.runtime import MODES, DistributedKFAC, run_step, wants_distributed

__all__ = [
    "MODES",
    "RESNET50",
    "Assignment",
    "CommStats",
    "Communicator",
    "DistributedKFAC",
    "assign_layers",
    "grid_groups",
    "layer_cost",
    "pack_triu",
    "resnet50_layers",
    "run_step",
    "step_cost",
    "unpack_triu",
    "wants_distributed",
]
