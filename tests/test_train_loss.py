import torch

from model.ncf import NCF, ModelConfig
from training.train import embedding_penalty


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
