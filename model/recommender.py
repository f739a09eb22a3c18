"""Top-K recommendation over a whole catalogue from a trained artifact, without TorchServe.

Used by the TorchServe handler, the benchmarks and any other server. Scoring B users
against all I items never runs B x I forward calls: the item side of the network is
computed once at load time, and per user batch only

    GMF  p_u . (h_gmf * q_i)               one (B x F) @ (F x I) matrix product, with the
                                           prediction weights folded into the item table
    MLP  h_mlp . tower(relu(W_u p_u + c_i)) one broadcast add of the precomputed item half
                                           c_i = W_i q_i + b of the first layer, then the
                                           (small) rest of the tower, run feature-major

are evaluated, over item chunks that bound memory on big catalogues (and stay in the CPU
caches). The network's own submodules and weights are used throughout, so the scores are
the model's: sigmoid(logit) of `NCF.forward` (tests/test_recommender.py checks it to 1e-5).

    rec = Recommender("artifacts/ml-1m-neumf-pre")
    rec.recommend([42], k=10)                        # top-10 unseen items of user 42
    rec.recommend([42], k=5, candidates=[1, 50, 260]) # rank these items only
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.artifact import Artifact, load_artifact

# Marks recommendations for users the model was not trained on: most popular items.
FALLBACK_POPULAR = "popular"

# Largest intermediate tensor (elements) of one scoring step: 1M float32 = 4 MB, small enough
# for the CPU caches (measured ~25% faster than 16 MB on ml-1m) and to bound memory.
DEFAULT_CHUNK_ELEMENTS = 1 << 20


class UnknownItemsError(ValueError):
    """Candidate item ids that are not in the model's catalogue."""

    def __init__(self, item_ids: Sequence[int]):
        self.item_ids = list(item_ids)
        shown = ", ".join(str(i) for i in self.item_ids[:10])
        more = f" (and {len(self.item_ids) - 10} more)" if len(self.item_ids) > 10 else ""
        super().__init__(f"unknown item ids: {shown}{more}")


@dataclass(frozen=True)
class Query:
    """One user's question. `candidates` (raw item ids) ranks those instead of the catalogue."""

    user_id: int
    k: int = 10
    exclude_seen: bool = True
    candidates: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ScoredItem:
    item_id: int  # raw dataset id
    score: float | None  # sigmoid(logit); None for fallback items, which the model did not score
    title: str | None


@dataclass(frozen=True)
class Recommendation:
    user_id: int
    items: list[ScoredItem]
    fallback: str | None  # None, or FALLBACK_POPULAR for a user unknown to the model


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _IdIndex:
    """Raw dataset id -> model index, by binary search (no Python dict per id: catalogues
    of millions stay a pair of int64 arrays)."""

    def __init__(self, raw_ids: np.ndarray):
        self._order = np.argsort(raw_ids, kind="stable")
        self._sorted = raw_ids[self._order]

    def lookup(self, raw_ids: Sequence[int]) -> np.ndarray:
        """Model indices of `raw_ids`, -1 where unknown."""
        raw = np.asarray(raw_ids, dtype=np.int64).reshape(-1)
        pos = np.minimum(np.searchsorted(self._sorted, raw), len(self._sorted) - 1)
        return np.where(self._sorted[pos] == raw, self._order[pos], -1)


