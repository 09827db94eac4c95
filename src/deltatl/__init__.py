"""deltatl: regularized transfer learning of pretrained CNNs (DELTA, L2-SP, L2-FE, RIFLE)."""
from .config import TrainConfig as TrainConfig
from .data import load_splits as load_splits
from .engine.fit import fit as fit
from .engine.objective import Objective as Objective
from .engine.rifle import rifle_steps as rifle_steps
from .models import create_model as create_model
from .run import train_run as train_run

__version__ = "0.1.0"
