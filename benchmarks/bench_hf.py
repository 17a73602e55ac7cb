"""ds_tutel.hf against DeepSpeed's AutoEP on Hugging Face MoE models, through the DeepSpeed engine.

    python benchmarks/bench_hf.py                                 # every model type, 1, 2 and 4 CPU ranks
    python benchmarks/bench_hf.py --models mixtral --ranks 1 2 --steps 8
    python benchmarks/bench_hf.py --quick                         # tiny models, 2 steps, 1 rank

Each model is a tiny transformers model built from its config class (seeded, random weights, nothing
downloaded): a few layers, hidden 128, 8 routed experts, top-2. On every rank (spawned gloo processes,
DS_ACCELERATOR=cpu, one torch thread each) three copies of the same model train side by side, on the same
tokens (each rank its own), each in a DeepSpeed engine of the same config (ZeRO 0, torch's AdamW with foreach,
or SGD with --optimizer sgd; gradient clipping off: DeepSpeed clips at 1.0 unless told otherwise):

  ours:   the model converted by ds_tutel.hf.convert(model, ep_size=ranks) (dropless, the model's routing);
  autoep: the model as it is, with DeepSpeed's AutoEP on ("expert_parallel": autoep_size=ranks, the preset
          DeepSpeed names for the model type; dropless token-choice routing);
  hf:     the model as it is, data-parallel (no expert parallelism): the reference both must follow.

The model types come from ds_tutel.hf.SUPPORTED_MODEL_TYPES at run time, plus those of DEFAULT_EXTRA it cannot
convert yet (then only AutoEP and the reference run). A model type without an AutoEP preset is given to AutoEP
without one (its auto-detection), then, for the types in --borrow, with the preset of a model type whose MoE
block is built the same way, as a user would try next; what AutoEP does, an error included, is recorded as a
result ("no preset: ...").

Per model and rank count:
  - losses: every step's loss on every rank, per candidate; the largest difference between ours and AutoEP,
    and between each and the reference. They must agree within fp32 rounding (LOSS_RTOL of the loss). The
    check runs on a second pass of the same steps with SGD (--check-optimizer, default sgd): AdamW divides each
    gradient by its own running size, which magnifies the implementations' rounding differences until a near-tie
    top-k choice flips in one of them, so AdamW's losses are reported but not held to fp32 rounding. A
    disagreement in the check is printed and the run exits with status 1 (an AutoEP run without a preset is
    reported but does not fail the run: AutoEP does not claim those models);
  - step time: forward, backward and optimizer step, timed on each rank in the same rounds, the candidates
    called in a rotating order (ours, autoep, hf / autoep, hf, ours / ...), after --warmup untimed steps; a
    step's time is the slowest rank's; ratio = median over the timed steps of ours / AutoEP within a step
    (benchmarks/timing.py: paired_ratio). Absolute times on a shared machine are noise; the ratios are not;
  - memory: the most torch CPU tensor bytes alive at once during one more step, over those alive at its start
    (torch.profiler's allocation records: activations, gradients and the step's transients, without what the
    allocator or oneDNN add to the resident size), on the rank where it is largest; and the parameter bytes a
    rank holds (expert parallelism shards the experts).

With 4 ranks on a 2-core machine the ranks are oversubscribed (2 processes per core): those times are
reported, and marked, but are more about scheduling than about the layers.

Shape legend: B batch, T sequence length, V vocabulary.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.layer_report import RESULTS_DIR  # noqa: E402
from benchmarks.timing import paired_ratio  # noqa: E402

CANDIDATES = ("ours", "autoep", "hf")
# Of the loss (about 6.3 here). The first steps agree to 1 or 2 units in the last place of the loss (5e-7 to 1e-6);
# over more AdamW steps the implementations' fp32 rounding differences (sums in another order) grow, as Adam
# divides each gradient by its own running size, until a token whose top-k choice was a near tie goes to another
# expert in one implementation: from then on the two trajectories differ by about 1e-5 of the loss (seen within 20
# steps: up to 9.5e-5 for ours, 6e-5 for AutoEP). With SGD (--optimizer sgd) the same 20 steps agree to 1e-6.
LOSS_RTOL = 2e-5
# Run by default even when ds_tutel.hf cannot convert them (then AutoEP and the reference only): DeepSeek-V3 is
# an AutoEP preset; the others are model types beyond AutoEP's presets.
DEFAULT_EXTRA = ("deepseek_v3", "olmoe", "qwen2_moe", "gpt_oss")
# Model types AutoEP has no preset for, with the preset of a model whose MoE block is built the same way: what a
# user would try once AutoEP's auto-detection refuses them (reported, never failed on).
BORROWED = {"olmoe": "qwen3_moe", "glm4_moe": "deepseek_v3"}
# Model types whose transformers 5.15 forward records no router logits, and fails with labels and
# output_router_logits=True (Granite-MoE adds the int 0 it gets for an aux loss with `.to`): trained without them.
NO_ROUTER_LOGITS = ("granitemoe", "granitemoeshared")
NOT_DETECTED = ("AutoEP detected no MoE layer (it logs 'AutoEP: no MoE layers detected in model.' and "
                "deepspeed.initialize goes on with the model unchanged: no expert parallelism, no error)")


def model_fields(model_type: str, hidden: int, layers: int, experts: int = 8, top_k: int = 2,
                 vocab: int = 512) -> Dict[str, Any]:
    """Config keyword arguments of a tiny model of `model_type`: `layers` layers of width `hidden`, `experts`
    routed experts of intermediate size 2 * hidden, top-`top_k` routing, the model's own aux loss on (where it has
    one)."""
    fields: Dict[str, Any] = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=top_k,
                                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  tie_word_embeddings=False)
    expert_dim = 2 * hidden
    if model_type == "mixtral":
        fields.update(num_local_experts=experts, intermediate_size=expert_dim)
    elif model_type == "qwen3_moe":
        fields.update(num_experts=experts, moe_intermediate_size=expert_dim, intermediate_size=expert_dim,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    elif model_type == "olmoe":
        fields.update(num_experts=experts, intermediate_size=expert_dim, norm_topk_prob=False)
    elif model_type == "qwen2_moe":
        fields.update(num_experts=experts, moe_intermediate_size=expert_dim, intermediate_size=expert_dim,
                      shared_expert_intermediate_size=expert_dim, norm_topk_prob=False, decoder_sparse_step=1,
                      mlp_only_layers=[], qkv_bias=True)
    elif model_type == "deepseek_v3":
        # Sigmoid scores with a score-correction bias, group-limited top-k (4 groups of 2, the best 2 groups),
        # renormalised and scaled; one shared expert; the first layer dense.
        fields.update(n_routed_experts=experts, n_shared_experts=1, moe_intermediate_size=expert_dim,
                      intermediate_size=2 * expert_dim, first_k_dense_replace=1, n_group=4, topk_group=2,
                      norm_topk_prob=True, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=64,
                      qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, head_dim=16,
                      num_key_value_heads=4, num_nextn_predict_layers=0)
    elif model_type == "glm4_moe":
        # DeepSeek-V3's routing (sigmoid, score-correction bias, 2 groups of 4, the best group) with GLM's attention.
        fields.update(n_routed_experts=experts, n_shared_experts=1, moe_intermediate_size=expert_dim,
                      intermediate_size=2 * expert_dim, first_k_dense_replace=1, n_group=2, topk_group=1,
                      norm_topk_prob=True, routed_scaling_factor=1.5, num_nextn_predict_layers=0)
    elif model_type == "gpt_oss":
        fields.update(num_local_experts=experts, intermediate_size=expert_dim, head_dim=hidden // 4,
                      sliding_window=32, layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                      + ["sliding_attention"] * (layers % 2))
    elif model_type in ("granitemoe", "granitemoeshared"):
        # Top-k of the logits then softmax over the k; Granite's multipliers (1.0 by default) as in its released
        # MoE configs. No aux loss: transformers 5.15 records no Granite router logits (NO_ROUTER_LOGITS).
        fields.update(num_local_experts=experts, intermediate_size=expert_dim, embedding_multiplier=12.0,
                      residual_multiplier=0.22, logits_scaling=6.0,
                      attention_multiplier=4.0 / hidden)  # 1 / head_dim
        if model_type == "granitemoeshared":  # the dense shared MLP beside the block (none by default)
            fields.update(shared_intermediate_size=expert_dim)
    elif model_type == "phimoe":
        # sparsemixer: two picks among the experts within a margin of the best, sampled in training (the margin
        # 0.01 of the released config; candidates seed each step alike, _train_step).
        fields.update(num_local_experts=experts, intermediate_size=expert_dim)
    else:
        raise ValueError(f"bench_hf has no tiny configuration for model_type={model_type!r}")
    return fields


def build_model(model_type: str, hidden: int, layers: int, seed: int = 0) -> torch.nn.Module:
    """The tiny random-weight causal LM of `model_type` (same seed, same weights). What initialisation leaves at
    zero in the MoE blocks is drawn too, so that it takes part: the score-correction biases (DeepSeek-V3,
    GLM-4-MoE) and the router and expert biases (GPT-OSS)."""
    import transformers
    config = transformers.AutoConfig.for_model(model_type, **model_fields(model_type, hidden, layers))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp." in name and name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.05 * torch.randn(buffer.shape, generator=generator))
    return model


def autoep_preset(model_type: str) -> Optional[str]:
    """The AutoEP preset DeepSpeed names for a HF model type (None: it has none)."""
    from deepspeed.module_inject.auto_ep_presets.registry import preset_name_for_hf_model_type
    return preset_name_for_hf_model_type(model_type)


def model_types(requested: Optional[Sequence[str]] = None) -> List[str]:
    """The model types to run: `requested`, or every type ds_tutel.hf converts (asked at run time, so that types
    added since are included) plus those of DEFAULT_EXTRA it does not convert yet."""
    import ds_tutel.hf as hf
    if requested:
        return list(requested)
    supported = list(hf.SUPPORTED_MODEL_TYPES)
    return supported + [t for t in DEFAULT_EXTRA if t not in supported]


def ds_config(micro_batch: int, stage: int, foreach: bool = True, optimizer: str = "adamw") -> Dict[str, Any]:
    """The DeepSpeed config every candidate shares: torch's AdamW (lr 1e-3) or SGD (lr 0.1), ZeRO `stage`, no
    gradient clipping (AutoEP's section is added to it for AutoEP). foreach: torch's multi-tensor optimizer
    path, the default on GPUs (on the CPU its ops still run tensor by tensor, so a model pays for how many
    parameter tensors it has, not only for their size: ds_tutel's experts are 2 tensors each, AutoEP's 3 fused
    tensors per layer)."""
    if optimizer == "sgd":
        chosen: Dict[str, Any] = {"type": "SGD", "params": {"lr": 0.1, "foreach": foreach}}
    else:
        chosen = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "foreach": foreach}}
    config: Dict[str, Any] = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_clipping": 0.0,
                              "zero_allow_untested_optimizer": True, "optimizer": chosen,
                              "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6}
    if stage > 0:  # buckets sized for these models, not DeepSpeed's default 500M elements (2 GB per step)
        config["zero_optimization"].update(reduce_bucket_size=1 << 22, allgather_bucket_size=1 << 22)
    return config


def _engine_ours(model: torch.nn.Module, world: int, config: Dict[str, Any]):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    import ds_tutel.hf as hf
    hf.convert(model, ep_size=world)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "params"})
    return deepspeed.initialize(model=model, model_parameters=groups, config=config)[0]


def _engine_autoep(model: torch.nn.Module, world: int, config: Dict[str, Any], preset: Optional[str]):
    import deepspeed
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    section: Dict[str, Any] = {"enabled": True, "autoep_size": world}
    if preset is not None:
        section["preset_model"] = preset
    engine = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                  config=dict(config, expert_parallel=section))[0]
    replaced = sum(isinstance(m, AutoEPMoELayer) for m in engine.module.modules())
    if replaced == 0:
        raise RuntimeError(NOT_DETECTED)
    return engine


def _engine_hf(model: torch.nn.Module, config: Dict[str, Any]):
    import deepspeed
    return deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)[0]


def step_live_bytes(step: Callable[[], None]) -> int:
    """The most torch CPU tensor bytes alive at once during step(), over those alive when it started: the peak
    of the running sum of torch.profiler's allocation and free records, in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def _batch(step: int, rank: int, B: int, T: int, vocab: int) -> torch.Tensor:
    """The tokens [B, T] of `step` on `rank`: the same for every candidate, different on every rank."""
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(1000 * step + rank))


