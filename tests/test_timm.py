"""The timm adapter: ResNet (BasicBlock, Bottleneck), ViT/DeiT and ConvNeXt on tiny models built in code.

Invariants (DESIGN.md): identity-block insertion is exact, fusing with a permuted copy returns the model, the
fused model round-trips through timm's own format, deep/shallow pairs fuse to the anchor's depth, and the
cross-layer alignment is no worse than any random admissible alignment.
"""

import copy
import time

import pytest
import torch


timm = pytest.importorskip("timm")

from hf_clafusion import FusionConfig, fuse, fuse_pretrained  # noqa: E402
from hf_clafusion.adapters import get_adapter  # noqa: E402
from hf_clafusion.adapters.timm import FAMILIES as TIMM_FAMILIES  # noqa: E402
from hf_clafusion.adapters.timm import TimmAdapter  # noqa: E402
from hf_clafusion.core import alignment_cost, apply_plan, random_alignment  # noqa: E402
from hf_clafusion.errors import (  # noqa: E402
    AlignmentError,
    CalibrationDataError,
    ClaFusionError,
    ClaFusionWarning,
    IncompatibleModelsError,
    SaveError,
    UnsupportedArchitectureError,
)
from hf_clafusion.hub import load_pretrained  # noqa: E402

from ._models import (  # noqa: E402
    fuse_leaves_parents_alone,
    max_rel_error,
    permutation_matrix,
    permuted_copy,
    randomize_bn,
)


EXACT = FusionConfig(repair=None, progress=False, num_samples=32, batch_size=32)
SIZE = 16  # ConvNeXt (stride 32 overall) gets 32x32 images


# --------------------------------------------------------------------------------------------- tiny models


def resnet(layers, *, bottleneck=False, channels=(8, 16, 16, 16), seed=0, num_classes=5, arch=None, **kwargs):
    torch.manual_seed(seed)
    name = arch or ("resnet50" if bottleneck else "resnet18")
    model = timm.create_model(
        name, pretrained=False, num_classes=num_classes, layers=layers, channels=channels, in_chans=1, **kwargs
    )
    randomize_bn(model, seed)
    return model.eval()


