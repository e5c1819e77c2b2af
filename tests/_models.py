"""Tiny models and helpers shared by the tests (hidden widths <= 64)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from hf_clafusion.adapters import get_adapter
from hf_clafusion.core import apply_plan, expand_head_plan


def mlp(in_features: int, hidden: list[int], out_features: int, *, bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h, bias=bias), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out_features, bias=bias))
    return nn.Sequential(*layers)


def cnn(
    channels: list,
    out_features: int = 10,
    *,
    in_channels: int = 1,
    size: int = 8,
    bn: bool = True,
    hidden_fc: list[int] | None = None,
    seed: int = 0,
) -> nn.Sequential:
    """A VGG-style CNN: ``channels`` like [8, 8, "M", 16, "M"], 3x3 convs, then Flatten and Linear layers."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = in_channels
    for item in channels:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            size //= 2
            continue
        layers.append(nn.Conv2d(c, item, 3, padding=1, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm2d(item))
        layers.append(nn.ReLU())
        c = item
    layers.append(nn.Flatten())
    width = c * size * size
    for h in hidden_fc or []:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out_features))
    model = nn.Sequential(*layers)
    randomize_bn(model, seed)
    return model


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers non-trivial statistics and affine parameters (as a trained network has)."""
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(1 + 0.2 * torch.randn(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))


def storage_pointers(model: nn.Module) -> set[int]:
    """The storages behind a model's parameters and buffers."""
    return {t.untyped_storage().data_ptr() for t in model.state_dict().values()}


def fuse_leaves_parents_alone(deep: nn.Module, shallow: nn.Module, fuse_pair) -> nn.Module:
    """Fuse ``deep`` (in eval mode) and ``shallow`` (in train mode: a parent's mode is its own) with
    ``fuse_pair(deep, shallow)``, and check that fusing wrote into neither parent, kept their modes, gave a fused
    model on storage of its own, and that preparing the float32 ``deep`` copies none of its weights."""
    deep.eval()
    shallow.train()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (deep, shallow)]
    fused = fuse_pair(deep, shallow)
    for model, saved in zip((deep, shallow), before):
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert shallow.training and not deep.training
    assert not storage_pointers(fused) & (storage_pointers(deep) | storage_pointers(shallow))
    assert storage_pointers(get_adapter(deep).prepare(deep)) == storage_pointers(deep)
    return fused


def permutation_matrix(perm: torch.Tensor) -> torch.Tensor:
    """The ``(n, n)`` transport plan of a permutation: new neuron ``j`` is old neuron ``perm[j]``."""
    n = perm.numel()
    matrix = torch.zeros(n, n, dtype=torch.float64)
    matrix[perm, torch.arange(n)] = 1.0
    return matrix


def group_permutation(group, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of a spec group's neurons that keeps the function: attention heads move whole, and
    dimensions inside a head move only where the group allows it (``head_dims_free``; not under rotary
    embeddings)."""
    if group.heads <= 1:
        return torch.randperm(group.width, generator=generator)
    dim = group.width // group.heads
    heads = torch.randperm(group.heads, generator=generator)
    return torch.cat(
        [
            h * dim + (torch.randperm(dim, generator=generator) if group.head_dims_free else torch.arange(dim))
            for h in heads.tolist()
        ]
    )


def permuted_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same function with every alignment group of the adapter's spec randomly permuted (any family).

    The spec lists, per group, every parameter axis that indexes the group's neurons (``inner``/``outer`` for
    fused or flattened axes, ``repeat`` for grouped-query attention, where the plan is expanded per query head);
    permuting all of them with one permutation leaves the function unchanged. The result is the adapter's
    prepared copy, in eval mode.
    """
    adapter = get_adapter(model)
    prepared = adapter.prepare(model)
    state = {k: v.clone() for k, v in prepared.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    for group in adapter.spec(prepared).groups:
        matrix = permutation_matrix(group_permutation(group, g))
        for axis in group.axes:
            plan = expand_head_plan(matrix, group.heads, axis.repeat) if axis.repeat > 1 else matrix
            state[axis.param] = apply_plan(state[axis.param], axis.axis, plan, inner=axis.inner, outer=axis.outer)
    out = copy.deepcopy(prepared)
    out.load_state_dict(state)
    return out.eval()


def widened_mlp(model: nn.Sequential, sources: list[list[int]]) -> nn.Sequential:
    """An MLP widened by neuron duplication: hidden layer i gets neurons ``sources[i]`` (indices of old neurons)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    state = []
    in_map = None
    for i, lin in enumerate(linears):
        weight = lin.weight.data.double().clone()
        bias = None if lin.bias is None else lin.bias.data.double().clone()
        if in_map is not None:
            weight = weight @ in_map
        if i < len(sources):
            src = torch.tensor(sources[i])
            out = torch.zeros(lin.out_features, len(src), dtype=torch.float64)
            out[src, torch.arange(len(src))] = 1.0
            counts = torch.bincount(src, minlength=lin.out_features).double()
            weight = out.T @ weight
            bias = None if bias is None else out.T @ bias
            in_map = out / counts[src][None, :]
        state.append((weight, bias))
    layers: list[nn.Module] = []
    for i, (weight, bias) in enumerate(state):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        lin.weight.data.copy_(weight)
        if bias is not None:
            lin.bias.data.copy_(bias)
        layers.append(lin)
        if i < len(state) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def digits_split(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 30,
    lr: float = 0.01,
    seed: int = 0,
    batch_size: int = 64,
) -> nn.Module:
    """A few seconds of Adam on the CPU."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


@torch.no_grad()
def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def cpu_launch_command(script, *args, port: int) -> list[str]:
    """`accelerate launch` of ``script`` on two CPU processes (gloo): --multi_gpu with ACCELERATE_USE_CPU=1."""
    import sys

    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(script),
        *map(str, args),
    ]


def word_tokenizer(words: list[str]):
    """A local word-level tokenizer (``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]``, then ``words``): no download."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