def _train_step(engine, ids_BT: torch.Tensor, seed: int) -> float:
    """One step; `seed` first, so that a model that draws random numbers in training (Phi-MoE samples its routing)
    draws the same ones in every candidate."""
    torch.manual_seed(seed)
    router_logits = engine.module.config.model_type not in NO_ROUTER_LOGITS  # the model's aux loss, where it has one
    loss = engine(input_ids=ids_BT, labels=ids_BT, output_router_logits=router_logits).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def _short_error(e: BaseException, limit: int = 600) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " ..."


def rank_run(rank: int, world: int, types: List[str], steps: int, hidden: int, layers: int, B: int, T: int,
             stage: int, foreach: bool = True, borrowed: Optional[Dict[str, str]] = None,
             optimizer: str = "adamw") -> Dict[str, Dict[str, Any]]:
    """On one rank: for every model type, build the candidates, train them side by side for `steps` steps
    (timing each), then one profiled step each; returns per model type the candidates' losses [step], step
    seconds [step], live bytes of the profiled step, parameter bytes, and why any candidate did not run."""
    import transformers

    import ds_tutel.hf as hf
    transformers.logging.set_verbosity_error()
    borrowed = borrowed or {}
    out: Dict[str, Dict[str, Any]] = {}
    for model_type in types:
        record: Dict[str, Any] = {"errors": {}, "losses": {}, "seconds": {}, "live_bytes": {}, "param_bytes": {},
                                  "preset": None, "optimizer": optimizer}
        out[model_type] = record
        try:
            original = build_model(model_type, hidden, layers)
        except Exception as e:  # a config this transformers build cannot make: nothing runs
            record["errors"]["model"] = _short_error(e)
            continue
        vocab = original.config.vocab_size
        config = ds_config(B, stage, foreach=foreach, optimizer=optimizer)
        engines: Dict[str, Any] = {}
        if model_type in hf.SUPPORTED_MODEL_TYPES:
            engines["ours"] = _engine_ours(copy.deepcopy(original), world, config)
        else:
            record["errors"]["ours"] = f"ds_tutel.hf does not convert {model_type} (yet)"
        preset = autoep_preset(model_type)
        record["preset"] = preset
        try:
            engines["autoep"] = _engine_autoep(copy.deepcopy(original), world, config, preset)
        except Exception as e:  # AutoEP refusing a model is a result
            record["errors"]["autoep"] = _short_error(e)
        if preset is None and model_type in borrowed:  # then what a user would try next: another type's preset
            record["borrowed"] = borrowed[model_type]
            try:
                engines["autoep"] = _engine_autoep(copy.deepcopy(original), world, config, borrowed[model_type])
            except Exception as e:
                record["errors"]["autoep_borrowed"] = _short_error(e)
        engines["hf"] = _engine_hf(original, config)
        names = [name for name in CANDIDATES if name in engines]
        for name in names:
            record["losses"][name], record["seconds"][name] = [], []
            record["param_bytes"][name] = sum(p.numel() * p.element_size() for p in engines[name].module.parameters())
        for step in range(steps):
            ids_BT = _batch(step, rank, B, T, vocab)
            order = names[step % len(names):] + names[:step % len(names)]  # rotating: none always first
            for name in order:
                start = time.perf_counter()
                try:
                    loss = _train_step(engines[name], ids_BT, seed=1000 * step + rank)
                except Exception as e:  # an AutoEP model that fails in training is a result; ours failing is not
                    if name != "autoep":
                        raise
                    record["errors"]["autoep_borrowed" if "borrowed" in record else "autoep"] = (
                        f"converted, then failed in training: {_short_error(e)}")
                    names.remove(name)
                    del engines[name], record["losses"][name], record["seconds"][name]
                    del record["param_bytes"][name]
                    continue
                record["seconds"][name].append(time.perf_counter() - start)
                record["losses"][name].append(loss)
        ids_BT = _batch(steps, rank, B, T, vocab)
        for name in names:
            losses: List[float] = []
            record["live_bytes"][name] = step_live_bytes(
                lambda: losses.append(_train_step(engines[name], ids_BT, seed=1000 * steps + rank)))
            record["losses"][name].append(losses[0])
        del engines, original
        gc.collect()
    return out


