import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_clafusion import AlignmentError
from hf_clafusion.core import align_layers, alignment_cost, chain_alignment, random_alignment, relax_constraints


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dp_reference_cases.json"
CASES_FILE = Path(__file__).with_name("data") / "dp_reference_cases.json"


def _cases():
    path = CASES_FILE if CASES_FILE.exists() else REFERENCE
    return json.loads(path.read_text())["dp_cases"]


def brute_force(cost: np.ndarray, first_fixed: int, last_fixed: int) -> tuple[float, list[tuple[int, ...]]]:
    m, n = cost.shape
    best, argmins = np.inf, []
    for combo in itertools.combinations(range(m), n):
        if any(combo[k] != k for k in range(first_fixed)):
            continue
        if any(combo[n - 1 - j] != m - 1 - j for j in range(last_fixed)):
            continue
        value = sum(cost[a, k] for k, a in enumerate(combo))
        if value < best - 1e-12:
            best, argmins = value, [combo]
        elif abs(value - best) <= 1e-12:
            argmins.append(combo)
    return best, argmins


def test_reference_file_has_97_cases():
    assert len(_cases()) == 97


@pytest.mark.parametrize(
    "case", _cases(), ids=lambda c: f"{len(c['C_deep_by_shallow'])}x{len(c['C_deep_by_shallow'][0])}"
)
def test_reproduces_official_output(case):
    result = align_layers(
        case["C_deep_by_shallow"], first_fixed=case["start_layer_idx"] - 1, last_fixed=case["free_end_layers"]
    )
    assert [a + 1 for a in result] == case["official_alignment_1indexed"]
    if "bruteforce_min_cost" in case:
        assert alignment_cost(case["C_deep_by_shallow"], result) == pytest.approx(
            case["bruteforce_min_cost"], abs=1e-9
        )


@pytest.mark.parametrize("seed", range(150))
def test_equals_brute_force_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    m = int(rng.integers(n, 9))
    first, last = int(rng.integers(0, 3)), int(rng.integers(0, 3))
    if first + last > n:
        first, last = 0, 0
    # integer-valued costs make ties frequent, so tie-breaking is exercised too
    cost = rng.integers(0, 4, size=(m, n)).astype(float) if seed % 2 else rng.random((m, n))
    result = align_layers(cost, first_fixed=first, last_fixed=last)
    best, argmins = brute_force(cost, first, last)
    assert len(result) == n
    assert all(b > a for a, b in zip(result, result[1:]))
    assert alignment_cost(cost, result) == pytest.approx(best, abs=1e-9)
    assert tuple(result) in argmins


def test_ties_go_to_the_leftmost_deep_layer():
    assert align_layers(np.ones((5, 3)), first_fixed=0, last_fixed=0) == [0, 1, 2]
    assert align_layers(np.zeros((6, 2)), first_fixed=0, last_fixed=0) == [0, 1]


def test_constraints_and_clear_minimum():
    cost = np.full((6, 3), 5.0)
    cost[0, 0] = cost[3, 1] = cost[5, 2] = 0.0
    assert align_layers(cost) == [0, 3, 5]
    assert align_layers(cost, first_fixed=2, last_fixed=1) == [0, 1, 5]
    assert align_layers(torch.tensor(cost), first_fixed=0, last_fixed=0) == [0, 3, 5]


def test_equal_depth_is_the_identity_map():
    assert align_layers(np.random.default_rng(0).random((4, 4))) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("shape", "first", "last", "match"),
    [
        ((5, 1), 1, 1, "Infeasible"),
        ((6, 3), 2, 2, "Infeasible"),
        ((2, 3), 1, 1, "deep x shallow"),
        ((4, 2), -1, 0, ">= 0"),
    ],
)
def test_infeasible_or_invalid_requests_raise(shape, first, last, match):
    with pytest.raises(AlignmentError, match=match):
        align_layers(np.zeros(shape), first_fixed=first, last_fixed=last)


def test_non_finite_costs_raise():
    cost = np.zeros((3, 2))
    cost[1, 1] = np.nan
    with pytest.raises(AlignmentError, match="NaN"):
        align_layers(cost)


def test_chain_and_random_baselines_give_admissible_alignments():
    assert chain_alignment(5, 3) == [0, 1, 2]
    for seed in range(20):
        result = random_alignment(8, 4, first_fixed=1, last_fixed=1, seed=seed)
        assert result[0] == 0 and result[-1] == 7 and len(set(result)) == 4 and result == sorted(result)
    assert random_alignment(8, 4, seed=3) == random_alignment(8, 4, seed=3)


def test_relaxation_only_for_boundary_defaults():
    assert relax_constraints(1, 1, 1) == (0, 0)
    assert relax_constraints(3, 1, 1) == (1, 1)
    assert relax_constraints(2, 3, 0) == (3, 0)  # explicit requests are never relaxed
