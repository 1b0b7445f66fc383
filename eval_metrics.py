"""Ranking metrics of VI-ReID (CMC, mAP, mINP) under each dataset's matching rule: vectorised on
torch tensors for use, beside a plain per-query reference that the tests hold it to."""
import numpy as np
import torch

from data_manager import dataset_facts

# Queries are ranked in chunks of rows so that the per-chunk [rows, gallery] intermediates stay
# around this many elements, whatever the size of the whole distance matrix.
CHUNK_ELEMENTS = 1 << 21


# ----------------------------------------------------------------------------------------------
# Matching rules: which gallery entries a query ignores. Each takes the query's ids/cameras
# shaped to broadcast against the gallery's (numpy or torch alike) and returns a boolean mask.

def ignore_cam2_for_cam3(q_pids, q_camids, g_pids, g_camids):
    """SYSU-MM01: a query from cam3 ignores gallery images from cam2 (the same room)."""
    return (q_camids == 3) & (g_camids == 2)


def ignore_same_id_and_camera(q_pids, q_camids, g_pids, g_camids):
    """LLCM: gallery images with the query's id and the query's camera number are ignored."""
    return (g_pids == q_pids) & (g_camids == q_camids)


MATCHING_RULES = {
    'none': None,  # RegDB: every gallery image counts
    'cam3_ignores_cam2': ignore_cam2_for_cam3,
    'same_id_and_camera': ignore_same_id_and_camera,
}


# ----------------------------------------------------------------------------------------------
# Public entry points (the names the VI-ReID repos call)

def eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    """SYSU-MM01: cam3 queries ignore cam2; identity-level CMC. Returns (cmc, mAP, mINP)."""
    return rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank,
                        **_protocol('sysu'))


def eval_llcm(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    """LLCM: same id and same camera ignored; identity-level CMC. Returns (cmc, mAP, mINP)."""
    return rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank,
                        **_protocol('llcm'))


def eval_regdb(distmat, q_pids, g_pids, max_rank=20):
    """RegDB: nothing ignored; image-level CMC. Returns (cmc, mAP, mINP)."""
    return rank_metrics(distmat, q_pids, g_pids, max_rank=max_rank, **_protocol('regdb'))


def evaluate(dataset, distmat, query, gallery, max_rank=20):
    """(cmc, mAP, mINP) of a query/gallery pair of data_manager.ImageList under the dataset's
    protocol ('demo' follows LLCM)."""
    return rank_metrics(distmat, query.pids, gallery.pids, query.camids, gallery.camids,
                        max_rank=max_rank, **_protocol(dataset))


def _protocol(dataset):
    """The matching rule and CMC level that data_manager's facts table gives the dataset."""
    facts = dataset_facts(dataset)
    return {'matching': facts.matching, 'identity_cmc': facts.identity_cmc}


# ----------------------------------------------------------------------------------------------
# Vectorised implementation

def rank_metrics(distmat, q_pids, g_pids, q_camids=None, g_camids=None, matching='none',
                 identity_cmc=False, max_rank=20, chunk_elements=CHUNK_ELEMENTS):
    """CMC (numpy, length min(max_rank, gallery size)), mAP and mINP (floats) of a [Q, G]
    distance matrix (smaller = closer; numpy or torch, computed on its device).

    Each query's gallery is ranked with a stable sort and the entries its matching rule ignores are
    dropped. CMC counts distinct gallery identities when identity_cmc (SYSU-MM01, LLCM) and images
    otherwise; it sums over all queries (one without a match adds 0) and divides by the number of
    queries with a match, like the published code. mAP and mINP average over those queries."""
    distmat = torch.as_tensor(distmat)
    device = distmat.device
    num_q, num_g = distmat.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f'cannot rank a {num_q} x {num_g} distance matrix.')
    max_rank = min(max_rank, num_g)
    q_pids, g_pids = _long(q_pids, device), _long(g_pids, device)
    q_camids = _long(q_camids if q_camids is not None else np.zeros(num_q), device)
    g_camids = _long(g_camids if g_camids is not None else np.zeros(num_g), device)
    gallery_ids, g_labels = torch.unique(g_pids, return_inverse=True)
    q_labels = _labels_in(gallery_ids, q_pids)
    rule = MATCHING_RULES[matching]

    totals = _Totals(max_rank, device)
    rows = max(1, chunk_elements // num_g)
    for start in range(0, num_q, rows):
        chunk = slice(start, start + rows)
        _rank_chunk(distmat[chunk], q_labels[chunk], q_pids[chunk], q_camids[chunk], g_labels,
                    g_pids, g_camids, len(gallery_ids), rule, identity_cmc, totals)
    return totals.result()


def _long(values, device):
    return torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values,
                           device=device).long().reshape(-1)


def _labels_in(sorted_ids, pids):
    """Index of each pid in sorted_ids, or -1 where the gallery lacks that id."""
    position = torch.searchsorted(sorted_ids, pids).clamp(max=len(sorted_ids) - 1)
    return torch.where(sorted_ids[position] == pids, position, -1)


