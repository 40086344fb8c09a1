"""Exact kNN search for low-dimensional rows (e.g. 7-D states) with a k-d tree.

The torch search scores every pair (N^2 D work); a k-d tree finds each row's nearest
candidates in about N log N. Inner-product order becomes Euclidean order exactly by one
extra column: y -> (y, sqrt(M^2 - |y|^2)) with M = max |y|, queried as (x, 0), so that
|q - y'|^2 = |x|^2 + M^2 - 2 x.y for every y (no unit norms needed).

Candidates are scored again in the input dtype (like the torch backend, up to the last
bits of a float32 sum) and ordered by its rule (value descending, lower index first). A
row's list is kept only when every sample outside its candidates provably scores below
its k-th value: the tree's farthest candidate bounds their true inner products, and
float32 rounding moves a value by at most `product_error`. Other rows query more
candidates, and past MAX_CANDIDATES are searched against all rows by brute force. So the
lists are exact top-k lists, ties included, and `tie_graph` builds the same graph from
them as from the torch lists.

Above MAX_DIM columns a tree stops paying (most of it is visited), so wider inputs are
searched by the torch backend (`knn` decides): `--knn_backend tree` can serve features and
states alike.
"""
from __future__ import annotations

import numpy as np
import torch

from harness.cknna.neighbours import Neighbours, _block_topk, _order_ties, product_error

MAX_DIM = 16
MARGIN = 8  # candidates beyond k, so a close (k+1)-th rarely forces a second query
MAX_CANDIDATES = 1024
CHUNK_ROWS = 1 << 16  # query rows per tree call: bounds the (rows, candidates, D) gather
BRUTE_ELEMENTS = 1 << 24  # float32 similarities per brute-force chunk (64 MB)
# Float64 rounding of the tree's distances, relative to |x|^2 + M^2: far below float32's.
DISTANCE_RTOL = 1e-9


def _tree(data64: np.ndarray):
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        raise ImportError("the tree kNN backend needs scipy: pip install 'harness[lowdim]'") from None
    sq = (data64 ** 2).sum(1)
    m2 = sq.max()
    lifted = np.concatenate([data64, np.sqrt(np.maximum(m2 - sq, 0.0))[:, None]], axis=1)
    return cKDTree(lifted, leafsize=32, balanced_tree=False, compact_nodes=False), sq, m2


def search_tree(x: torch.Tensor, k: int, groups: torch.Tensor | None = None) -> Neighbours:
    """knn(x, k) by a k-d tree: the same exact lists as the torch backend (ties to the
    lower index, self and same-group rows excluded, -inf padding where too few remain)."""
    if x.shape[1] > MAX_DIM:
        raise ValueError(f"x: {x.shape[1]} columns; the tree search is for <= {MAX_DIM}")
    if not torch.isfinite(x).all():
        raise ValueError("x: the tree kNN backend needs finite values")
    n = x.shape[0]
    data = x.detach().cpu()
    data64 = data.double().numpy()
    workers = max(1, torch.get_num_threads())
    tree, sq, m2 = _tree(data64)
    groups = groups.cpu() if groups is not None else None
    # Largest float32 error of a listed value, and of the tree's bound, per row.
    slack = torch.from_numpy(product_error(data) * np.sqrt(sq * m2) + DISTANCE_RTOL * (sq + m2))
    out_v = torch.empty(n, k, dtype=data.dtype)
    out_i = torch.empty(n, k, dtype=torch.long)
    lift = np.zeros((min(n, CHUNK_ROWS), 1))
    todo = []
    for s in range(0, n, CHUNK_ROWS):
        rows = torch.arange(s, min(n, s + CHUNK_ROWS))
        count = min(n, k + 1 + MARGIN)
        while len(rows):
            queries = np.concatenate([data64[rows.numpy()], lift[:len(rows)]], axis=1)
            dist, idx = tree.query(queries, count, workers=workers)
            idx = torch.from_numpy(idx.reshape(len(rows), count))
            values, indices = _score(data, rows, idx, k, groups)
            if count == n:  # every sample was a candidate
                ok = torch.ones(len(rows), dtype=torch.bool)
            else:
                # Largest true inner product of a sample outside the candidates.
                far = torch.from_numpy(dist.reshape(len(rows), count)[:, -1])
                bound = (torch.from_numpy(sq)[rows] + m2 - far ** 2) / 2
                ok = bound + slack[rows] < values[:, -1].double()
            out_v[rows[ok]], out_i[rows[ok]] = values[ok], indices[ok]
            rows = rows[~ok]
            if count == n or count >= MAX_CANDIDATES:
                todo.append(rows)
                break
            count = min(n, 4 * count, MAX_CANDIDATES)
    todo = torch.cat(todo) if todo else torch.zeros(0, dtype=torch.long)
    chunk = max(1, BRUTE_ELEMENTS // n)
    for s in range(0, len(todo), chunk):  # heavy ties or many same-group neighbours
        rows = todo[s:s + chunk]
        out_v[rows], out_i[rows] = _brute(data, rows, k, groups)
    return Neighbours(out_i.to(x.device), out_v.to(x.device))


def _brute(data, rows, k, groups):
    """Rows against every row, as the torch backend scores them."""
    gram = data[rows] @ data.T
    gram[torch.arange(len(rows)), rows] = float("-inf")
    if groups is not None:
        gram.masked_fill_(groups[rows].unsqueeze(1) == groups.unsqueeze(0), float("-inf"))
    return _block_topk(gram, k)


def _score(data, rows, idx, k, groups):
    """The k best candidates of each row by inner product, under the torch tie rule."""
    values = torch.bmm(data[idx], data[rows].unsqueeze(2)).squeeze(2)
    values[idx == rows.unsqueeze(1)] = float("-inf")
    if groups is not None:
        values[groups[idx] == groups[rows].unsqueeze(1)] = float("-inf")
    values, indices = _order_ties(values, idx)
    return values[:, :k], indices[:, :k]
