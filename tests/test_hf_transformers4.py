"""ds_tutel.hf.convert on transformers 4's per-expert MoE blocks (experts an nn.ModuleList of Linear MLPs): the
checks of tests/hf_transformers4_checks.py run in one process whose path puts the transformers 4 install of
scripts/setup.sh (.venv/transformers4, or $DS_TUTEL_TRANSFORMERS4) before the pinned transformers 5; each test here
asserts on its results. Every converted model gives the unconverted one's logits, loss, aux loss and gradients
within fp32 rounding, at 1 rank and with expert parallelism over 2 ranks, through the DeepSpeed engine, and its
export loads strictly (and through save_pretrained / from_pretrained) into the unconverted transformers 4 class.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict

import pytest

pytest.importorskip("transformers")

from hf_transformers4_checks import EP2_CASES, RESULTS_MARK  # noqa: E402
from test_hf_convert import CASES  # noqa: E402

from ds_tutel.hf.models import SPECS, TRANSFORMERS4_MODEL_TYPES  # noqa: E402

pytestmark = pytest.mark.multirank

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
TRANSFORMERS4 = os.environ.get("DS_TUTEL_TRANSFORMERS4", os.path.join(REPO, ".venv", "transformers4"))
ATOL = 1e-5
TRANSFORMERS4_CASES = sorted(case for case, (model_type, _) in CASES.items()
                             if model_type in TRANSFORMERS4_MODEL_TYPES)


@pytest.fixture(scope="module")
def results() -> Dict[str, Any]:
    if not os.path.isdir(os.path.join(TRANSFORMERS4, "transformers")):
        pytest.fail(f"no transformers 4 install in {TRANSFORMERS4}: scripts/setup.sh makes it")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TRANSFORMERS4, TESTS, REPO]), DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, os.path.join(TESTS, "hf_transformers4_checks.py")], env=env,
                          capture_output=True, text=True, timeout=420)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULTS_MARK)]
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    return json.loads(lines[-1][len(RESULTS_MARK):])


def test_the_checks_ran_under_transformers4(results):
    assert results["transformers"].startswith("4.")
    assert sorted(results["single"]) == TRANSFORMERS4_CASES


def test_every_type_with_per_expert_blocks_in_transformers4_is_covered():
    """The seven types whose transformers 4 block holds per-expert MLPs; GPT-OSS (fused experts, other router
    outputs) and Granite (ParallelExperts) differ there and are transformers 5 only."""
    assert set(TRANSFORMERS4_MODEL_TYPES) == {"qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3",
                                              "glm4_moe", "phimoe"}
    assert SPECS["mixtral"].per_expert.gate == "w1" and SPECS["mixtral"].per_expert.up == "w3"


@pytest.mark.parametrize("case", TRANSFORMERS4_CASES)
def test_one_rank_matches_unconverted(results, case):
    diffs = results["single"][case]
    for what in ("logits", "loss", "grads", "eval_logits", "export_logits"):
        assert what in diffs, (case, what)
    if CASES[case][0] not in ("deepseek_v3", "glm4_moe"):  # those have no router-logit aux loss
        assert "aux_loss" in diffs and "router_logits" in diffs, case
    for what, diff in diffs.items():
        assert diff < ATOL, (case, what, diff)


def test_expert_parallel_and_engine_match_unconverted(results):
    assert len(results["ep2"]) == 2
    for rank, per_case in enumerate(results["ep2"]):
        assert set(per_case) == set(EP2_CASES) | {"engine-zero2-AdamW"}, rank
        for case, diffs in per_case.items():
            assert diffs, (rank, case)
            for what, diff in diffs.items():
                assert diff < ATOL, (rank, case, what, diff)


def test_save_pretrained_loads_into_the_transformers4_class(results):
    assert results["pretrained"] == {"pretrained_logits": pytest.approx(0.0, abs=ATOL), "pretrained_per_expert": 0.0}


def test_types_transformers4_has_in_another_form_are_refused_clearly(results):
    message = results["unsupported"]
    assert "gpt_oss" in message and "transformers >= 5.15" in message
    for model_type in TRANSFORMERS4_MODEL_TYPES:
        assert model_type in message