def _max_diff(a: List[List[float]], b: List[List[float]]) -> float:
    """Largest |a - b| over ranks and steps."""
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def summarize(model_type: str, world: int, per_rank: List[Dict[str, Any]], warmup: int,
              oversubscribed: bool) -> Dict[str, Any]:
    """One row: losses compared, ratios of the median paired step times and of the memory, errors."""
    first = per_rank[0]
    names = list(first["losses"])
    row: Dict[str, Any] = {"model": model_type, "ranks": world, "autoep_preset": first["preset"],
                           "autoep_borrowed_preset": first.get("borrowed"),
                           "errors": first["errors"], "ran": names, "oversubscribed": oversubscribed}
    losses = {name: [r["losses"][name] for r in per_rank] for name in names}
    row["losses_rank0"] = {name: losses[name][0] for name in names}
    scale = max(1.0, max(abs(x) for per in losses.values() for xs in per for x in xs)) if losses else 1.0
    row["loss_tolerance"] = LOSS_RTOL * scale
    diffs = {f"{a}_vs_{b}": _max_diff(losses[a], losses[b])
             for a, b in (("ours", "autoep"), ("ours", "hf"), ("autoep", "hf")) if a in losses and b in losses}
    row["max_loss_diff"] = diffs
    row["agree"] = {pair: diff <= row["loss_tolerance"] for pair, diff in diffs.items()}
    row["optimizer"] = first.get("optimizer", "adamw")
    # A step's time is the slowest rank's (the ranks meet in every step's collectives).
    seconds = {name: [max(r["seconds"][name][s] for r in per_rank) for s in range(len(first["seconds"][name]))]
               for name in names}
    row["step_ms"] = {name: [round(1e3 * x, 3) for x in s] for name, s in seconds.items()}  # warm-up included
    timed = {name: s[warmup:] for name, s in seconds.items()}
    row["median_step_ms"] = {name: 1e3 * statistics.median(s) for name, s in timed.items() if s}
    if "ours" in timed and "autoep" in timed and timed["ours"]:
        row["time_ours_over_autoep"] = paired_ratio(timed["ours"], timed["autoep"])
    if "ours" in timed and "hf" in timed and timed["ours"]:
        row["time_ours_over_hf"] = paired_ratio(timed["ours"], timed["hf"])
    if "autoep" in timed and "hf" in timed and timed["autoep"]:
        row["time_autoep_over_hf"] = paired_ratio(timed["autoep"], timed["hf"])
    row["timed_steps"] = len(next(iter(timed.values()), []))
    live = {name: max(r["live_bytes"][name] for r in per_rank) for name in names}
    row["step_live_MB"] = {name: b / 2 ** 20 for name, b in live.items()}
    row["param_MB_per_rank"] = {name: max(r["param_bytes"][name] for r in per_rank) / 2 ** 20 for name in names}
    if "ours" in live and "autoep" in live and live["autoep"]:
        row["live_ours_over_autoep"] = live["ours"] / live["autoep"]
    return row


