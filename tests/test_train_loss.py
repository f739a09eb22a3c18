import torch

from model.ncf import NCF, ModelConfig
from training.train import embedding_penalty, make_optimizer


def test_embedding_penalty_is_the_mean_squared_norm_of_each_samples_rows():
    torch.manual_seed(0)
    model = NCF(ModelConfig("neumf", 30, 40, factors=4, layers=[8, 4]))
    users, items = torch.randint(0, 30, (200,)), torch.randint(0, 40, (200,))  # repeats
    per_sample = sum(
        table(index).pow(2).sum(-1).mean()
        for table, index in (
            (model.gmf_user, users),
            (model.gmf_item, items),
            (model.mlp_user, users),
            (model.mlp_item, items),
        )
    )
    expected = torch.autograd.grad(per_sample, list(model.parameters()), allow_unused=True)
    penalty = embedding_penalty(model, users, items)
    got = torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(penalty, per_sample)
    for g, e in zip(got, expected, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e)


def test_weight_decay_shrinks_the_layers_weights_only():
    torch.manual_seed(0)
    model = NCF(ModelConfig("neumf", 30, 40, factors=4, layers=[8, 4, 2]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, "adam", lr=0.1, weight_decay=0.5)
    # A zero loss: Adam's own step is zero, so whatever changes is the decay alone.
    (0 * model(torch.arange(5), torch.arange(5)).sum()).backward()
    optimizer.step()
    linear_weights = {
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert linear_weights >= {"predict.weight", "mlp_first_user.weight", "mlp_tower.0.weight"}
    for key, value in model.state_dict().items():
        expected = before[key] * (1 - 0.1 * 0.5) if key in linear_weights else before[key]
        torch.testing.assert_close(value, expected, msg=key)


def test_without_weight_decay_the_step_is_adams():
    torch.manual_seed(0)
    model = NCF(ModelConfig("neumf", 30, 40, factors=4, layers=[8, 4]))
    twin = NCF(ModelConfig("neumf", 30, 40, factors=4, layers=[8, 4]))
    twin.load_state_dict(model.state_dict())
    users, items = torch.randint(0, 30, (64,)), torch.randint(0, 40, (64,))
    for net, optimizer in (
        (model, make_optimizer(model, "adam", lr=0.01, weight_decay=0.0)),
        (twin, torch.optim.Adam(twin.parameters(), lr=0.01)),
    ):
        for _ in range(3):
            optimizer.zero_grad()
            net(users, items).pow(2).mean().backward()
            optimizer.step()
    twin_state = twin.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, twin_state[key], msg=key)
