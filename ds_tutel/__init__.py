"""ds_tutel: a Tutel-style Mixture-of-Experts backend for DeepSpeed."""
from .gating import route, route_deepspeed
from .layer import MoE
from .options import RouterOptions
from .routing import Routing
from .stats import RoutingStats, StatsCollector, routing_stats
from .tutel_gating import route_tutel

__all__ = ["MoE", "Routing", "RouterOptions", "RoutingStats", "StatsCollector", "route", "route_deepspeed",
           "route_tutel", "routing_stats"]
__version__ = "0.1.0"