def vit(depth, *, seed=0, num_heads=4, embed_dim=32, num_classes=5, arch="vit_tiny_patch16_224", **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(
        arch,
        pretrained=False,
        num_classes=num_classes,
        img_size=SIZE,
        patch_size=4,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        in_chans=1,
        **kwargs,
    )
    _sharpen(model, seed)
    return model.eval()


def convnext(depths, *, seed=0, dims=(8, 8, 16, 16), conv_mlp=True, num_classes=5, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(
        "convnext_atto",
        pretrained=False,
        num_classes=num_classes,
        depths=depths,
        dims=dims,
        conv_mlp=conv_mlp,
        in_chans=1,
        **kwargs,
    )
    _sharpen(model, seed)
    return model.eval()


def _sharpen(model, seed):
    """Random-init timm models have near-zero residual branches (small init, layer scale 1e-6): make them matter."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim >= 2:
                p.mul_(3.0)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def images(n=48, seed=0, family=""):
    size = 2 * SIZE if "convnext" in family or "vgg" in family else SIZE  # stride 32 overall
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


FAMILIES = {
    "resnet-basic": lambda d, **kw: resnet([d, 1, 1, 1], **kw),
    "resnet-bottleneck": lambda d, **kw: resnet([d, 1, 1, 1], bottleneck=True, channels=(4, 8, 8, 8), **kw),
    # deep stem, average-pool downsample, and a stem that joins stage 1's residual group (no layer1.0 downsample)
    "resnet-d": lambda d, **kw: resnet([d, 1, 1, 1], arch="resnet18d", stem_width=4, **kw),
    "vit": lambda d, **kw: vit(d, **kw),
    "vit-layerscale": lambda d, **kw: vit(d, init_values=0.5, **kw),
    "deit-distilled": lambda d, **kw: vit(d, arch="deit_tiny_distilled_patch16_224", **kw),
    "convnext": lambda d, **kw: convnext((d, 1, 1, 1), **kw),
    "convnext-linear-mlp": lambda d, **kw: convnext((d, 1, 1, 1), conv_mlp=False, **kw),
}


def build(family, depth, **kwargs):
    return FAMILIES[family](depth, **kwargs)


# --------------------------------------------------------------------------------------------- helpers


def depth(model):
    return get_adapter(model).spec(model).segment_depths


# --------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("family", list(FAMILIES))
def test_identity_blocks_leave_outputs_unchanged(family):
    shallow, deep = build(family, 2, seed=1), build(family, 4, seed=2)
    adapter = get_adapter(shallow)
    balanced, errors = adapter.insert_identity(
        adapter.prepare(shallow), [[0, None, 1, None], [0], [0], [0]][: len(depth(shallow))], adapter.prepare(deep)
    )
    assert depth(balanced)[0] == 4
    x = images(family=family)
    with torch.no_grad():
        assert max_rel_error(balanced(x), shallow(x)) < 1e-6
    assert errors == {}  # every timm identity block is exact


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fusing_with_a_permuted_copy_returns_the_model(family):
    model = build(family, 3, seed=3)
    other = permuted_copy(model, seed=4)
    x = images(32, family=family)
    with torch.no_grad():
        assert max_rel_error(other(x), model(x)) < 1e-5  # the permutation preserves the function...
    moved = sum(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert moved > 0  # ...and really moved the weights
    result = fuse([model, other], x, EXACT)
    with torch.no_grad():
        assert max_rel_error(result.model(x), model(x)) < 1e-4


def test_every_timm_family_entry_is_exercised_by_a_test_model():
    tested = {TimmAdapter().spec(build(f, 1)).description["family"] for f in FAMILIES}
    assert tested | {"vgg"} == set(TIMM_FAMILIES)  # VGG: the slow tests build stock VGGs


def test_the_adapter_keeps_no_state_between_calls():
    adapter = TimmAdapter()
    before = dict(vars(adapter))
    for family in ("resnet-basic", "vit", "convnext-linear-mlp"):
        shallow, deep = adapter.prepare(build(family, 1, seed=1)), adapter.prepare(build(family, 2, seed=2))
        adapter.check_compatible([shallow, deep])
        adapter.insert_identity(shallow, [[0, None]] + [[0]] * (len(depth(shallow)) - 1), deep)
        with pytest.warns(ClaFusionWarning, match="experimental"):
            adapter.merge_layers(deep, [[0]] * len(depth(deep)), {}, "none")
        adapter.features(torch.rand(2, 4, 4, 64), images(2, family=family))
    assert vars(adapter) == before


def test_a_fresh_adapter_reads_the_convnext_channel_layout_from_the_activation():
    model = build("convnext-linear-mlp", 1, dims=(16, 16, 16, 16))
    x = images(4, family="convnext")
    block = model.stages[0].blocks[0]
    with torch.no_grad():
        maps = model.stem(x)  # (N, 16, 8, 8)
        hidden = block.mlp.fc1(block.norm(block.conv_dw(maps).permute(0, 2, 3, 1)))  # (N, 8, 8, 64) as in the block
    assert torch.equal(TimmAdapter().features(hidden, x), hidden.reshape(-1, 64))
    assert torch.equal(TimmAdapter().features(maps, x), maps.movedim(1, -1).reshape(-1, 16))
    wide = torch.rand(4, 1, 32, 64)  # a non-square image: (N, 8, 16, C) is channels-last, (N, C, 8, 16) is not
    assert TimmAdapter().features(torch.rand(4, 8, 16, 64), wide).shape == (4 * 8 * 16, 64)
    assert TimmAdapter().features(torch.rand(4, 16, 8, 16), wide).shape == (4 * 8 * 16, 16)


def test_linear_and_conv_mlp_convnexts_fuse_to_the_same_weights():
    x = images(32, family="convnext")
    fused = {
        mlp: fuse([build(mlp, 2, seed=1), build(mlp, 1, seed=2)], x, progress=False, num_samples=32).model
        for mlp in ("convnext", "convnext-linear-mlp")
    }
    conv, linear = (fused[k].state_dict() for k in ("convnext", "convnext-linear-mlp"))
    assert conv.keys() == linear.keys()
    assert all(torch.equal(conv[k].flatten(), linear[k].flatten()) for k in conv)


def test_permuting_attention_dimensions_across_heads_changes_the_function():
    """The attention spec matters: moving single dimensions across heads changes the function."""
    model = vit(2, seed=5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perm = permutation_matrix(torch.randperm(32, generator=torch.Generator().manual_seed(0)))
    for key, axis, outer in (("blocks.0.attn.qkv.weight", 0, 3), ("blocks.0.attn.qkv.bias", 0, 3)):
        state[key] = apply_plan(state[key], axis, perm, outer=outer)
    state["blocks.0.attn.proj.weight"] = apply_plan(state["blocks.0.attn.proj.weight"], 1, perm)
    broken = copy.deepcopy(model)
    broken.load_state_dict(state)
    x = images()
    with torch.no_grad():
        assert max_rel_error(broken(x), model(x)) > 1e-3


PRIMARY = ("resnet-basic", "vit", "convnext")  # the other variants' round trips run under -m slow


@pytest.mark.parametrize("family", [f if f in PRIMARY else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_deep_shallow_pair_fuses_to_the_anchor_depth_and_round_trips(family, tmp_path):
    deep, shallow = build(family, 3, seed=1), build(family, 2, seed=2)
    result = fuse([deep, shallow], images(64, family=family), progress=False, num_samples=64)
    assert depth(result.model) == depth(deep)
    assert type(result.model) is type(deep)
    saved = result.save_pretrained(tmp_path / "fused")
    x = images(8, seed=9, family=family)
    reloaded = timm.create_model(f"local-dir:{saved}", pretrained=True).eval()
    ours = load_pretrained(saved)
    with torch.no_grad():
        expected = result.model(x)
        assert torch.allclose(reloaded(x), expected, atol=1e-6)
        assert torch.allclose(ours(x), expected, atol=1e-6)
    assert depth(reloaded) == depth(deep)


def test_compression_anchor_on_the_narrow_model_keeps_teacher_depth_and_student_widths():
    teacher = resnet([3, 2, 1, 1], channels=(16, 16, 32, 32), seed=1)
    student = resnet([2, 1, 1, 1], channels=(8, 8, 16, 16), seed=2)
    result = fuse([teacher, student], images(64), progress=False, anchor="shallowest", num_samples=64)
    assert depth(result.model) == (3, 2, 1, 1)
    assert result.model.layer1[0].conv2.out_channels == 8
    assert result.model.fc.in_features == 16
    with torch.no_grad():
        assert torch.isfinite(result.model(images(4))).all()


def test_cross_layer_alignment_is_no_worse_than_random_admissible_alignments():
    deep, shallow = vit(7, seed=1), vit(5, seed=2)
    result = fuse([deep, shallow], images(64), progress=False, num_samples=64)
    cost = result.layer_costs[0]
    chosen = result.pairs[0].local(0)
    m, n = cost.shape
    assert (m, n) == (7, 5) and n - 2 >= 3  # three free shallow blocks
    best = alignment_cost(cost, chosen)
    for seed in range(50):
        assert best <= alignment_cost(cost, random_alignment(m, n, seed=seed)) + 1e-9


def test_bn_statistics_are_recomputed_after_fusion():
    deep, shallow = resnet([3, 1, 1, 1], seed=1), resnet([2, 1, 1, 1], seed=2)
    result = fuse([deep, shallow], images(64), progress=False, num_samples=64, repair="bn")
    assert result.bn_reset
    assert not torch.equal(result.model.layer1[0].bn1.running_var, deep.layer1[0].bn1.running_var)


# --------------------------------------------------------------------------------------------- loading


def test_fuse_pretrained_accepts_local_dir_names_folders_and_objects(tmp_path):
    from timm.models import save_for_hf

    deep, shallow = resnet([3, 1, 1, 1], seed=1), resnet([2, 1, 1, 1], seed=2)
    save_for_hf(deep, str(tmp_path / "deep"), safe_serialization=True)
    save_for_hf(shallow, str(tmp_path / "shallow"), safe_serialization=True)
    for parents in (
        [f"local-dir:{tmp_path / 'deep'}", f"local-dir:{tmp_path / 'shallow'}"],
        [str(tmp_path / "deep"), shallow],
    ):
        result = fuse_pretrained(parents, images(64), progress=False, num_samples=64)
        assert depth(result.model) == (3, 1, 1, 1)
    assert result.parents[0]["name_or_path"] == str(tmp_path / "deep")


def test_hub_ids_fail_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ClaFusionError, match="local folder"):
        fuse_pretrained(["hf-hub:timm/resnet18.a1_in1k", resnet([1, 1, 1, 1])], images(), progress=False)
    assert time.perf_counter() - start < 10


def test_pickle_only_folders_are_refused(tmp_path):
    from timm.models import save_for_hf

    save_for_hf(resnet([1, 1, 1, 1]), str(tmp_path / "m"), safe_serialization=False)
    with pytest.raises(SaveError, match="allow_pickle"):
        load_pretrained(tmp_path / "m")
    assert isinstance(load_pretrained(tmp_path / "m", allow_pickle=True), torch.nn.Module)


def test_bare_constructor_models_fuse_but_cannot_be_saved_in_timm_format(tmp_path):
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    deep = ResNet(BasicBlock, [3, 1, 1, 1], num_classes=5, in_chans=1, channels=(8, 8, 8, 8)).eval()
    shallow = ResNet(BasicBlock, [2, 1, 1, 1], num_classes=5, in_chans=1, channels=(8, 8, 8, 8)).eval()
    result = fuse([deep, shallow], images(64), progress=False, num_samples=64)
    with pytest.raises(SaveError, match="timm.create_model"):
        result.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- raw images


def _pil_images(n=24, mode="L"):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [
        Image.fromarray((torch.rand(20, 20, generator=g) * 255).to(torch.uint8).numpy(), mode="L").convert(mode)
        for _ in range(n)
    ]


def _with_data_config(model, **cfg):
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, SIZE, SIZE), "crop_pct": 1.0, **cfg}
    return model


def test_raw_pil_images_are_preprocessed_with_the_parents_data_config():
    deep = _with_data_config(resnet([2, 1, 1, 1], seed=1), mean=(0.5,), std=(0.25,))
    shallow = _with_data_config(resnet([1, 1, 1, 1], seed=2), mean=(0.5,), std=(0.25,))
    result = fuse([deep, shallow], _pil_images(), progress=False, num_samples=16)
    assert result.calibration["num_samples"] == 16
    assert depth(result.model) == (2, 1, 1, 1)


def test_raw_images_from_a_datasets_split_are_preprocessed_and_fused():
    datasets = pytest.importorskip("datasets")
    deep = _with_data_config(vit(3, seed=1), mean=(0.5,), std=(0.5,))
    shallow = _with_data_config(vit(2, seed=2), mean=(0.5,), std=(0.5,))
    split = datasets.Dataset.from_dict({"image": _pil_images(12), "label": [0] * 12}).cast_column(
        "image", datasets.Image()
    )
    result = fuse([deep, shallow], split, progress=False)
    assert depth(result.model) == (3,)


def test_parents_with_different_preprocessing_are_refused_for_raw_images():
    deep = _with_data_config(resnet([2, 1, 1, 1], seed=1), mean=(0.5,), std=(0.25,))
    shallow = _with_data_config(resnet([1, 1, 1, 1], seed=2), mean=(0.1,), std=(0.25,))
    with pytest.raises(CalibrationDataError, match="mean"):
        fuse([deep, shallow], _pil_images(), progress=False)
    fuse([deep, shallow], images(), progress=False)  # tensors are accepted


# --------------------------------------------------------------------------------------------- refusals


def test_different_families_are_refused():
    adapter = TimmAdapter()
    with pytest.raises(IncompatibleModelsError, match="different timm families"):
        adapter.check_compatible([adapter.prepare(resnet([1, 1, 1, 1])), adapter.prepare(vit(2))])
    with pytest.raises(IncompatibleModelsError, match="different timm families"):
        fuse([resnet([1, 1, 1, 1]), convnext((1, 1, 1, 1))], images(family="convnext"), progress=False)
    with pytest.raises(IncompatibleModelsError, match="different timm families"):
        fuse([resnet([1, 1, 1, 1]), vit(2)], images(), progress=False)


def test_different_numbers_of_classes_are_refused():
    with pytest.raises(IncompatibleModelsError, match="output sizes"):
        fuse([vit(3), vit(2, num_classes=7)], images(), progress=False)


def test_different_head_layouts_are_refused():
    with pytest.raises(IncompatibleModelsError, match="number of heads"):
        fuse([vit(3), vit(2, num_heads=2)], images(), progress=False)


def test_basic_and_bottleneck_resnets_are_refused():
    a = resnet([1, 1, 1, 1])
    b = resnet([1, 1, 1, 1], bottleneck=True, channels=(2, 4, 4, 4))
    with pytest.raises(IncompatibleModelsError, match="block type"):
        fuse([a, b], images(), progress=False)


def _custom_vgg():
    from timm.models.vgg import VGG

    return VGG([8, "M", 16, 16, "M"], num_classes=5, in_chans=1)


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda: resnet([1, 1, 1, 1], block_args={"attn_layer": "se"}), "squeeze-excitation"),
        (lambda: resnet([1, 1, 1, 1], bottleneck=True, channels=(4, 8, 8, 8), cardinality=2), "Grouped"),
        (lambda: vit(2, qk_norm=True), "qk-norm"),
        (lambda: _custom_vgg(), "stock timm VGGs"),
    ],
)
def test_unknown_layers_are_refused_with_the_reason(make, what):
    model = make()
    with pytest.raises(UnsupportedArchitectureError, match=what):
        get_adapter(model).prepare(model)


def test_identity_at_a_stage_start_is_refused():
    shallow, deep = resnet([1, 1, 1, 1], seed=1), resnet([2, 1, 1, 1], seed=2)
    adapter = get_adapter(shallow)
    with pytest.raises(AlignmentError, match="first_fixed"):
        adapter.insert_identity(adapter.prepare(shallow), [[None, 0], [0], [0], [0]], adapter.prepare(deep))


def test_merge_balancing_drops_unmatched_blocks_experimentally():
    deep, shallow = vit(4, seed=1), vit(2, seed=2)
    with pytest.warns(ClaFusionWarning, match="experimental"):
        result = fuse([deep, shallow], images(64), progress=False, balancing="merge", num_samples=64)
    assert depth(result.model) == (2,)
    assert result.model._model_args["depth"] == 2


# --------------------------------------------------------------------------------------------- stock VGGs (slow)


def _stock_vgg(name, seed):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=5, in_chans=1)
    randomize_bn(model, seed)
    return model.eval()


@pytest.mark.slow
def test_vgg_identity_convolutions_leave_outputs_unchanged():
    shallow, deep = _stock_vgg("vgg11_bn", 0), _stock_vgg("vgg13_bn", 1)
    adapter = get_adapter(shallow)
    balanced, errors = adapter.insert_identity(shallow, [[0, None], [0, None], [0, 1], [0, 1], [0, 1]], deep)
    assert errors == {}
    assert balanced.pretrained_cfg["architecture"] == "vgg13_bn"
    x = images(4, family="vgg")
    with torch.no_grad():
        assert max_rel_error(balanced(x), shallow(x)) < 1e-6


@pytest.mark.slow
def test_vgg_deep_shallow_pair_fuses_and_round_trips(tmp_path):
    deep, shallow = _stock_vgg("vgg13", 0), _stock_vgg("vgg11", 1)
    result = fuse([deep, shallow], images(16, family="vgg"), progress=False, num_samples=16, solver="sinkhorn")
    assert depth(result.model) == (2, 2, 2, 2, 2)
    saved = result.save_pretrained(tmp_path / "fused")
    reloaded = timm.create_model(f"local-dir:{saved}", pretrained=True).eval()
    x = images(2, seed=3, family="vgg")
    with torch.no_grad():
        assert torch.allclose(reloaded(x), result.model(x), atol=1e-5)


# --------------------------------------------------------------------------------------------- unmatched blocks

#: Per residual family: the tensors an identity block zeroes (its residual writers), as state-dict key suffixes.
WRITERS = {
    "resnet-basic": (".bn2.weight", ".bn2.bias"),
    "resnet-bottleneck": (".bn3.weight", ".bn3.bias"),
    "vit": (".attn.proj.weight", ".attn.proj.bias", ".mlp.fc2.weight", ".mlp.fc2.bias"),
    "convnext": (".gamma",),
}
CONTAINER = {"resnet-basic": "layer1", "resnet-bottleneck": "layer1", "vit": "blocks", "convnext": "stages.0.blocks"}


@pytest.mark.parametrize("family", list(WRITERS))
def test_unmatched_blocks_are_the_anchor_block_with_writers_scaled_or_whole(family):
    """Where only the deeper anchor has a block, the fused block is the anchor's with its residual writers scaled
    by the anchor's weight (``average``, the closed form of averaging with an identity block) or the anchor's
    block whole (``transplant``); the closed form solves no plan inside it."""
    deep, shallow = build(family, 3, seed=1), build(family, 2, seed=2)
    x = images(32, family=family)
    weights = (0.7, 0.3)
    average = fuse([deep, shallow], x, EXACT, weights=weights, unmatched="average", layer_cost="index")
    transplant = fuse([deep, shallow], x, EXACT, weights=weights, unmatched="transplant", layer_cost="index")
    explicit = fuse([deep, shallow], x, EXACT, weights=weights, unmatched="identity", layer_cost="index")
    assert average.layer_alignment[0] == [0, 2]  # block 1 of the anchor's first segment is unmatched
    anchor = get_adapter(deep).prepare(deep).state_dict()
    keys = [k for k in anchor if k.startswith(f"{CONTAINER[family]}.1.")]
    writers = [k for k in keys if k.endswith(WRITERS[family])]
    assert writers and len(writers) < len(keys)
    for key in keys:
        if key.endswith("num_batches_tracked"):
            continue
        scale = weights[0] if key in writers else 1.0
        assert torch.allclose(average.model.state_dict()[key], scale * anchor[key], atol=1e-6), key
        assert torch.equal(transplant.model.state_dict()[key], anchor[key]), key
    inner = [name for name in explicit.transport_plans[1] if name.startswith(f"{CONTAINER[family]}.1.")]
    assert inner and not any(name in average.transport_plans[1] for name in inner)
    # matched blocks are averaged: not the anchor's
    matched = [k for k in anchor if k.startswith(f"{CONTAINER[family]}.0.") and k.endswith("weight")]
    assert any(not torch.allclose(average.model.state_dict()[k], anchor[k]) for k in matched)


def test_closed_form_resnet_blocks_equal_the_explicit_identity_route_in_a_shared_basis():
    """Where the shallow ResNet is the deep one minus a block, averaging an explicit identity block (a copy of the
    anchor's block with its last BatchNorm zeroed) gives exactly the closed form."""
    deep = build("resnet-basic", 3, seed=1)
    with torch.no_grad():
        deep.layer1[1].bn2.weight.mul_(1e-2)  # a block close to the identity: the alignment picks [0, 2]
        deep.layer1[1].bn2.bias.mul_(1e-2)
    shallow = copy.deepcopy(deep)
    shallow.layer1 = torch.nn.Sequential(shallow.layer1[0], shallow.layer1[2])
    x = images(32)
    explicit = fuse([deep, shallow], x, EXACT, unmatched="identity")
    closed = fuse([deep, shallow], x, EXACT, unmatched="average")
    assert explicit.layer_alignment == closed.layer_alignment and closed.layer_alignment[0] == [0, 2]
    a, b = explicit.model.state_dict(), closed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def test_vgg_has_no_closed_form_of_unmatched_blocks():
    adapter = TimmAdapter()  # VGGs are rebuilt at the new depth, not balanced block by block
    model = adapter.prepare(timm.create_model("vgg11", pretrained=False, num_classes=3, in_chans=1))
    layouts = [list(range(d)) for d in depth(model)]
    assert adapter.unmatched_blocks(model, layouts, adapter.spec(model)) is None


def test_repair_of_a_closed_form_resnet_fusion_measures_the_shallow_parent_at_its_own_depth():
    deep, shallow = build("resnet-basic", 3, seed=1), build("resnet-basic", 2, seed=2)
    x = images(32)
    closed = fuse([deep, shallow], x, EXACT, repair="repair", layer_cost="index")
    explicit = fuse([deep, shallow], x, EXACT, repair="repair", layer_cost="index", unmatched="identity")
    assert closed.config.repair == explicit.config.repair == "repair"
    unrepaired = fuse([deep, shallow], x, EXACT, layer_cost="index").model.state_dict()
    with torch.no_grad():
        out = closed.model(x)
    assert torch.isfinite(out).all()
    state = closed.model.state_dict()
    # the repair corrected the fused block that only the anchor has, and the averaged ones
    assert not torch.allclose(state["layer1.1.bn2.weight"], unrepaired["layer1.1.bn2.weight"])
    assert not torch.allclose(state["layer1.0.bn2.weight"], unrepaired["layer1.0.bn2.weight"])


# --------------------------------------------------------------------------------------------- memory


@pytest.mark.filterwarnings("ignore:balancing='merge':hf_clafusion.errors.ClaFusionWarning")
@pytest.mark.parametrize("family", ["resnet-basic", "vit", "convnext"])
@pytest.mark.parametrize(
    "overrides",
    [{"repair": "bn"}, {"repair": "repair", "unmatched": "identity"}, {"balancing": "merge"}],
    ids=["bn-closed-form", "repair-identity-blocks", "merge"],
)
def test_fuse_never_writes_into_timm_parents_and_shares_no_storage_with_them(family, overrides):
    # prepare, balancing and identity insertion share the parents' tensors instead of deep-copying them
    if family != "resnet-basic" and overrides.get("repair") == "repair":
        overrides = {**overrides, "repair": None}  # REPAIR's points are given for ResNets
    deep, shallow, x = build(family, 3, seed=1), build(family, 1, seed=2), images(32, family=family)
    fuse_leaves_parents_alone(deep, shallow, lambda a, b: fuse([a, b], x, EXACT, **overrides).model)
