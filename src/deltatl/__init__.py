"""deltatl: regularized transfer learning of pretrained CNNs (DELTA, L2-SP, L2-FE, RIFLE, and more).

The public names are imported on first use (PEP 562), so that ``import deltatl`` and the command
line start without loading PyTorch until they need it, and a Ctrl-C during start-up is handled by
:func:`deltatl.launch.main` rather than printed as a traceback from inside an import.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "TrainConfig": ".config",
    "load_splits": ".data",
    "fit": ".engine.fit",
    "Objective": ".engine.objective",
    "rifle_steps": ".engine.rifle",
    "create_model": ".models",
    "train_run": ".run",
    "load_model": ".export",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'deltatl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .config import TrainConfig as TrainConfig
    from .data import load_splits as load_splits
    from .engine.fit import fit as fit
    from .engine.objective import Objective as Objective
    from .engine.rifle import rifle_steps as rifle_steps
    from .models import create_model as create_model
    from .export import load_model as load_model
    from .run import train_run as train_run
