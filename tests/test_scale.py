"""Fusion at scale: unmatched blocks in closed form, folder-loaded parents, sharded saves, the GPU path."""

from __future__ import annotations

import pytest
import torch


transformers = pytest.importorskip("transformers")

from hf_clafusion import fuse  # noqa: E402
from hf_clafusion.adapters import get_adapter  # noqa: E402
from hf_clafusion.hub import load_pretrained  # noqa: E402

from ._models import max_rel_error  # noqa: E402
from .test_transformers import EXACT, POST_LN, PRE_LN, inputs, make  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _layers(model: torch.nn.Module) -> str:
    """The state-dict prefix of the block list, e.g. ``"transformer.h"``."""
    spec = get_adapter(model).spec(model)
    return spec.segments[0].layers[0].name.rsplit(".", 1)[0]


@torch.no_grad()
def _truncated(deep: torch.nn.Module, keep: list[int], family: str) -> torch.nn.Module:
    """``deep`` with only the blocks ``keep``: a shallow model that shares the deep model's neuron basis."""
    shallow = make(family, len(keep), seed=5)
    layers = _layers(deep)
    state = {}
    for key, value in deep.state_dict().items():
        if key.startswith(f"{layers}."):
            index, rest = key[len(layers) + 1 :].split(".", 1)
            if int(index) in keep:
                state[f"{layers}.{keep.index(int(index))}.{rest}"] = value.clone()
        else:
            state[key] = value.clone()
    shallow.load_state_dict(state)
    return shallow.eval()


@torch.no_grad()
def _quiet_blocks(model: torch.nn.Module, blocks: list[int], factor: float) -> torch.nn.Module:
    """Scale the residual writers of ``blocks`` by ``factor``: blocks close to the identity, not equal to it."""
    layers = _layers(model)
    for name, param in model.named_parameters():
        block = any(name.startswith(f"{layers}.{b}.") for b in blocks)
        if block and any(w in name for w in ("c_proj", "o_proj", "down_proj")):  # GPT-2 and Llama writers
            param.mul_(factor)
    return model


