"""ds_tutel: a Tutel-style Mixture-of-Experts backend for DeepSpeed."""
from .gating import route_deepspeed
from .layer import MoE
from .routing import Routing

__all__ = ["MoE", "Routing", "route_deepspeed"]
__version__ = "0.1.0"
