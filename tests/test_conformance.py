"""Every public entry point over every model family: one tiny-model factory per family (tests/families.py).

For each family: ``fuse`` gives the deep model's depth, ``align`` one alignment per segment, ``evaluate`` and
``finetune`` take every data form, a fused model round-trips through ``save_pretrained`` / ``load_pretrained``,
identity insertion keeps the function (or reports its error, post-LN), and a neuron-permuted copy fuses back to
the original. A new family gets all of it by adding one factory; a registered adapter without one fails.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import hf_clafusion
from hf_clafusion import FinetuneConfig, FusionConfig, align, evaluate, finetune, fuse
from hf_clafusion.adapters import get_adapter

from ._models import permuted_copy
from .families import FACTORIES, FORMS, NUM_SAMPLES, Factory, labelled_forms, logits


CONFIG = FusionConfig(progress=False, num_samples=NUM_SAMPLES, batch_size=NUM_SAMPLES)
EXACT = CONFIG.replace(repair=None)
BY_NAME = {f.name: f for f in FACTORIES}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=[f.name for f in FACTORIES])
def factory(request) -> Factory:
    factory = BY_NAME[request.param]
    if factory.module is not None:
        pytest.importorskip(factory.module)
    return factory


def depths(model: torch.nn.Module) -> tuple[int, ...]:
    adapter = get_adapter(model)
    return tuple(adapter.spec(adapter.prepare(model)).segment_depths)


def function_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of outputs ``a`` from ``b``, relative to how much ``b`` varies over the samples.

    Stricter than relative to ``b``'s size: a random tiny model's logits are mostly input-independent offsets,
    which any average of the weights gets right.
    """
    spread = (b - b.mean(0)).abs().max()
    assert spread > 1e-6, "the reference outputs do not depend on the input"
    return float((a - b).abs().max() / spread)


def insert_identity(adapter, model, layouts, template, *, batches=None):
    """``adapter.insert_identity`` under its contract: it returns ``(model, identity_errors)``."""
    out = adapter.insert_identity(model, layouts, template, batches=batches)
    assert isinstance(out, tuple) and len(out) == 2, (
        f"insert_identity must return (model, identity_errors), got {type(out).__name__}"
    )
    return out


@functools.cache
def _fused(name: str):
    """The family's deep and shallow models and their fusion (computed once, shared read-only by the tests)."""
    factory = BY_NAME[name]
    deep, shallow = factory.deep(), factory.shallow()
    return deep, shallow, fuse([deep, shallow], factory.batch(), CONFIG)


# --------------------------------------------------------------------------------------------- registry


def test_every_registered_adapter_has_a_factory():
    covered = {f.adapter for f in FACTORIES}
    assert set(hf_clafusion.list_adapters()) - covered == set()


def test_factory_models_are_handled_by_their_declared_adapter(factory):
    deep, shallow = factory.deep(), factory.shallow()
    assert get_adapter(deep).name == factory.adapter
    d, s = depths(deep), depths(shallow)
    assert len(d) == len(s) and all(a >= b for a, b in zip(d, s)) and d != s  # really a deep/shallow pair


# --------------------------------------------------------------------------------------------- fuse and align


def test_fused_model_has_the_deep_models_type_and_depth(factory):
    deep, _, result = _fused(factory.name)
    assert type(result.model) is type(deep)
    assert depths(result.model) == depths(deep)
    assert torch.isfinite(logits(result.model, factory.batch())).all()


def test_align_gives_one_increasing_alignment_per_segment(factory):
    deep, shallow = factory.deep(), factory.shallow()
    preview = align([deep, shallow], factory.batch(), CONFIG)
    d, s = depths(deep), depths(shallow)
    assert len(preview.layer_alignment) == len(d)
    pair = preview.pairs[0]
    for segment, (m, n) in enumerate(zip(d, s)):
        local = pair.local(segment)
        assert len(local) == n
        assert all(0 <= i < m for i in local) and local == sorted(set(local))
    # align previews CLA's alignment: what fuse does with alignment="cla", and one of "auto"'s two candidates
    assert preview.layer_alignment == fuse([deep, shallow], factory.batch(), CONFIG, alignment="cla").layer_alignment
    chain = [list(range(sum(d[:i]), sum(d[:i]) + n)) for i, n in enumerate(s)]  # deep layer k for shallow layer k
    assert _fused(factory.name)[2].layer_alignment in (preview.layer_alignment, chain)


