"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) of query-gallery distances: vectorised on torch
tensors in chunks of rows for use, beside a plain per-row numpy reference that the tests hold it to.

The definition both implement (the paper's, as its published code computes it). With N = Q + G
rows (queries first) and the distances of every pair,
- original distance: d(i, j)^2 divided by the largest d(i, .)^2 of row i (so every row lies in
  [0, 1]), d being [[q_q, q_g], [q_g^T, g_g]]; ranking(i) = the rows ordered by it, ties by row
  number (a stable sort; the published code's quicksort leaves the order of ties unspecified);
- N(i, k): the first k + 1 of ranking(i) (i itself is usually the first);
  R(i, k) = {j in N(i, k) : i in N(j, k)}, the k-reciprocal neighbours;
- R*(i) = R(i, k1) together with R(c, h) of every c in R(i, k1) for which
  |R(c, h) & R(i, k1)| > 2/3 |R(c, h)|, where h = round(k1 / 2) (half to even, as numpy's around);
  the published code tests '>' where the paper writes '>=';
- V(i): exp(-original(i, j)) on j in R*(i), 0 elsewhere, divided by its sum;
- local query expansion (k2 > 1): V(i) replaced by the mean of V over the first k2 of ranking(i);
- Jaccard distance: 1 - t / (2 - t) with t = sum_j min(V(q, j), V(g, j)) (rows of V sum to 1, so
  2 - t is the sum of the maxima);
- final(q, g) = (1 - lambda) * Jaccard(q, g) + lambda * original(q, g).
The query set's own neighbours take part (the standard use): R and V run over queries and gallery
together, so a query's re-ranked distances depend on the other queries."""
import numbers

import numpy as np
import torch

K1, K2, LAMBDA = 20, 6, 0.3  # the paper's parameters

# Rows are processed in chunks so that each chunk's [rows, Q + G] intermediates hold about this
# many elements, and the Jaccard step joins about this many (query, gallery) pairs at a time.
CHUNK_ELEMENTS = 1 << 22


def check_rerank_params(k1, k2, lambda_value):
    """Raise ValueError unless k1 and k2 are positive integers and lambda lies in [0, 1]."""
    for name, value in (('k1', k1), ('k2', k2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}.')
    if not (isinstance(lambda_value, numbers.Real) and 0 <= lambda_value <= 1):
        raise ValueError(f'lambda must be a number in [0, 1], got {lambda_value!r}.')


def distances_from_similarity(q_g_sim, q_q_sim, g_g_sim):
    """Euclidean distances (q_g, q_q, g_g) in the space whose inner product gives the similarities:
    sqrt(max(0, s(i, i) + s(j, j) - 2 s(i, j))), with s(i, i) read off the diagonals of q_q_sim
    and g_g_sim, so that every row's distance to itself is exactly 0. For DEEN's fused
    similarity (pooled and BNNeck inner products summed with positive weights) this is the
    Euclidean distance of the features scaled by the square roots of the weights."""
    q_self, g_self = torch.diagonal(q_q_sim), torch.diagonal(g_g_sim)

    def distance(sim, row_self, column_self):
        return (row_self[:, None] + column_self[None, :] - 2 * sim).clamp_min(0).sqrt()

    return (distance(q_g_sim, q_self, g_self), distance(q_q_sim, q_self, q_self),
            distance(g_g_sim, g_self, g_self))


# ----------------------------------------------------------------------------------------------
# Vectorised implementation

def k_reciprocal_rerank(q_g_dist, q_q_dist, g_g_dist, k1=K1, k2=K2, lambda_value=LAMBDA,
                        chunk_elements=CHUNK_ELEMENTS):
    """Re-ranked [Q, G] distances (float32, on the inputs' device) from the distances query-gallery
    [Q, G], query-query [Q, Q] and gallery-gallery [G, G] (numpy or torch; what the published
    re_ranking takes: distances, squared inside). Memory beyond the inputs and the result: a few
    intermediates of about chunk_elements elements, and the sparse vectors V (at most
    (k1 + 1) * (round(k1 / 2) + 2) entries per row, k2 times that after query expansion)."""
    check_rerank_params(k1, k2, lambda_value)
    original = _OriginalDistance(q_g_dist, q_q_dist, g_g_dist)
    ranking = _nearest_rows(original, min(max(k1 + 1, k2), original.n), chunk_elements)
    columns, values = _reciprocal_vectors(original, ranking, k1, chunk_elements)
    if k2 > 1:
        entries = _expanded_vectors(columns, values, ranking[:, :k2], chunk_elements)
    else:
        used = columns < original.n
        entries = (used.nonzero()[:, 0], columns[used], values[used])
    final = _overlaps(entries, original.num_q, original.n, chunk_elements)
    for chunk in _chunks(original.num_q, original.n, chunk_elements):  # overlap -> final in place
        overlap = final[chunk]
        jaccard = 1 - overlap / (2 - overlap)
        final[chunk] = jaccard * (1 - lambda_value) + original.to_gallery(chunk) * lambda_value
    return final


def _chunks(num_rows, row_elements, chunk_elements):
    """Slices of consecutive rows holding about chunk_elements elements of row_elements each."""
    step = max(1, chunk_elements // max(1, row_elements))
    return [slice(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


class _OriginalDistance:
    """The [N, N] original distance, computed on demand from the three input blocks: whole rows
    (which also record each row's largest squared distance), single entries, the query rows'
    gallery part."""

    def __init__(self, q_g_dist, q_q_dist, g_g_dist):
        self.q_g = torch.as_tensor(q_g_dist)
        self.device = self.q_g.device
        self.q_q = torch.as_tensor(q_q_dist, device=self.device)
        self.g_g = torch.as_tensor(g_g_dist, device=self.device)
        self.num_q, num_g = self.q_g.shape
        if self.num_q == 0 or num_g == 0:
            raise ValueError(f'cannot re-rank a {self.num_q} x {num_g} distance matrix.')
        if self.q_q.shape != (self.num_q, self.num_q) or self.g_g.shape != (num_g, num_g):
            raise ValueError(f'expected query-query {self.num_q} x {self.num_q} and '
                             f'gallery-gallery {num_g} x {num_g} distances, got '
                             f'{tuple(self.q_q.shape)} and {tuple(self.g_g.shape)}.')
        self.n = self.num_q + num_g
        self.largest = torch.empty(self.n, 1, dtype=torch.float32, device=self.device)

    def rows(self, chunk):
        """Rows of a slice, float32 [rows, N]; records their largest squared distances."""
        q = self.num_q
        block = torch.empty(chunk.stop - chunk.start, self.n, dtype=torch.float32,
                            device=self.device)
        queries = max(0, min(chunk.stop, q) - chunk.start)
        if queries:
            block[:queries, :q] = self.q_q[chunk.start:chunk.start + queries]
            block[:queries, q:] = self.q_g[chunk.start:chunk.start + queries]
        if queries < len(block):
            gallery = slice(chunk.start + queries - q, chunk.stop - q)
            block[queries:, :q] = self.q_g[:, gallery].contiguous().T  # faster than strided
            block[queries:, q:] = self.g_g[gallery]
        block.mul_(block)
        largest = block.amax(1, keepdim=True)
        if not bool(torch.isfinite(largest).all()):  # a NaN or an infinity anywhere in the rows
            raise ValueError('the distances to re-rank must be finite.')
        self.largest[chunk] = largest.clamp_min(torch.finfo(torch.float32).tiny)
        return block.div_(self.largest[chunk])

    def entries(self, chunk, columns):
        """original(i, j) for the rows i of a slice (recorded by rows()) and columns [rows, M]."""
        q = self.num_q
        row = torch.arange(chunk.start, chunk.stop, device=self.device)[:, None].expand_as(columns)
        column = columns.clamp(max=self.n - 1)
        row_q, column_q = row.clamp(max=q - 1), column.clamp(max=q - 1)
        row_g, column_g = (row - q).clamp(min=0), (column - q).clamp(min=0)
        distance = torch.where(
            row < q,
            torch.where(column < q, self.q_q[row_q, column_q], self.q_g[row_q, column_g]),
            torch.where(column < q, self.q_g[column_q, row_g], self.g_g[row_g, column_g])).float()
        return distance * distance / self.largest[chunk]

    def to_gallery(self, chunk):
        """original(q, g) of a slice of query rows (recorded by rows()), float32 [rows, G]."""
        distance = self.q_g[chunk].float()
        return distance * distance / self.largest[chunk]


def _nearest_rows(original, count, chunk_elements):
    """[N, count] row numbers of each row's count nearest, as a stable argsort orders them."""
    ranking = torch.empty(original.n, count, dtype=torch.long, device=original.device)
    for chunk in _chunks(original.n, original.n, chunk_elements):
        ranking[chunk] = _stable_smallest(original.rows(chunk), count)
    return ranking


def _stable_smallest(block, count):
    """Column numbers of the count smallest entries of each row, ordered by value and then by
    column (topk alone may pick any of the entries tied at the boundary, in any order)."""
    values, columns = block.topk(min(count + 1, block.shape[1]), dim=1, largest=False)
    columns = columns[:, :count]
    if values.shape[1] > count:  # rows whose (count + 1)-th value ties with the count-th
        crowded = (values[:, count] == values[:, count - 1]).nonzero()[:, 0]
        if len(crowded):  # there take the boundary entries with the lowest column numbers
            rows, boundary = block[crowded], values[crowded, count - 1:count]
            below, at = rows < boundary, rows == boundary
            room = count - below.sum(1, keepdim=True)
            taken = below | (at & (at.cumsum(1) <= room))
            columns[crowded] = taken.nonzero()[:, 1].view(len(crowded), count)
    columns = columns.sort(dim=1).values
    order = block.gather(1, columns).sort(dim=1, stable=True).indices
    return columns.gather(1, order)


def _reciprocal_mask(ranking, k, chunk_elements):
    """[N, K] for K = min(k + 1, N): whether each entry of N(i, k) (the first K of the ranking)
    has i among its own first K, i.e. belongs to R(i, k)."""
    nearest = ranking[:, :k + 1]
    width = nearest.shape[1]
    mask = torch.empty(nearest.shape, dtype=torch.bool, device=ranking.device)
    for chunk in _chunks(len(ranking), width * width, chunk_elements):
        own = torch.arange(chunk.start, chunk.stop, device=ranking.device)[:, None, None]
        mask[chunk] = (nearest[nearest[chunk]] == own).any(-1)
    return mask


def _reciprocal_vectors(original, ranking, k1, chunk_elements):
    """The Gaussian-weighted vectors V as padded rows: (columns [N, M], sorted, N where unused;
    values [N, M] float32, 0 where unused)."""
    half = round(k1 / 2)
    nearest, reciprocal = ranking[:, :k1 + 1], _reciprocal_mask(ranking, k1, chunk_elements)
    half_nearest = ranking[:, :half + 1]
    half_reciprocal = _reciprocal_mask(ranking, half, chunk_elements)
    pieces = []
    row_elements = max(original.n, nearest.shape[1] * half_nearest.shape[1])
    for chunk in _chunks(original.n, row_elements, chunk_elements):
        members = _expanded_set(nearest[chunk], reciprocal[chunk], half_nearest, half_reciprocal,
                                original.n)
        weights = torch.exp(-original.entries(chunk, members)).masked_fill(members == original.n, 0)
        total = weights.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        pieces.append((members, weights / total))          # an empty R*(i) leaves V(i) = 0
    width = max(int((members < original.n).sum(1).max()) for members, _ in pieces)
    return (torch.cat([members[:, :width] for members, _ in pieces]),
            torch.cat([values[:, :width] for _, values in pieces]))


def _expanded_set(candidates, reciprocal, half_nearest, half_reciprocal, n):
    """R*(i) of a chunk of rows as sorted padded rows of row numbers (n where unused), from the
    chunk's N(i, k1) with its R(i, k1) membership, and every row's N(c, h) with R(c, h)
    membership."""
    rows = len(candidates)
    halves = half_nearest[candidates]                               # [rows, K, H] N(c, h)
    in_half = half_reciprocal[candidates]                           # [rows, K, H] in R(c, h)
    own = torch.zeros(rows, n + 1, dtype=torch.bool, device=candidates.device)
    own.scatter_(1, candidates.masked_fill(~reciprocal, n), True)   # R(i, k1) as a row mask
    in_own = own.gather(1, halves.flatten(1)).view(halves.shape)    # [rows, K, H] in R(i, k1)
    overlap, size = (in_half & in_own).sum(-1), in_half.sum(-1)
    accepted = reciprocal & (3 * overlap > 2 * size)                # [rows, K]
    members = torch.cat([candidates.masked_fill(~reciprocal, n),
                         halves.masked_fill(~(accepted[..., None] & in_half), n).flatten(1)], 1)
    members = members.sort(dim=1).values
    repeated = torch.zeros_like(members, dtype=torch.bool)
    repeated[:, 1:] = members[:, 1:] == members[:, :-1]
    return members.masked_fill(repeated, n).sort(dim=1).values


def _expanded_vectors(columns, values, neighbours, chunk_elements):
    """Local query expansion: (rows, columns, values) of the nonzero entries of the mean of V over
    each row's first k2 neighbours, row-major (the entries of each column summed in neighbour
    order)."""
    n = len(columns)
    entries = []
    for chunk in _chunks(n, neighbours.shape[1] * columns.shape[1], chunk_elements):
        nearest = neighbours[chunk]                                 # [rows, k2]
        column, order = columns[nearest].flatten(1).sort(dim=1, stable=True)
        value = values[nearest].flatten(1).gather(1, order)
        starts = torch.ones_like(column, dtype=torch.bool)
        starts[:, 1:] = column[:, 1:] != column[:, :-1]
        slot = starts.cumsum(1) - 1                                 # each column's place
        summed = torch.zeros_like(value).scatter_add_(1, slot, value)
        slot_column = torch.full_like(column, n).scatter_(1, slot, column)
        row, place = (slot_column < n).nonzero(as_tuple=True)
        entries.append((row + chunk.start, slot_column[row, place],
                        summed[row, place] / nearest.shape[1]))
    return tuple(torch.cat(parts) for parts in zip(*entries))


def _overlaps(entries, num_q, n, pairs_per_chunk):
    """[Q, G] float32 t(q, g) = sum_j min(V(q, j), V(g, j)), by joining the query rows' entries with
    the gallery rows' entries of the same column, about pairs_per_chunk pairs at a time."""
    row, column, value = entries
    num_g, device = n - num_q, value.device
    overlap = torch.zeros(num_q, num_g, dtype=torch.float32, device=device)
    is_query = row < num_q
    q_row, q_column, q_value = row[is_query], column[is_query], value[is_query]
    by_column = torch.argsort(column[~is_query], stable=True)
    g_row = row[~is_query][by_column] - num_q
    g_column, g_value = column[~is_query][by_column], value[~is_query][by_column]
    per_column = torch.bincount(g_column, minlength=n)
    column_start = per_column.cumsum(0) - per_column
    partners = per_column[q_column]                                 # pairs of each query entry
    chunk_of_entry = (partners.cumsum(0) - partners) // pairs_per_chunk
    _, entries_per_chunk = torch.unique_consecutive(chunk_of_entry, return_counts=True)
    start = 0
    for count in entries_per_chunk.tolist():
        entry = torch.arange(start, start + count, device=device)
        start += count
        pair_counts = partners[entry]
        pair_entry = torch.repeat_interleave(entry, pair_counts)
        first_pair = torch.repeat_interleave(pair_counts.cumsum(0) - pair_counts, pair_counts)
        partner = (column_start[q_column[pair_entry]]
                   + torch.arange(len(pair_entry), device=device) - first_pair)
        overlap.view(-1).index_add_(0, q_row[pair_entry] * num_g + g_row[partner],
                                    torch.minimum(q_value[pair_entry], g_value[partner]))
    return overlap


# ----------------------------------------------------------------------------------------------
# Reference: one row at a time in numpy, with dense [N, N] matrices, as the published code does

def reference_rerank(q_g_dist, q_q_dist, g_g_dist, k1=K1, k2=K2, lambda_value=LAMBDA):
    """Same result as k_reciprocal_rerank, computed row by row in numpy; for tests and the
    benchmark (its memory grows with N^2: several dense [N, N] matrices)."""
    check_rerank_params(k1, k2, lambda_value)
    q_g, q_q, g_g = (x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
                     for x in (q_g_dist, q_q_dist, g_g_dist))
    num_q, n = len(q_q), len(q_q) + len(g_g)
    original = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32)
    original *= original
    original /= np.maximum(original.max(1, keepdims=True), np.finfo(np.float32).tiny)
    ranking = np.argsort(original, axis=1, kind='stable')

    def reciprocal_neighbours(i, k):  # R(i, k)
        nearest = ranking[i, :k + 1]
        return nearest[(ranking[nearest, :k + 1] == i).any(1)]

    vectors = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        neighbours = reciprocal_neighbours(i, k1)
        expanded = [neighbours]
        for candidate in neighbours:
            half = reciprocal_neighbours(candidate, round(k1 / 2))
            if len(np.intersect1d(half, neighbours)) > 2 / 3 * len(half):
                expanded.append(half)
        expanded = np.unique(np.concatenate(expanded))
        weights = np.exp(-original[i, expanded])
        vectors[i, expanded] = weights / weights.sum()
    if k2 > 1:
        vectors = np.stack([vectors[ranking[i, :k2]].mean(0) for i in range(n)])

    holders = [num_q + np.flatnonzero(vectors[num_q:, j]) for j in range(n)]  # gallery rows with j
    final = np.empty((num_q, n - num_q), dtype=np.float32)
    for i in range(num_q):
        overlap = np.zeros(n, dtype=np.float32)
        for j in np.flatnonzero(vectors[i]):
            overlap[holders[j]] += np.minimum(vectors[i, j], vectors[holders[j], j])
        jaccard = 1 - overlap[num_q:] / (2 - overlap[num_q:])
        final[i] = jaccard * (1 - lambda_value) + original[i, num_q:] * lambda_value
    return final