def attach_check(rows: List[Dict[str, Any]], check_rows: List[Dict[str, Any]]) -> None:
    """Puts each check row's loss comparison (the SGD pass) on the timing row of the same model and rank count."""
    by_key = {(r["model"], r["ranks"]): r for r in check_rows}
    for row in rows:
        check = by_key.get((row["model"], row["ranks"]))
        if check is not None:
            row["check"] = {key: check[key] for key in ("optimizer", "max_loss_diff", "agree", "loss_tolerance")}


def strict_failures(row: Dict[str, Any]) -> List[str]:
    """The disagreements that fail the run, in the loss check (the row's SGD pass, or the row itself where it ran
    SGD; an AdamW row without a check is reported only): ours against the reference always, ours against AutoEP
    where AutoEP has a preset for the model type (AutoEP run on a type it does not claim, by its auto-detection or
    with another type's preset, is reported only)."""
    check = row.get("check") or (row if row.get("optimizer") == "sgd" else None)
    if check is None:
        return []
    failures = []
    for pair, ok in check["agree"].items():
        if ok or ("autoep" in pair and row["autoep_preset"] is None):  # borrowed or auto-detected
            continue
        failures.append(f"{row['model']} at {row['ranks']} rank(s), {check['optimizer']}: {pair} losses differ by "
                        f"{check['max_loss_diff'][pair]:.3g} (> {check['loss_tolerance']:.3g})")
    return failures