def _unmatched_keys(model: torch.nn.Module, positions: list[int]) -> list[str]:
    layers = _layers(model)
    return [k for k in model.state_dict() if any(k.startswith(f"{layers}.{p}.") for p in positions)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_closed_form_unmatched_blocks_equal_the_explicit_identity_route_in_a_shared_basis(family):
    """Pre-LN: where the shallow model lives in the deep one's basis (it is the deep one minus two near-identity
    blocks), averaging explicit identity blocks gives exactly the closed form: same fused weights."""
    deep = _quiet_blocks(make(family, 4), [1, 2], 1e-2)
    shallow = _truncated(deep, [0, 3], family)
    batch = inputs(family, n=16)
    explicit = fuse([deep, shallow], batch, EXACT, unmatched="identity")
    closed = fuse([deep, shallow], batch, EXACT, unmatched="average")
    assert explicit.layer_alignment == closed.layer_alignment == [[0, 3]]
    a, b = explicit.model.state_dict(), closed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    # the closed form computes no plan inside the inserted blocks
    assert "attention.1" in explicit.transport_plans[1] and "attention.1" not in closed.transport_plans[1]


@pytest.mark.parametrize("family", PRE_LN[:2] + POST_LN[:1])
def test_unmatched_blocks_are_the_anchor_block_with_writers_scaled_or_whole(family):
    """For any pair: the fused block where only the deeper anchor has one is the anchor's block with its residual
    writers scaled by the anchor's weight (``average``) or the anchor's block whole (``transplant``)."""
    deep, shallow = make(family, 4), make(family, 2, seed=1)
    batch = inputs(family, n=16)
    weights = (0.7, 0.3)
    average = fuse([deep, shallow], batch, EXACT, weights=weights, unmatched="average")
    transplant = fuse([deep, shallow], batch, EXACT, weights=weights, unmatched="transplant")
    assert average.layer_alignment == [[0, 3]]
    anchor = get_adapter(deep).prepare(deep).state_dict()
    writers = ("attn.c_proj", "mlp.c_proj", "o_proj", "down_proj", "attention.output.dense", "output.dense")
    keys = _unmatched_keys(deep, [1, 2])
    assert any(k.endswith(w + ".weight") for k in keys for w in writers)
    for key in keys:
        scale = weights[0] if any(f".{w}." in key for w in writers) else 1.0
        assert torch.allclose(average.model.state_dict()[key], scale * anchor[key], atol=1e-6), key
        assert torch.allclose(transplant.model.state_dict()[key], anchor[key]), key
    # matched blocks are averaged as before: not the anchor's
    matched = _unmatched_keys(deep, [0])
    assert any(not torch.allclose(average.model.state_dict()[k], anchor[k]) for k in matched)


def test_post_ln_explicit_route_mixes_fitted_layer_norms_where_the_closed_form_keeps_the_anchors():
    """Post-LN (BERT): the explicit route averages the anchor's layer norms with fitted approximate identities,
    so it is not the closed form; the closed form keeps the anchor's norms and fits nothing."""
    deep, shallow = make("bert", 4), make("bert", 2, seed=1)
    batch = inputs("bert", n=16)
    explicit = fuse([deep, shallow], batch, EXACT, unmatched="identity")
    closed = fuse([deep, shallow], batch, EXACT)
    anchor = get_adapter(deep).prepare(deep).state_dict()
    key = "bert.encoder.layer.1.output.LayerNorm.weight"
    assert torch.equal(closed.model.state_dict()[key], anchor[key])
    assert not torch.allclose(explicit.model.state_dict()[key], anchor[key], atol=1e-3)
    assert explicit.identity_errors and closed.identity_errors == {}


def test_a_folder_loaded_pair_fuses_to_the_same_model_as_the_in_memory_pair(tmp_path):
    deep, shallow = make("llama", 4), make("llama", 2, seed=1)
    for name, model in (("deep", deep), ("shallow", shallow)):
        model.save_pretrained(tmp_path / name)
    loaded = [load_pretrained(tmp_path / "deep"), load_pretrained(tmp_path / "shallow")]
    batch = inputs("llama", n=16)
    a = fuse([deep, shallow], batch, EXACT).model.state_dict()
    b = fuse(loaded, batch, EXACT).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_a_sharded_save_round_trips_through_from_pretrained_and_load_pretrained(family, tmp_path):
    deep, shallow = make(family, 4), make(family, 2, seed=1)
    batch = inputs(family, n=16)
    result = fuse([deep, shallow], batch, EXACT)
    result.save_pretrained(tmp_path / "fused", max_shard_size="40KB", processor=False)
    shards = sorted(p.name for p in (tmp_path / "fused").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "fused" / "model.safetensors.index.json").is_file()
    auto = transformers.AutoModelForCausalLM if family == "gpt2" else transformers.AutoModelForSequenceClassification
    for reloaded in (auto.from_pretrained(tmp_path / "fused"), load_pretrained(tmp_path / "fused")):
        assert max_rel_error(reloaded(**batch).logits, result.model(**batch).logits) < 1e-6


def test_a_sharded_save_of_a_sequential_and_a_timm_model_round_trips_through_load_pretrained(tmp_path):
    from ._models import mlp

    x = torch.randn(64, 8)
    result = fuse([mlp(8, [32, 32, 32], 3, seed=1), mlp(8, [32, 32], 3, seed=2)], x, EXACT)
    result.save_pretrained(tmp_path / "mlp", max_shard_size=3000)
    assert len(list((tmp_path / "mlp").glob("model-*.safetensors"))) > 1
    assert not (tmp_path / "mlp" / "model.safetensors").exists()
    assert max_rel_error(load_pretrained(tmp_path / "mlp")(x), result.model(x)) < 1e-6

    timm = pytest.importorskip("timm")
    deep, shallow = (
        timm.create_model("resnet18", num_classes=5, layers=[d, 1, 1, 1], channels=(8, 16, 16, 16), in_chans=1).eval()
        for d in (3, 2)
    )
    batch = torch.rand(16, 1, 16, 16)
    # untrained ResNets give every alignment the same cost: align by index
    fused = fuse([deep, shallow], batch, EXACT, layer_cost="index")
    fused.save_pretrained(tmp_path / "timm", max_shard_size="20KB")
    assert len(list((tmp_path / "timm").glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        assert max_rel_error(load_pretrained(tmp_path / "timm")(batch), fused.model(batch)) < 1e-6


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_repair_of_a_closed_form_fusion_takes_unmatched_blocks_from_the_anchor_and_the_rest_from_both_parents(family):
    """``repair="repair"`` with blocks only in the deeper model (3 vs 1): at repair points inside those blocks the
    fused statistics become the anchor's; at the matched block they become the weighted mean of the anchor's and
    the shallow parent's own (measured at its own depth, never through the placeholder blocks, which on post-LN
    models are not identities), carried by the transport plans."""
    from hf_clafusion import core
    from hf_clafusion.repair import measure

    deep, shallow = make(family, 3), make(family, 1, seed=1)
    batch = inputs(family, n=16)
    # one batch: REPAIR's statistics are then exactly the targets (with several batches, within about 1 %)
    config = EXACT.replace(batch_size=16)
    plain = fuse([deep, shallow], batch, config)
    result = fuse([deep, shallow], batch, config, repair="repair")
    assert result.config.repair == "repair" and plain.config.repair is None
    assert result.layer_alignment == plain.layer_alignment
    ((matched,),) = result.layer_alignment
    adapter = get_adapter(deep)
    anchor, own = adapter.prepare(deep), adapter.prepare(shallow)
    layers = _layers(deep)
    points = adapter.spec(anchor).repair_points

    def block(point):
        return int(point.capture[len(layers) + 1 :].split(".", 1)[0])

    inside = [p for p in points if block(p) != matched]
    assert len(inside) == 6  # three points in each of the two unmatched blocks
    captures = [p.capture for p in inside]
    targets = measure(anchor, captures, [batch], adapter)
    before = measure(plain.model, captures, [batch], adapter)
    after = measure(result.model, captures, [batch], adapter)
    assert any(not torch.allclose(b.std, t.std, rtol=1e-2) for b, t in zip(before, targets))
    for capture, a, t in zip(captures, after, targets):
        assert torch.allclose(a.mean, t.mean, atol=1e-4), capture
        assert torch.allclose(a.std, t.std, rtol=1e-3, atol=1e-5), capture

    ours = [p for p in points if block(p) == matched]
    mine = [p.capture.replace(f"{layers}.{matched}.", f"{layers}.0.") for p in ours]
    anchor_stats = measure(anchor, [p.capture for p in ours], [batch], adapter)
    shallow_stats = measure(own, mine, [batch], adapter)
    after = measure(result.model, [p.capture for p in ours], [batch], adapter)
    for point, a, x, y in zip(ours, after, anchor_stats, shallow_stats):
        plan = result.transport_plans[1][point.group].double()
        r_map = core.plan_maps(plan, result.config.plan_normalization)[0]
        carried = [core.carry_statistics(v, r_map) for v in (y.mean, y.std)]
        mean, std = core.repair_targets([x.mean, carried[0]], [x.std, carried[1]], [0.5, 0.5])
        assert torch.allclose(a.mean.double(), mean.double(), atol=1e-4), point.capture
        assert torch.allclose(a.std.double(), std.double(), rtol=1e-3, atol=1e-5), point.capture


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_path_fuses_to_the_cpu_result():
    deep, shallow = make("llama", 4), make("llama", 2, seed=1)
    batch = inputs("llama", n=16)
    cpu = fuse([deep, shallow], batch, EXACT).model.state_dict()
    gpu = fuse([deep, shallow], batch, EXACT, device="cuda").model.state_dict()
    assert all(gpu[k].device.type == "cuda" for k in gpu)
    assert all(torch.allclose(cpu[k], gpu[k].cpu(), atol=1e-4) for k in cpu)


def test_a_permutation_plan_is_applied_as_a_gather_bit_identical_to_the_matrix_product():
    from hf_clafusion.core import apply_plan, permutation_of

    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(6, generator=g)
    matrix = torch.zeros(6, 6, dtype=torch.float64)
    matrix[perm, torch.arange(6)] = 1.0
    assert torch.equal(permutation_of(matrix), perm)
    soft = matrix * 0.5 + 0.5 / 6
    assert permutation_of(soft) is None and permutation_of(matrix[:, :5]) is None
    for shape, axis, inner, outer in (((6, 4), 0, 1, 1), ((3, 12), 1, 2, 1), ((18, 5), 0, 1, 3)):
        tensor = torch.randn(*shape, generator=g)
        gathered = apply_plan(tensor, axis, matrix, inner=inner, outer=outer)
        moved = tensor.movedim(axis, -1)
        blocks = moved.reshape(*moved.shape[:-1], outer, 6, inner).double()
        product = torch.einsum("...oiq,ij->...ojq", blocks, matrix).reshape(moved.shape).movedim(-1, axis)
        assert torch.equal(gathered, product.float())


def test_permutation_of_refuses_a_matrix_that_is_a_permutation_but_for_one_entry():
    from hf_clafusion.core import permutation_of

    matrix = torch.eye(4, dtype=torch.float64)
    doubled = matrix.clone()
    doubled[0, 1] = 1.0  # row 0 has two ones, column 1 two ones
    moved = matrix.clone()
    moved[1, 1], moved[1, 2] = 0.0, 1.0  # column 1 empty, column 2 has two ones
    scaled = matrix * 2.0  # one non-zero per row and column, but not 1
    assert permutation_of(matrix).tolist() == [0, 1, 2, 3]
    assert permutation_of(doubled) is None and permutation_of(moved) is None and permutation_of(scaled) is None


def test_the_chunked_average_equals_a_whole_tensor_float64_average_bit_for_bit(monkeypatch):
    from hf_clafusion.core import averaging

    monkeypatch.setattr(averaging, "AVERAGE_CHUNK", 7)  # chunks that split rows, and a short last chunk
    g = torch.Generator().manual_seed(0)
    weights = [0.2, 1 / 3, 0.4666]
    for dtype in (torch.float32, torch.bfloat16):
        tensors = [torch.randn(5, 9, generator=g).to(dtype) for _ in weights]
        whole = sum(w * t.double() for w, t in zip(weights, tensors)).to(dtype)
        assert torch.equal(averaging.weighted_average(tensors, weights), whole)
    transposed = [torch.randn(9, 5, generator=g).T for _ in range(2)]  # non-contiguous inputs
    assert torch.equal(averaging.weighted_average(transposed, [0.5, 0.5]), (transposed[0] + transposed[1]) / 2)


@pytest.mark.parametrize("family", ["bert", "llama", "vit"])
def test_a_permuted_copy_fuses_back_with_a_few_positions_per_sample(family):
    from ._models import permuted_copy
    from .test_transformers import out

    model = make(family, 2)
    batch = inputs(family)
    result = fuse([model, permuted_copy(model, seed=3)], batch, EXACT, positions_per_sample=3)
    assert max_rel_error(out(result.model, batch), out(model, batch)) < 1e-4


def test_positions_per_sample_covering_every_position_changes_nothing_and_fewer_change_the_costs():
    deep, shallow = make("bert", 3, seed=0), make("bert", 2, seed=1)
    batch = inputs("bert")  # 16 sequences of 12 tokens, 4 of them half padding
    every = fuse([deep, shallow], batch, EXACT).model.state_dict()
    covering = fuse([deep, shallow], batch, EXACT, positions_per_sample=12).model.state_dict()
    assert all(torch.equal(every[k], covering[k]) for k in every)
    fewer = fuse([deep, shallow], batch, EXACT, positions_per_sample=2).model.state_dict()
    assert any(not torch.equal(every[k], fewer[k]) for k in every)  # the statistics did see fewer positions


def test_positions_per_sample_and_transport_threads_must_be_positive_integers():
    from hf_clafusion import ConfigError, FusionConfig

    with pytest.raises(ConfigError, match="positions_per_sample"):
        FusionConfig(positions_per_sample=0)
    with pytest.raises(ConfigError, match="transport_threads"):
        FusionConfig(transport_threads=0)


def test_plans_solved_on_several_threads_equal_the_plans_solved_in_order(monkeypatch):
    import threading

    from hf_clafusion import fusion

    deep, shallow = make("bert", 3, seed=0), make("bert", 2, seed=1)
    batch = inputs("bert")
    in_order = fuse([deep, shallow], batch, EXACT, transport_threads=1)
    threads: set[str] = set()
    solve = fusion._group_plan

    def recording(*args):
        threads.add(threading.current_thread().name)
        return solve(*args)

    monkeypatch.setattr(fusion, "_group_plan", recording)
    threaded = fuse([deep, shallow], batch, EXACT, transport_threads=3)
    assert len(threads) > 1 and all(name.startswith("hf_clafusion") for name in threads)
    assert in_order.transport_plans.keys() == threaded.transport_plans.keys()
    for k, plans in in_order.transport_plans.items():
        assert plans.keys() == threaded.transport_plans[k].keys()
        assert all(torch.equal(plan, threaded.transport_plans[k][name]) for name, plan in plans.items())
    expected, got = in_order.model.state_dict(), threaded.model.state_dict()
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_in_order_yields_results_in_order_keeps_a_bounded_lookahead_and_raises_where_the_item_failed():
    import threading
    import time

    from hf_clafusion.fusion import _in_order

    started: list[int] = []
    lock = threading.Lock()

    def work(item: int) -> int:
        with lock:
            started.append(item)
        time.sleep(0.002 * (item % 3))
        if item == 7:
            raise ValueError("item 7")
        return item * item

    results = _in_order(work, list(range(10)), workers=2)
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    time.sleep(0.05)
    assert max(started) < 3 + 4  # at most 2 * workers items beyond those consumed were started
    assert [next(results) for _ in range(4)] == [9, 16, 25, 36]
    with pytest.raises(ValueError, match="item 7"):
        next(results)
    assert list(_in_order(lambda x: -x, [1, 2, 3], workers=1)) == [-1, -2, -3]


def test_plans_run_on_several_threads_by_default_only_where_a_group_is_wide(monkeypatch):
    from hf_clafusion import FusionConfig
    from hf_clafusion.fusion import CONCURRENT_TRANSPORT_PAIRS, _transport_workers

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    narrow, wide = [768 * 768, 1536 * 1536], [768 * 768, CONCURRENT_TRANSPORT_PAIRS]
    assert _transport_workers(FusionConfig(), narrow) == 1  # fast solves: a second one would only add memory
    assert _transport_workers(FusionConfig(), wide) == 2  # one per group at most
    assert _transport_workers(FusionConfig(), wide * 3) == 4  # one per torch thread
    assert _transport_workers(FusionConfig(transport_threads=3), narrow * 5) == 3
    assert _transport_workers(FusionConfig(transport_threads=1), wide * 5) == 1
