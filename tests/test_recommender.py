"""model.recommender: the batched scoring equals the model's own forward, and the ranking
rules (exclusion, candidates, fallback, k) hold. Synthetic models: no training needed."""

import numpy as np
import pytest
import torch

from model.artifact import Artifact, Catalog, save_artifact
from model.recommender import FALLBACK_POPULAR, Query, Recommender, UnknownItemsError
from tests.synthetic_artifacts import NUM_ITEMS, NUM_USERS, make_artifact


@pytest.fixture(scope="module", params=["gmf", "mlp", "neumf"])
def artifact(request):
    return make_artifact(request.param)


def reference_scores(artifact: Artifact, user_index: int) -> np.ndarray:
    """sigmoid(model(user, item)) for every item: the plain forward."""
    items = torch.arange(NUM_ITEMS)
    users = torch.full_like(items, user_index)
    with torch.no_grad():
        return torch.sigmoid(artifact.model(users, items)).numpy()


def index_of(ids: np.ndarray, raw: int) -> int:
    return int(np.flatnonzero(ids == raw)[0])


@pytest.mark.parametrize("chunk", [None, 64], ids=["one-chunk", "many-chunks"])
def test_scores_and_ranking_equal_the_model_forward(artifact, chunk):
    kwargs = {} if chunk is None else {"max_chunk_elements": chunk}
    rec = Recommender(artifact, "cpu", **kwargs)
    catalog = artifact.catalog
    users = catalog.user_ids[:12]
    results = rec.recommend(users, k=NUM_ITEMS, exclude_seen=False)
    for user, result in zip(users, results, strict=True):
        assert result.user_id == user and result.fallback is None
        expected = reference_scores(artifact, index_of(catalog.user_ids, user))
        items = [index_of(catalog.item_ids, i.item_id) for i in result.items]
        scores = np.array([i.score for i in result.items])
        assert sorted(items) == list(range(NUM_ITEMS))  # the whole catalogue, once each
        np.testing.assert_allclose(scores, expected[items], atol=1e-5, rtol=0)
        # Best first, by the forward's own scores (ReLU towers do tie, so not by index).
        assert np.all(np.diff(expected[items]) <= 1e-6)
        assert result.items[0].title == f"Item {result.items[0].item_id}"


def test_seen_items_are_excluded(artifact):
    rec = Recommender(artifact, "cpu", max_chunk_elements=64)
    catalog = artifact.catalog
    shown_seen = 0
    for user, kept, everything in zip(
        catalog.user_ids,
        rec.recommend(catalog.user_ids, k=20),
        rec.recommend(catalog.user_ids, k=20, exclude_seen=False),
        strict=True,
    ):
        u = index_of(catalog.user_ids, user)
        seen = set(catalog.item_ids[catalog.seen(u)].tolist())
        ids = [i.item_id for i in kept.items]
        assert len(ids) == 20 and not seen & set(ids)
        # What remains is the top of the unseen items by the forward's scores.
        expected = reference_scores(artifact, u)
        unseen = np.sort(
            [s for i, s in zip(catalog.item_ids, expected, strict=True) if i not in seen]
        )[::-1]
        np.testing.assert_allclose([i.score for i in kept.items], unseen[:20], atol=1e-5)
        shown_seen += len(seen & {i.item_id for i in everything.items})
    assert shown_seen > 0  # without exclusion the seen items do rank, so the test has teeth


# The default chunk (all items at once), and chunks of ~5 items: the two unseen items are
# the first and the last, so the all-excluded chunks between them must not lose either.
@pytest.mark.parametrize("chunk", [None, 64], ids=["one-chunk", "many-chunks"])
def test_a_user_with_few_unseen_items_gets_fewer_than_k(chunk):
    artifact = make_artifact("neumf")
    catalog = artifact.catalog
    unseen = [0, NUM_ITEMS - 1]
    everything_but_two = np.arange(1, NUM_ITEMS - 1)
    seen = [everything_but_two] + [catalog.seen(u) for u in range(1, NUM_USERS)]
    artifact.catalog = Catalog.from_interactions(
        catalog.user_ids,
        catalog.item_ids,
        np.repeat(np.arange(NUM_USERS), [len(s) for s in seen]),
        np.concatenate(seen),
    )
    rec = Recommender(artifact, "cpu", **({} if chunk is None else {"max_chunk_elements": chunk}))
    [result] = rec.recommend([catalog.user_ids[0]], k=10)
    assert sorted(i.item_id for i in result.items) == sorted(catalog.item_ids[unseen].tolist())
    assert all(i.title is None for i in result.items)  # a catalogue without titles


