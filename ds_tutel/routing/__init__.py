"""Routing: tokens -> Routing(indices_SK, locations_SK, gates_SK, capacity, counts_E, probs_SE).

  types.py          the Routing dataclass (the only state that flows from routing to dispatch)
  gate.py           Gate (owns `wg`), fp32 logits, input noise, losses; `route` for plain logits
  deepspeed.py      DeepSpeed's semantics (default): top-1/top-2/top-k with its capacity and drop rules
  tutel.py          Tutel's semantics: capacity modes, k-major queues, batch-prioritized routing
  slots.py, choices.py, softmax.py, router_linear.py, noise.py, losses.py: the pieces they share
"""