# --------------------------------------------------------------------------------------------- evaluate / finetune


@pytest.mark.parametrize("form", FORMS)
def test_evaluate_gives_each_models_accuracy_and_loss_in_every_data_form(factory, form):
    if form == "dataset":
        pytest.importorskip("datasets")
    deep, shallow, _ = _fused(factory.name)
    batch, labels = factory.batch(), factory.labels()
    report = evaluate([deep, shallow], labelled_forms(factory)[form], names=["deep", "shallow"])
    assert [row.name for row in report] == ["deep", "shallow", "ensemble"]
    for model, name in ((deep, "deep"), (shallow, "shallow")):
        out = logits(model, batch)
        row = report[name]
        assert row.num_samples == NUM_SAMPLES
        assert row.accuracy == pytest.approx(float((out.argmax(-1) == labels).float().mean()))
        assert row.loss == pytest.approx(float(torch.nn.functional.cross_entropy(out, labels)), rel=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_finetune_trains_for_the_requested_steps_in_every_data_form(factory, form):
    if form == "dataset":
        pytest.importorskip("datasets")
    model = factory.shallow()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = FinetuneConfig(epochs=1, max_steps=2, batch_size=8, lr=0.01, progress=False)
    out = finetune(model, labelled_forms(factory)[form], config=config)
    assert len(out.history) == 1
    assert out.history[-1]["step"] == 2
    assert math.isfinite(out.history[-1]["train_loss"])
    after = out.model.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before if before[k].is_floating_point())


# --------------------------------------------------------------------------------------------- save / load


def test_saved_fused_model_loads_back_with_the_same_outputs(factory, tmp_path):
    _, _, result = _fused(factory.name)
    saved = result.save_pretrained(tmp_path / "fused", processor=False)  # tiny models built in code have no tokenizer
    loaded = hf_clafusion.load_pretrained(saved).eval()
    assert type(loaded) is type(result.model)
    batch = factory.batch(4, seed=3)
    assert torch.allclose(logits(loaded, batch), logits(result.model, batch), atol=1e-5)


# --------------------------------------------------------------------------------------------- invariants


def _layouts(deep: tuple[int, ...], shallow: tuple[int, ...]) -> list[list[int | None]]:
    """The shallow model's first layer first, identity layers next, its other layers last (no identity at a stage
    start, which some families refuse)."""
    return [[0, *[None] * (d - s), *range(1, s)] for d, s in zip(deep, shallow)]


def test_identity_insertion_keeps_the_function_or_reports_its_error(factory):
    deep, shallow = factory.deep(), factory.shallow()
    adapter = get_adapter(shallow)
    batch = factory.batch()
    layouts = _layouts(depths(deep), depths(shallow))
    balanced, errors = insert_identity(
        adapter, adapter.prepare(shallow), layouts, adapter.prepare(deep), batches=[batch]
    )
    assert depths(balanced) == depths(deep)
    error = function_error(logits(balanced.eval(), batch), logits(shallow, batch))
    if factory.exact_identity:
        assert errors == {}
        assert error < 1e-5
    else:  # post-LN: an approximate identity is fitted, and its error reported per inserted block
        inserted = sum(layout.count(None) for layout in layouts)
        assert len(errors) == inserted and all(0 < e < 0.10 for e in errors.values()), errors
        assert error > 0


def test_fusing_a_permuted_copy_returns_the_original_function(factory):
    model = factory.shallow(seed=2)
    twin = permuted_copy(model, seed=3)
    batch = factory.batch()
    assert function_error(logits(twin, batch), logits(model, batch)) < 1e-4  # the copy computes the same function
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, twin.state_dict()[k])]
    assert moved  # ...with its weights really moved
    result = fuse([model, twin], batch, EXACT)
    assert function_error(logits(result.model, batch), logits(model, batch)) < 1e-4


def test_a_perturbed_permuted_copy_does_not_fuse_back(factory):
    """The permuted-copy check can fail: a copy whose weights are also perturbed fuses to a different function."""
    model = factory.shallow(seed=2)
    twin = permuted_copy(model, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in twin.parameters():
            if p.ndim >= 2:
                p.add_(p.std() * torch.randn(p.shape, generator=g))
    batch = factory.batch()
    result = fuse([model, twin], batch, EXACT)
    assert function_error(logits(result.model, batch), logits(model, batch)) > 1e-3