class _Totals:
    """Sums over queries: CMC hits per rank, AP, INP and the number of queries with a match."""

    def __init__(self, max_rank, device):
        self.max_rank = max_rank
        self.cmc_hits = torch.zeros(max_rank, dtype=torch.float64, device=device)
        self.ap = torch.zeros((), dtype=torch.float64, device=device)
        self.inp = torch.zeros((), dtype=torch.float64, device=device)
        self.valid = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, first_hit_rank, ap, inp):
        """first_hit_rank: 1-based CMC rank of each valid query's first hit."""
        ranks = torch.arange(1, self.max_rank + 1, device=first_hit_rank.device)
        self.cmc_hits += (first_hit_rank[:, None] <= ranks).sum(0)
        self.ap += ap.sum()
        self.inp += inp.sum()
        self.valid += len(ap)

    def result(self):
        valid = int(self.valid)
        if valid == 0:
            raise ValueError('no query has a matching identity in the gallery.')
        cmc = (self.cmc_hits / valid).cpu().numpy()
        return cmc, float(self.ap) / valid, float(self.inp) / valid


def _rank_chunk(distmat, q_labels, q_pids, q_camids, g_labels, g_pids, g_camids, num_ids, rule,
                identity_cmc, totals):
    """Add the metrics of one block of queries to totals."""
    num_q, num_g = distmat.shape
    order = torch.argsort(distmat, dim=1, stable=True)           # [q, g] gallery index by rank
    ranked_labels = g_labels[order]                              # [q, g] gallery id label by rank
    kept = None
    if rule is not None:
        kept = ~rule(q_pids[:, None], q_camids[:, None], g_pids[order], g_camids[order])
    matches = ranked_labels == q_labels[:, None]
    if kept is not None:
        matches &= kept
    num_matches = matches.sum(1)
    valid = num_matches > 0
    rows, columns = matches.nonzero(as_tuple=True)               # every match, row-major
    # 1-based position of each match in its query's list once the ignored entries are dropped
    if kept is None:
        positions = columns + 1
    else:
        positions = kept.cumsum(1, dtype=torch.int32)[rows, columns].long()
    first = torch.cumsum(num_matches, 0) - num_matches           # index of each row's first match
    hit_number = torch.arange(len(rows), device=rows.device) - first[rows] + 1
    precision_sum = torch.zeros(num_q, dtype=torch.float64, device=rows.device)
    precision_sum.index_add_(0, rows, hit_number.double() / positions.double())
    num_matches, first = num_matches[valid], first[valid]
    ap = precision_sum[valid] / num_matches
    inp = num_matches.double() / positions[first + num_matches - 1].double()
    if identity_cmc:
        first_hit_rank = _identity_rank(ranked_labels[valid], kept[valid] if kept is not None
                                        else None, columns[first], num_ids)
    else:
        first_hit_rank = positions[first]
    totals.add(first_hit_rank, ap, inp)


def _identity_rank(ranked_labels, kept, first_match_column, num_ids):
    """1-based rank of the query's identity among the distinct identities of the ranked, filtered
    gallery: the number of identities whose first kept entry comes no later than the query's."""
    num_q, num_g = ranked_labels.shape
    column = torch.arange(num_g, device=ranked_labels.device).expand(num_q, num_g)
    if kept is not None:
        column = torch.where(kept, column, num_g)                # ignored entries never come first
    first_seen = torch.full((num_q, num_ids), num_g, dtype=column.dtype, device=column.device)
    first_seen.scatter_reduce_(1, ranked_labels, column, reduce='amin')
    return (first_seen <= first_match_column[:, None]).sum(1)


# ----------------------------------------------------------------------------------------------
# Reference: one query at a time, straight from the protocol text (docs/DATASETS.md, Metrics)

def reference_metrics(distmat, q_pids, g_pids, q_camids=None, g_camids=None, matching='none',
                      identity_cmc=False, max_rank=20):
    """Same result as rank_metrics, computed by a per-query loop in numpy; for tests and
    benchmarks."""
    distmat = distmat.cpu().numpy() if torch.is_tensor(distmat) else np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids = np.zeros(len(q_pids)) if q_camids is None else np.asarray(q_camids)
    g_camids = np.zeros(len(g_pids)) if g_camids is None else np.asarray(g_camids)
    max_rank = min(max_rank, len(g_pids))
    rule = MATCHING_RULES[matching]
    cmc_sum, aps, inps = np.zeros(max_rank), [], []
    for query in range(len(q_pids)):
        order = np.argsort(distmat[query], kind='stable')
        ranked_pids = g_pids[order]
        if rule is not None:
            ranked_pids = ranked_pids[~rule(q_pids[query], q_camids[query], ranked_pids,
                                            g_camids[order])]
        matches = ranked_pids == q_pids[query]
        if not matches.any():
            continue  # adds 0 to every Rank-k and is not counted in the divisor
        if identity_cmc:  # keep the first occurrence of each gallery identity
            _, first_occurrence = np.unique(ranked_pids, return_index=True)
            candidates = ranked_pids[np.sort(first_occurrence)]
        else:
            candidates = ranked_pids
        first_hit = np.flatnonzero(candidates == q_pids[query])[0]
        cmc_sum += np.arange(max_rank) >= first_hit
        match_positions = np.flatnonzero(matches) + 1
        precisions = np.arange(1, len(match_positions) + 1) / match_positions
        aps.append(precisions.mean())
        inps.append(len(match_positions) / match_positions[-1])
    if not aps:
        raise ValueError('no query has a matching identity in the gallery.')
    return cmc_sum / len(aps), float(np.mean(aps)), float(np.mean(inps))