def test_candidates_are_ranked_alone(artifact):
    rec = Recommender(artifact, "cpu")
    catalog = artifact.catalog
    user = int(catalog.user_ids[3])
    u = index_of(catalog.user_ids, user)
    seen = catalog.item_ids[catalog.seen(u)]
    unseen = [int(i) for i in catalog.item_ids if i not in set(seen)]
    candidates = [int(seen[0]), int(seen[1]), *unseen[:6]]
    expected = reference_scores(artifact, u)

    score_of = {i: expected[index_of(catalog.item_ids, i)] for i in candidates}

    [ranked] = rec.recommend([user], k=4, candidates=candidates, exclude_seen=False)
    assert {i.item_id for i in ranked.items} <= set(candidates)
    np.testing.assert_allclose(
        [i.score for i in ranked.items], sorted(score_of.values())[::-1][:4], atol=1e-5
    )
    np.testing.assert_allclose(
        [i.score for i in ranked.items], [score_of[i.item_id] for i in ranked.items], atol=1e-5
    )
    [unseen_only] = rec.recommend([user], k=10, candidates=candidates)
    assert sorted(i.item_id for i in unseen_only.items) == sorted(unseen[:6])
    assert np.all(np.diff([i.score for i in unseen_only.items]) <= 0)


def test_unknown_candidates_are_refused_before_scoring(artifact):
    rec = Recommender(artifact, "cpu")
    known = int(artifact.catalog.item_ids[0])
    assert rec.unknown_items([known, 4, 2**62, known]) == [4, 2**62]
    with pytest.raises(UnknownItemsError) as error:
        rec.recommend([int(artifact.catalog.user_ids[0])], candidates=[known, 4])
    assert error.value.item_ids == [4]
    assert "4" in str(error.value)


def test_unknown_users_get_popular_items(artifact):
    rec = Recommender(artifact, "cpu")
    catalog = artifact.catalog
    popular = catalog.item_ids[np.argsort(-catalog.item_popularity, kind="stable")]
    known = int(catalog.user_ids[0])
    alone = rec.recommend([known], k=5)[0]
    new, returning, huge = rec.recommend([-1, known, 2**62], k=5)
    for fallback in (new, huge):
        assert fallback.fallback == FALLBACK_POPULAR
        assert [i.item_id for i in fallback.items] == popular[:5].tolist()
        assert all(i.score is None for i in fallback.items)
    assert returning == alone  # a cold user in the batch changes nothing for the others

    candidates = [int(i) for i in popular[[7, 2, 9]]]
    [ranked] = rec.recommend([-1], k=2, candidates=candidates)
    assert [i.item_id for i in ranked.items] == [int(popular[2]), int(popular[7])]


def test_k_bounds(artifact):
    rec = Recommender(artifact, "cpu")
    user = int(artifact.catalog.user_ids[0])
    for bad in (0, -3):
        with pytest.raises(ValueError, match="k must be at least 1"):
            rec.recommend([user], k=bad)
    [everything] = rec.recommend([user], k=10 * NUM_ITEMS, exclude_seen=False)
    assert len(everything.items) == NUM_ITEMS
    [one] = rec.recommend([user], k=1)
    assert len(one.items) == 1


def test_mixed_queries_in_one_call_answer_like_separate_calls(artifact):
    rec = Recommender(artifact, "cpu", max_chunk_elements=256)
    ids = artifact.catalog.user_ids
    items = tuple(int(i) for i in artifact.catalog.item_ids[:25])
    queries = [
        Query(int(ids[0]), k=3),
        Query(int(ids[1]), k=12, exclude_seen=False),
        Query(-5, k=4),
        Query(int(ids[0]), k=5, candidates=items),
        Query(int(ids[2]), k=7, exclude_seen=False, candidates=items[:9]),
        Query(int(ids[1]), k=1),
    ]
    together = rec.recommend_queries(queries)
    for query, answer in zip(queries, together, strict=True):
        [alone] = rec.recommend_queries([query])
        assert answer.fallback == alone.fallback
        if answer.fallback:
            assert answer.items == alone.items
        else:  # scores, not ids: chunking differs with the batch, and tied items may swap
            np.testing.assert_allclose(
                [i.score for i in answer.items], [i.score for i in alone.items], atol=1e-6
            )
    assert [len(a.items) for a in together] == [3, 12, 4, 5, 7, 1]


def test_loads_an_artifact_folder(tmp_path):
    built = make_artifact("neumf")
    save_artifact(tmp_path / "a", built.model, built.catalog, {"name": "neumf"})
    rec = Recommender(tmp_path / "a", "cpu")
    assert rec.version == rec.artifact.metadata["version"] and rec.num_items == NUM_ITEMS
    user = int(built.catalog.user_ids[0])
    loaded = rec.recommend([user], k=5)
    assert loaded == Recommender(built, "cpu").recommend([user], k=5)


def test_a_tower_it_cannot_run_is_refused_at_load():
    built = make_artifact("mlp")
    built.model.mlp_tower = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh())
    with pytest.raises(TypeError, match="Tanh"):
        Recommender(built, "cpu")