def compare(types: Sequence[str], world: int, steps: int, warmup: int, hidden: int, layers: int, B: int, T: int,
            stage: int = 0, foreach: bool = True, borrowed: Optional[Dict[str, str]] = None,
            timeout: Optional[float] = None, retries: int = 1, optimizer: str = "adamw") -> List[Dict[str, Any]]:
    """Every model type on `world` spawned CPU ranks (one start-up for all of them): one row each.

    A run that hangs (on a machine shared with other jobs, a rank can meet another job's rendezvous on a port
    that was free a moment before) is started again, up to `retries` times; the rows say how many tries it took.
    timeout: seconds for one try (default: enough for the steps on an oversubscribed machine)."""
    from ds_tutel.ranks import RankFailure, run_ranks
    if timeout is None:
        timeout = 120.0 + 1.5 * steps * len(types) * world
    for attempt in range(retries + 1):
        try:
            per_rank = run_ranks(rank_run, world, list(types), steps, hidden, layers, B, T, stage, foreach,
                                 borrowed, optimizer, timeout=timeout)
            break
        except RankFailure as e:
            if "did not finish" not in str(e) or attempt == retries:
                raise
            print(f"bench_hf: {world} rank(s) hung ({e}); starting again", file=sys.stderr)
    oversubscribed = world > (os.cpu_count() or 1)
    rows = [summarize(t, world, [r[t] for r in per_rank], warmup, oversubscribed) for t in types]
    for row in rows:
        row["tries"] = attempt + 1
    return rows


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(doc: Dict[str, Any]) -> str:
    """The results as a markdown table (and AutoEP's messages for the models it refused)."""
    s = doc["settings"]
    lines = [f"# ds_tutel.hf against AutoEP (DeepSpeed {doc['versions']['deepspeed']}, transformers "
             f"{doc['versions']['transformers']}, torch {doc['versions']['torch']})", "",
             f"Tiny models: {s['layers']} layers, hidden {s['hidden']}, 8 experts of width {2 * s['hidden']}, "
             f"top-2; {s['batch']} x {s['seq']} tokens per rank per step; ZeRO {s['stage']}, "
             f"{s.get('optimizer', 'adamw')} (foreach={s.get('foreach', True)}), no gradient clipping; CPU gloo "
             f"ranks, one torch thread each, on {doc['cpu_count']} cores. Time: median over "
             f"{s['steps'] - s['warmup']} steps (after {s['warmup']} warm-up) of ours / AutoEP in the same step, "
             "candidates in rotating order, a step's "
             "time being the slowest rank's. Memory: the most torch CPU tensor bytes alive at once in one step "
             "over those alive at its start (torch.profiler allocation records, largest rank), not RSS. Loss "
             "diff: the largest |difference| over all steps and ranks; * = 4 ranks on 2 cores (oversubscribed).",
             "",
             "| model | ranks | AutoEP preset | loss diff ours-AutoEP | ours-HF | AutoEP-HF | check (SGD) ours-AutoEP "
             "| ours-HF | time ours/AutoEP | ours/HF | ours ms | AutoEP ms | step mem ours/AutoEP | ours MB | "
             "AutoEP MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in doc["rows"]:
        d, ms, mem = row["max_loss_diff"], row["median_step_ms"], row["step_live_MB"]
        error = row["errors"].get("autoep", "")
        preset = row["autoep_preset"] or ("no preset: " + ("not detected" if NOT_DETECTED in error else
                                                            "refused" if error else "auto-detected"))
        if row["autoep_preset"] and error:
            preset += ": failed"
        if row.get("autoep_borrowed_preset"):
            preset += (f"; preset_model={row['autoep_borrowed_preset']}: "
                       + ("failed" if "autoep_borrowed" in row["errors"] else "ran"))
        star = "*" if row["oversubscribed"] else ""
        c = (row.get("check") or {}).get("max_loss_diff", {})
        lines.append(
            f"| {row['model']} | {row['ranks']}{star} | {preset} | {_fmt(d.get('ours_vs_autoep'), '.1e')} | "
            f"{_fmt(d.get('ours_vs_hf'), '.1e')} | {_fmt(d.get('autoep_vs_hf'), '.1e')} | "
            f"{_fmt(c.get('ours_vs_autoep'), '.1e')} | {_fmt(c.get('ours_vs_hf'), '.1e')} | "
            f"{_fmt(row.get('time_ours_over_autoep'))} | {_fmt(row.get('time_ours_over_hf'))} | "
            f"{_fmt(ms.get('ours'), '.1f')} | {_fmt(ms.get('autoep'), '.1f')} | "
            f"{_fmt(row.get('live_ours_over_autoep'))} | {_fmt(mem.get('ours'), '.1f')} | "
            f"{_fmt(mem.get('autoep'), '.1f')} |")
    if any(d > 1e-5 for row in doc["rows"] for d in row["max_loss_diff"].values()):
        lines += ["", "Differences above 1e-5 under AdamW come late in a run, from one step on: AdamW magnifies the "
                  "implementations' fp32 rounding differences until a token's near-tie top-k choice goes the other "
                  "way in one of them (see LOSS_RTOL in benchmarks/bench_hf.py). The check columns are the same "
                  "steps with SGD, held to fp32 rounding."]
    notes = sorted({(row["model"], who, message) for row in doc["rows"] for who, message in row["errors"].items()})
    if notes:
        lines += ["", "Messages (candidates that did not run, AutoEP's refusals; each once over the rank counts):",
                  ""]
        lines += [f"- {model}, {who}: {message}" for model, who, message in notes]
    if doc.get("failures"):
        lines += ["", "**Disagreements:**", ""] + [f"- {f}" for f in doc["failures"]]
    return "\n".join(lines) + "\n"


def _write(rows: List[Dict[str, Any]], args: argparse.Namespace, types: List[str], ranks: List[int], steps: int,
           warmup: int, hidden: int, layers: int, seq: int, borrowed: Dict[str, str]) -> Dict[str, Any]:
    """Writes <out-dir>/<tag>.json and .md from the rows so far; returns the document."""
    import deepspeed
    import transformers
    doc = {"versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                        "transformers": transformers.__version__},
           "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "settings": {"models": types, "ranks": ranks, "steps": steps, "warmup": warmup, "hidden": hidden,
                        "layers": layers, "batch": args.batch, "seq": seq, "stage": args.stage,
                        "foreach": args.foreach, "borrowed_presets": borrowed, "optimizer": args.optimizer,
                        "check_optimizer": args.check_optimizer,
                        "loss_rtol": LOSS_RTOL},
           "rows": rows, "failures": [f for row in rows for f in strict_failures(row)]}
    tag = args.tag or ("hf_vs_autoep_quick" if args.quick else "hf_vs_autoep")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"{tag}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(args.out_dir, f"{tag}.md"), "w") as f:
        f.write(markdown(doc))
    return doc


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Runs the comparison, writes benchmarks/results/<tag>.json and .md, returns the document; exits with
    status 1 after writing them if ours and AutoEP (or ours and the reference) disagree."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", help="model types (default: ds_tutel.hf's, plus AutoEP's presets)")
    parser.add_argument("--ranks", nargs="+", type=int, help="rank counts (default 1 2 4; --quick: 1)")
    parser.add_argument("--steps", type=int, help="training steps per model (default 10; --quick: 2)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (default 3; --quick: 1)")
    parser.add_argument("--hidden", type=int, help="model width (default 128; --quick: 64)")
    parser.add_argument("--layers", type=int, help="layers (default 3; --quick: 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 64; --quick: 16)")
    parser.add_argument("--stage", type=int, default=0, choices=(0, 1, 2), help="ZeRO stage")
    parser.add_argument("--no-foreach", dest="foreach", action="store_false",
                        help="torch's per-tensor AdamW loop instead of the multi-tensor one")
    parser.add_argument("--borrow", nargs="*", default=[f"{k}={v}" for k, v in BORROWED.items()],
                        metavar="TYPE=PRESET", help="for a model type without an AutoEP preset, also try AutoEP "
                        "with this preset (default: %(default)s)")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"),
                        help="sgd (lr 0.1): no Adam normalisation to magnify rounding differences (see LOSS_RTOL)")
    parser.add_argument("--check-optimizer", default="sgd", choices=("sgd", "none"),
                        help="a second pass of the same steps with SGD whose losses must agree to fp32 rounding "
                             "(none: skip it; an --optimizer sgd run is its own check)")
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 steps, 1 rank")
    parser.add_argument("--tag", default=None, help="output name (default hf_vs_autoep, --quick: hf_vs_autoep_quick)")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    q = args.quick
    ranks = args.ranks or ([1] if q else [1, 2, 4])
    steps = args.steps or (2 if q else 10)
    warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    hidden, layers = args.hidden or (64 if q else 128), args.layers or (2 if q else 3)
    seq = args.seq or (16 if q else 64)
    if steps <= warmup:
        parser.error(f"--steps ({steps}) must exceed --warmup ({warmup})")
    types = model_types(args.models)
    try:
        borrowed = dict(item.split("=", 1) for item in args.borrow)
    except ValueError:
        parser.error(f"--borrow takes TYPE=PRESET, got {args.borrow}")
    rows: List[Dict[str, Any]] = []
    from tqdm import tqdm
    for world in tqdm(ranks, desc="rank counts", disable=q):
        timed = compare(types, world, steps, warmup, hidden, layers, args.batch, seq, args.stage, args.foreach,
                        borrowed, optimizer=args.optimizer)
        if args.optimizer != "sgd" and args.check_optimizer == "sgd":
            attach_check(timed, compare(types, world, steps, warmup, hidden, layers, args.batch, seq, args.stage,
                                        args.foreach, borrowed, optimizer="sgd"))
        rows += timed
        doc = _write(rows, args, types, ranks, steps, warmup, hidden, layers, seq, borrowed)  # after each count
    table = markdown(doc)
    failures = doc["failures"]
    print(table)
    for row in rows:
        print(f"{row['model']} @ {row['ranks']}: max loss diff {row['max_loss_diff']}")
    if failures:
        print("LOSSES DISAGREE:\n  " + "\n  ".join(failures), file=sys.stderr)
        raise SystemExit(1)
    return doc


if __name__ == "__main__":
    main()
