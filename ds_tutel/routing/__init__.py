"""Routing: tokens -> Routing(indices_SK, locations_SK, gates_SK, capacity, counts_E, probs_SE).

  types.py          the Routing dataclass (the only state that flows from routing to dispatch)
  gate.py           Gate (owns `wg`), fp32 logits, input noise, losses; `route` for plain logits
  deepspeed.py      DeepSpeed's semantics (default): top-1/top-2/top-k with its capacity and drop rules
  tutel.py          Tutel's semantics: capacity modes, k-major queues, batch-prioritized routing
  rules.py          how logits become choices and gates (softmax top-k; DeepSeek-V3's group-limited sigmoid;
                    GPT-OSS's top-k then softmax), for the Tutel slot assignment
  slots.py, choices.py, softmax.py, router_linear.py, noise.py, losses.py: the pieces they share
"""
