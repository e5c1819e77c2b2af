"""The low-level, documented math of hf_clafusion: pure functions on tensors.

Nothing here knows about ``nn.Module``s, timm or transformers; shapes are documented per function.
"""

from .averaging import apply_plan, permutation_of, weighted_average
from .depth import (
    absorb_signed_input,
    fit_layernorm_identity,
    fit_post_ln_identity,
    identity_batchnorm,
    identity_weight,
    merge_linear,
    relu_diagonal,
    signed_identity_weight,
)
from .layer_alignment import align_layers, alignment_cost, chain_alignment, random_alignment, relax_constraints
from .repair import (
    ChannelStats,
    affine_correction,
    carry_statistics,
    fold_affine,
    is_identity_batchnorm,
    repair_targets,
)
from .similarity import (
    MinibatchCKA,
    cca_cost_matrix,
    channels_as_features,
    cka_cost_matrix,
    index_cost_matrix,
    linear_cka,
    neuron_count_cost_matrix,
    neuron_distances,
    wasserstein_cost_matrix,
)
from .transport import (
    SOLVERS,
    ActivationStats,
    TransportSolution,
    auto_solver,
    expand_head_plan,
    head_plan,
    plan_maps,
    solve_transport,
    transport_plan,
    weight_distances,
)
from .weight_matching import (
    EXACT_SOLVERS,
    MatchGroup,
    WeightMatching,
    group_similarity,
    weight_matching,
    weight_matching_objective,
)


__all__ = [
    "EXACT_SOLVERS",
    "SOLVERS",
    "ActivationStats",
    "ChannelStats",
    "MatchGroup",
    "MinibatchCKA",
    "TransportSolution",
    "WeightMatching",
    "absorb_signed_input",
    "affine_correction",
    "align_layers",
    "alignment_cost",
    "apply_plan",
    "auto_solver",
    "carry_statistics",
    "cca_cost_matrix",
    "chain_alignment",
    "channels_as_features",
    "cka_cost_matrix",
    "expand_head_plan",
    "fit_layernorm_identity",
    "fit_post_ln_identity",
    "fold_affine",
    "group_similarity",
    "head_plan",
    "identity_batchnorm",
    "identity_weight",
    "index_cost_matrix",
    "is_identity_batchnorm",
    "linear_cka",
    "merge_linear",
    "neuron_count_cost_matrix",
    "neuron_distances",
    "permutation_of",
    "plan_maps",
    "random_alignment",
    "relax_constraints",
    "relu_diagonal",
    "repair_targets",
    "signed_identity_weight",
    "solve_transport",
    "transport_plan",
    "wasserstein_cost_matrix",
    "weight_distances",
    "weight_matching",
    "weight_matching_objective",
    "weighted_average",
]
