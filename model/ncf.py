"""Neural Collaborative Filtering (He et al., WWW'17): GMF, MLP and NeuMF in one module.

One definition shared by training, evaluation and serving. `kind` picks the branches:
  gmf   : logit = h . (p_u * q_i)                                  (generalised MF)
  mlp   : logit = h . tower([p_u, q_i])                            (halving ReLU tower)
  neumf : logit = h . [p_u * q_i, tower([p_u', q_i'])]             (both, separate embeddings)

The first tower layer is linear in the concatenated embeddings, W [p; q] = W_u p + W_i q,
so it is computed once per distinct user and item and then gathered: cheaper in training
and what lets serving score a whole catalogue with one add instead of B x I products.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

KINDS = ("gmf", "mlp", "neumf")


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; stored in the artifact's metadata."""

    kind: str
    num_users: int
    num_items: int
    factors: int = 8  # GMF embedding size = predictive factors
    layers: list[int] = field(default_factory=lambda: [64, 32, 16, 8])  # MLP tower sizes
    dropout: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"unknown model kind {self.kind!r}; expected one of {', '.join(KINDS)}"
            )
        if self.num_users < 1 or self.num_items < 1:
            raise ValueError("a model needs at least one user and one item")
        if self.kind != "gmf":
            if len(self.layers) < 2 or self.layers[0] % 2 or min(self.layers) < 1:
                raise ValueError(
                    f"MLP layers {self.layers} must have >= 2 positive sizes, the first even "
                    "(it is the user and item embeddings concatenated)"
                )
        self.layers = [int(x) for x in self.layers]

    def to_dict(self) -> dict:
        return asdict(self)


class NCF(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.use_gmf = c.kind in ("gmf", "neumf")
        self.use_mlp = c.kind in ("mlp", "neumf")
        predict_size = 0
        if self.use_gmf:
            self.gmf_user = nn.Embedding(c.num_users, c.factors)
            self.gmf_item = nn.Embedding(c.num_items, c.factors)
            predict_size += c.factors
        if self.use_mlp:
            half = c.layers[0] // 2
            self.mlp_user = nn.Embedding(c.num_users, half)
            self.mlp_item = nn.Embedding(c.num_items, half)
            # First layer as two halves (user, item) sharing one bias; equals Linear(layers[0]).
            self.mlp_first_user = nn.Linear(half, c.layers[1], bias=False)
            self.mlp_first_item = nn.Linear(half, c.layers[1])
            tower: list[nn.Module] = []
            for size_in, size_out in zip(c.layers[1:-1], c.layers[2:], strict=True):
                if c.dropout:
                    tower.append(nn.Dropout(c.dropout))
                tower += [nn.Linear(size_in, size_out), nn.ReLU()]
            self.mlp_tower = nn.Sequential(*tower)
            predict_size += c.layers[-1]
        self.predict = nn.Linear(predict_size, 1)
        self.reset_parameters()

    def reset_parameters(self):
        # Initialisation of the paper's code: N(0, 0.01) embeddings, Glorot-uniform layers,
        # LeCun-uniform prediction layer.
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.01)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.kaiming_uniform_(self.predict.weight, a=1, nonlinearity="sigmoid")
        nn.init.zeros_(self.predict.bias)

    # The model is factored into a user side, an item side and a pairwise combination, so
    # that serving can precompute the item side once for the whole catalogue.
    def user_side(self, users: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gmf = self.gmf_user(users) if self.use_gmf else None
        mlp = self.mlp_first_user(self.mlp_user(users)) if self.use_mlp else None
        return gmf, mlp

    def item_side(self, items: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gmf = self.gmf_item(items) if self.use_gmf else None
        mlp = self.mlp_first_item(self.mlp_item(items)) if self.use_mlp else None
        return gmf, mlp

    def combine(self, user_gmf, user_mlp, item_gmf, item_mlp) -> torch.Tensor:
        """Logits for aligned (user, item) rows; arguments broadcast like tensors do."""
        parts = []
        if self.use_gmf:
            parts.append(user_gmf * item_gmf)
        if self.use_mlp:
            parts.append(self.mlp_tower(torch.relu(user_mlp + item_mlp)))
        if len(parts) == 1:
            return self.predict(parts[0]).squeeze(-1)
        # Broadcast the leading (pair) dimensions only: the feature sizes of the branches differ.
        leading = torch.broadcast_shapes(*(part.shape[:-1] for part in parts))
        features = torch.cat([part.expand(*leading, part.shape[-1]) for part in parts], -1)
        return self.predict(features).squeeze(-1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits (apply sigmoid for a probability) for each (users[n], items[n])."""
        unique_users, user_index = torch.unique(users, return_inverse=True)
        unique_items, item_index = torch.unique(items, return_inverse=True)
        user_gmf, user_mlp = self.user_side(unique_users)
        item_gmf, item_mlp = self.item_side(unique_items)

        # F.embedding as the gather: its backward is far faster on CPU than index_put's.
        def gather(rows, index):
            return None if rows is None else F.embedding(index, rows)

        return self.combine(
            gather(user_gmf, user_index),
            gather(user_mlp, user_index),
            gather(item_gmf, item_index),
            gather(item_mlp, item_index),
        )


def build_model(config: ModelConfig) -> NCF:
    return NCF(config)


def neumf_from_pretrained(gmf: NCF, mlp: NCF, alpha: float = 0.5) -> NCF:
    """NeuMF initialised from a trained GMF and MLP (the paper's pre-training, section 3.4.1).

    Embeddings and tower are copied; the prediction layer is [alpha*h_gmf, (1-alpha)*h_mlp]
    with the biases combined alike, so the first logits are alpha*gmf + (1-alpha)*mlp.
    """
    g, m = gmf.config, mlp.config
    if g.kind != "gmf" or m.kind != "mlp":
        raise ValueError(f"pre-training needs a gmf and an mlp model, got {g.kind} and {m.kind}")
    if (g.num_users, g.num_items) != (m.num_users, m.num_items):
        raise ValueError(
            f"gmf ({g.num_users} users, {g.num_items} items) and mlp ({m.num_users} users, "
            f"{m.num_items} items) were trained on different data"
        )
    config = ModelConfig("neumf", g.num_users, g.num_items, g.factors, list(m.layers), m.dropout)
    neumf = NCF(config)
    state = {k: v for k, v in gmf.state_dict().items() if k.startswith("gmf_")}
    state |= {k: v for k, v in mlp.state_dict().items() if k.startswith("mlp_")}
    state["predict.weight"] = torch.cat(
        [alpha * gmf.predict.weight, (1 - alpha) * mlp.predict.weight], dim=1
    )
    state["predict.bias"] = alpha * gmf.predict.bias + (1 - alpha) * mlp.predict.bias
    neumf.load_state_dict(state)
    return neumf
