import pytest
import torch

from model.ncf import NCF, ModelConfig, neumf_from_pretrained

USERS, ITEMS = 30, 40


def make(kind, factors=8, layers=(64, 32, 16, 8), seed=0):
    torch.manual_seed(seed)
    return NCF(ModelConfig(kind, USERS, ITEMS, factors, list(layers)))


def pairs(n=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(USERS, (n,), generator=g), torch.randint(ITEMS, (n,), generator=g)


def reference_logits(model: NCF, users, items):
    """The paper's formulation, written out: concatenated embeddings through a full Linear."""
    parts = []
    if model.use_gmf:
        parts.append(model.gmf_user(users) * model.gmf_item(items))
    if model.use_mlp:
        first = torch.cat([model.mlp_first_user.weight, model.mlp_first_item.weight], dim=1)
        x = torch.cat([model.mlp_user(users), model.mlp_item(items)], dim=1)
        parts.append(model.mlp_tower(torch.relu(x @ first.T + model.mlp_first_item.bias)))
    return model.predict(torch.cat(parts, dim=1)).squeeze(1)


@pytest.mark.parametrize(
    "kind,factors,layers",
    [
        ("gmf", 8, (64, 32, 16, 8)),
        ("mlp", 8, (64, 32, 16, 8)),
        ("neumf", 8, (64, 32, 16, 8)),
        ("neumf", 64, (32, 16)),
    ],
)
def test_forward_equals_the_concatenated_formulation(kind, factors, layers):
    model = make(kind, factors, layers)
    users, items = pairs()
    logits = model(users, items)
    assert logits.shape == (200,)
    torch.testing.assert_close(logits, reference_logits(model, users, items), atol=1e-6, rtol=1e-5)
    # combine broadcasts: one user against many items, as serving scores a catalogue
    user_side, item_side = model.user_side(users[:1]), model.item_side(items)
    one_user = model.combine(*(None if t is None else t[:, None] for t in user_side), *item_side)
    torch.testing.assert_close(
        one_user[0], model(users[:1].expand_as(items), items), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize(
    "kind,names",
    [
        ("gmf", {"gmf_user", "gmf_item"}),
        ("mlp", {"mlp_user", "mlp_item", "mlp_first_user", "mlp_first_item", "mlp_tower"}),
        ("neumf", {"gmf_user", "mlp_user", "mlp_tower"}),
    ],
)
def test_branches_and_sizes(kind, names):
    model = make(kind, factors=16, layers=(128, 64, 32, 16))
    children = {name for name, _ in model.named_children()}
    assert names <= children
    if model.use_gmf:
        assert model.gmf_user.weight.shape == (USERS, 16)
    if model.use_mlp:
        assert model.mlp_user.weight.shape == (USERS, 64)  # half of the first layer
        linears = [m for m in model.mlp_tower if isinstance(m, torch.nn.Linear)]
        assert [lin.out_features for lin in linears] == [32, 16]  # the halving tower
    expected = {"gmf": 16, "mlp": 16, "neumf": 32}[kind]
    assert model.predict.in_features == expected and model.predict.out_features == 1


def test_gradients_reach_every_parameter():
    model = make("neumf")
    users, items = pairs()
    model(users, items).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pretrained_neumf_starts_as_the_alpha_combination():
    gmf, mlp = make("gmf", factors=16, seed=1), make("mlp", seed=2)
    users, items = pairs()
    for alpha in (0.5, 0.3):
        neumf = neumf_from_pretrained(gmf, mlp, alpha=alpha)
        expected = alpha * gmf(users, items) + (1 - alpha) * mlp(users, items)
        torch.testing.assert_close(neumf(users, items), expected, atol=1e-6, rtol=1e-5)
    # The parts' embeddings are copied, not shared.
    neumf.gmf_user.weight.data.zero_()
    assert gmf.gmf_user.weight.abs().sum() > 0


def test_pretraining_refuses_mismatched_parts():
    with pytest.raises(ValueError, match="gmf and an mlp"):
        neumf_from_pretrained(make("mlp"), make("mlp"))
    other = NCF(ModelConfig("mlp", USERS + 1, ITEMS))
    with pytest.raises(ValueError, match="different data"):
        neumf_from_pretrained(make("gmf"), other)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kind": "svd"}, "unknown model kind"),
        ({"layers": [63, 32]}, "the first even"),
        ({"layers": [64]}, ">= 2"),
        ({"num_users": 0}, "at least one user"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    args = {"kind": "neumf", "num_users": 5, "num_items": 5} | kwargs
    with pytest.raises(ValueError, match=message):
        ModelConfig(**args)