class Recommender:
    def __init__(
        self,
        artifact: Artifact | str | Path,
        device: torch.device | str | None = None,
        max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ):
        """`artifact`: a folder (loaded and verified here) or a loaded Artifact, whose model
        moves to `device` (default: CUDA when available). `max_chunk_elements` bounds the
        largest intermediate tensor of a scoring step."""
        self.device = torch.device(device) if device is not None else default_device()
        if not isinstance(artifact, Artifact):
            artifact = load_artifact(artifact, self.device)
        self.artifact = artifact
        self.model = artifact.model.to(self.device).eval()
        self.catalog = artifact.catalog
        self.max_chunk_elements = max_chunk_elements
        self._users = _IdIndex(self.catalog.user_ids)
        self._items = _IdIndex(self.catalog.item_ids)
        # Ties broken by index so that the fallback list is stable across restarts.
        self._popular = np.argsort(-self.catalog.item_popularity, kind="stable")
        self._precompute_item_side()

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def num_items(self) -> int:
        return len(self.catalog.item_ids)

    @property
    def item_side_bytes(self) -> int:
        """Memory of the precomputed item-side tensors (on top of the model's own weights)."""
        tensors = (self._item_gmf, self._item_mlp_t)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @torch.inference_mode()
    def _precompute_item_side(self):
        model = self.model
        item_gmf, item_mlp = model.item_side(torch.arange(self.num_items, device=self.device))
        # The prediction layer reads [gmf product, tower output] (NCF.combine): split its
        # weights the same way.
        weight = model.predict.weight[0]
        split = model.config.factors if model.use_gmf else 0
        self._bias = model.predict.bias[0]
        # h_gmf . (p_u * q_i) == p_u . (h_gmf * q_i): fold h_gmf into the item table once.
        self._item_gmf = item_gmf * weight[:split] if model.use_gmf else None  # (I, F)
        # W_i q_i + b, the first layer's item half, feature-major (layers[1], I): the MLP
        # runs on (features, pairs) matrices, where its narrow layers make wide products.
        self._item_mlp_t = item_mlp.T.contiguous() if model.use_mlp else None
        self._mlp_out = weight[split:] if model.use_mlp else None  # (layers[-1],)
        self._width = item_mlp.shape[1] if model.use_mlp else 1
        if model.use_mlp:
            for layer in model.mlp_tower:
                if not isinstance(layer, (nn.Linear, nn.ReLU, nn.Dropout)):
                    raise TypeError(f"Recommender cannot run mlp_tower layer {layer}")

    # ------------------------------------------------------------------ public API

    def unknown_items(self, item_ids: Sequence[int]) -> list[int]:
        """The ids of `item_ids` that are not in the catalogue, in their order."""
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        return ids[self._items.lookup(ids) < 0].tolist()

    def recommend(
        self,
        user_ids: Sequence[int],
        k: int = 10,
        exclude_seen: bool = True,
        candidates: Sequence[int] | None = None,
    ) -> list[Recommendation]:
        """Per user (raw id) the top-k items by score, best first.

        exclude_seen drops the user's training items (also from `candidates`); a user may get
        fewer than k items when fewer remain. Users unknown to the model get the most popular
        items (of `candidates`, when given), marked fallback="popular", with score None.
        Raises UnknownItemsError if a candidate id is not in the catalogue.
        """
        cands = None if candidates is None else tuple(candidates)
        return self.recommend_queries([Query(u, k, exclude_seen, cands) for u in user_ids])

    @torch.inference_mode()
    def recommend_queries(self, queries: Sequence[Query]) -> list[Recommendation]:
        """Answer many queries (each with its own k, exclusion and candidates) in one pass:
        the user side is computed once for all of them, catalogue-wide queries share one
        batched scoring of the catalogue, candidate queries one gathered scoring."""
        # Model indices of each distinct candidate list: the users of one request share one.
        candidate_index: dict[tuple[int, ...], np.ndarray] = {}
        for q in queries:
            if q.k < 1:
                raise ValueError(f"k must be at least 1, got {q.k}")
            if q.candidates is not None and q.candidates not in candidate_index:
                index = self._items.lookup(q.candidates)
                if (index < 0).any():
                    raise UnknownItemsError(self.unknown_items(q.candidates))
                candidate_index[q.candidates] = index
        users = self._users.lookup([q.user_id for q in queries])
        known = [n for n, u in enumerate(users) if u >= 0]
        results: list[Recommendation | None] = [None] * len(queries)
        for n, u in enumerate(users):
            if u < 0:
                results[n] = self._popular_fallback(queries[n], candidate_index)
        if known:
            distinct, inverse = np.unique(users[known], return_inverse=True)
            user_gmf, user_mlp = self.model.user_side(torch.as_tensor(distinct, device=self.device))
            row_of = dict(zip(known, inverse.tolist(), strict=True))
            whole = [n for n in known if queries[n].candidates is None]
            listed = [n for n in known if queries[n].candidates is not None]
            if whole:
                self._rank_catalogue(queries, users, whole, row_of, user_gmf, user_mlp, results)
            if listed:
                self._rank_candidates(
                    queries, users, listed, row_of, user_gmf, user_mlp, results, candidate_index
                )
        return results

    # ------------------------------------------------------------------ scoring

    def _catalogue_logits(self, user_gmf, user_mlp, start: int, stop: int) -> torch.Tensor:
        """(B, stop - start) logits of the B users against items [start, stop)."""
        batch, count = len(user_gmf if user_gmf is not None else user_mlp), stop - start
        if self._item_gmf is not None:
            logits = torch.addmm(self._bias, user_gmf, self._item_gmf[start:stop].T)
        else:
            logits = self._bias.expand(batch, count)
        if self._item_mlp_t is not None:
            width = self._item_mlp_t.shape[0]
            # first[f, b, i] = (W_u p_b)[f] + (W_i q_i + b)[f]: every user against every item.
            first = torch.empty(width, batch, count, device=self.device)
            torch.add(self._item_mlp_t[:, None, start:stop], user_mlp.T[:, :, None], out=first)
            logits = logits + self._mlp_logits(first.view(width, -1)).view(batch, count)
        return logits

    def _pair_logits(self, user_gmf, user_mlp, rows: torch.Tensor, items: torch.Tensor):
        """Logits of the aligned (user row, item index) pairs."""
        logits = self._bias.expand(len(rows))
        if self._item_gmf is not None:
            logits = logits + (user_gmf[rows] * self._item_gmf[items]).sum(-1)
        if self._item_mlp_t is not None:
            first = self._item_mlp_t[:, items] + user_mlp.T[:, rows]
            logits = logits + self._mlp_logits(first)
        return logits

    def _mlp_logits(self, first: torch.Tensor) -> torch.Tensor:
        """The MLP branch's share of the logits, from its first layer's pre-activations
        (features, pairs): NCF.combine's relu and mlp_tower with the model's own weights,
        applied to the transposed layout, the activations (ours to overwrite) in place."""
        hidden = first.relu_()
        for layer in self.model.mlp_tower:
            if isinstance(layer, nn.Linear):
                hidden = torch.addmm(layer.bias[:, None], layer.weight, hidden)
            elif isinstance(layer, nn.ReLU):
                hidden = hidden.relu_()
            # nn.Dropout: the identity at inference
        return self._mlp_out @ hidden

    def _rank_catalogue(self, queries, users, positions, row_of, user_gmf, user_mlp, results):
        rows = torch.as_tensor([row_of[n] for n in positions], device=self.device)
        batch_gmf = None if user_gmf is None else user_gmf[rows]
        batch_mlp = None if user_mlp is None else user_mlp[rows]
        num_items, batch = self.num_items, len(positions)
        k = min(max(queries[n].k for n in positions), num_items)
        # The training items of every excluding user, as (batch row, item) coordinates.
        mask_rows, mask_items = [], []
        for b, n in enumerate(positions):
            if queries[n].exclude_seen:
                seen = self.catalog.seen(users[n])
                mask_rows.append(np.full(len(seen), b))
                mask_items.append(seen)
        mask_rows = torch.as_tensor(np.concatenate(mask_rows or [[]]), dtype=torch.long)
        mask_items = torch.as_tensor(np.concatenate(mask_items or [[]]), dtype=torch.long)
        mask_rows, mask_items = mask_rows.to(self.device), mask_items.to(self.device)

        chunk = max(1, self.max_chunk_elements // (batch * self._width))
        best_logits = best_items = None
        for start in range(0, num_items, chunk):
            stop = min(start + chunk, num_items)
            logits = self._catalogue_logits(batch_gmf, batch_mlp, start, stop)
            inside = (mask_items >= start) & (mask_items < stop)
            logits[mask_rows[inside], mask_items[inside] - start] = float("-inf")
            top_logits, top_items = logits.topk(min(k, stop - start), dim=1)
            top_items += start
            if best_logits is not None:  # merge with the best of the earlier chunks
                top_logits = torch.cat([best_logits, top_logits], dim=1)
                top_items = torch.cat([best_items, top_items], dim=1)
                top_logits, keep = top_logits.topk(min(k, top_logits.shape[1]), dim=1)
                top_items = top_items.gather(1, keep)
            best_logits, best_items = top_logits, top_items
        scores = torch.sigmoid(best_logits).cpu().numpy()
        finite = torch.isfinite(best_logits).cpu().numpy()  # -inf: excluded, not a result
        items = best_items.cpu().numpy()
        for b, n in enumerate(positions):
            keep = finite[b, : queries[n].k]
            results[n] = self._recommendation(
                queries[n], items[b, : queries[n].k][keep], scores[b, : queries[n].k][keep]
            )

    def _rank_candidates(
        self, queries, users, positions, row_of, user_gmf, user_mlp, results, candidate_index
    ):
        # All (user, candidate) pairs of all queries in one flat list; spans[n] is query n's.
        pair_rows, pair_items, spans, offset = [], [], [], 0
        for n in positions:
            q = queries[n]
            items = candidate_index[q.candidates]
            if q.exclude_seen:
                items = items[~np.isin(items, self.catalog.seen(users[n]))]
            pair_rows.append(np.full(len(items), row_of[n]))
            pair_items.append(items)
            spans.append((offset, len(items)))
            offset += len(items)
        rows = torch.as_tensor(np.concatenate(pair_rows), dtype=torch.long, device=self.device)
        items = torch.as_tensor(np.concatenate(pair_items), dtype=torch.long, device=self.device)
        chunk = max(1, self.max_chunk_elements // self._width)
        logits = torch.empty(len(rows), device=self.device)
        for s in range(0, len(rows), chunk):
            pairs = slice(s, s + chunk)
            logits[pairs] = self._pair_logits(user_gmf, user_mlp, rows[pairs], items[pairs])
        logits, items = logits.cpu(), items.cpu()
        for n, (offset, count) in zip(positions, spans, strict=True):
            top, order = logits[offset : offset + count].topk(min(queries[n].k, count))
            results[n] = self._recommendation(
                queries[n], items[offset + order].numpy(), torch.sigmoid(top).numpy()
            )

    # ------------------------------------------------------------------ results

    def _popular_fallback(self, q: Query, candidate_index) -> Recommendation:
        if q.candidates is None:
            items = self._popular[: q.k]
        else:
            items = candidate_index[q.candidates]
            items = items[np.argsort(-self.catalog.item_popularity[items], kind="stable")][: q.k]
        return self._recommendation(q, items, None, FALLBACK_POPULAR)

    def _recommendation(self, q: Query, items, scores, fallback=None) -> Recommendation:
        titles = self.catalog.item_titles
        return Recommendation(
            user_id=q.user_id,
            items=[
                ScoredItem(
                    item_id=int(self.catalog.item_ids[i]),
                    score=None if scores is None else float(scores[j]),
                    title=None if titles is None else titles[i],
                )
                for j, i in enumerate(items)
            ],
            fallback=fallback,
        )
