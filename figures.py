"""The figures of visualize.py and search.py, drawn with matplotlib's non-interactive Agg backend,
and the numbers behind each (rank lists, t-SNE, pair-distance distributions, CMC, training curves)."""
import io
import json
import math
import textwrap

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from eval_metrics import MATCHING_RULES  # noqa: E402
from inference import fused_distance  # noqa: E402
from utils import UserError, written_atomically  # noqa: E402

DPI = 100
FRAME_COLOURS = {True: '#2ca02c', False: '#d62728', None: '#9e9e9e'}  # right, wrong, unknown id
QUERY_COLOUR = '#1f77b4'
MODALITY_TAGS = {'visible': 'VIS', 'infrared': 'IR'}


# ----------------------------------------------------------------------------------------------
# Rank lists

# Pixel geometry of a rank-list figure: each image is letterboxed into a CELL box with a FRAME
# border, LABEL pixels of text under it; the query column is set apart by GAP.
CELL_W, CELL_H, FRAME, LABEL, PAD, GAP, TITLE = 64, 128, 4, 36, 6, 14, 26
CAPTION_CHARS, CAPTION_LINES = 14, 3  # a query caption wraps at 14 characters, 3 lines at most


def rank_list_size(rows, title=None):
    """(width, height) in pixels of the PNG draw_rank_lists writes for rows and title."""
    columns = max((len(row['gallery']) for row in rows), default=0)
    width = 2 * PAD + GAP + (columns + 1) * (CELL_W + PAD)
    height = 2 * PAD + (TITLE if title else 0) + len(rows) * (CELL_H + LABEL + PAD)
    return width, height


def draw_rank_lists(rows, out_path, title=None):
    """Draw one row per query: the query image (blue frame, caption under it) and its ranked
    gallery images, each framed green (right identity), red (wrong) or grey (identity unknown,
    correct None) with its rank and distance under it. rows: [{'query': image path, 'caption':
    str, 'gallery': [{'path', 'distance', 'rank', 'correct'}, ...]}]. Writes a PNG of
    rank_list_size(rows, title) pixels to out_path and returns that size."""
    if not rows:
        raise ValueError('draw_rank_lists needs at least one row')
    width, height = rank_list_size(rows, title)
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    try:
        if title:
            figure.text(0.5, 1 - (PAD + TITLE / 2) / height, title, ha='center', va='center',
                        fontsize=11)
        top = PAD + (TITLE if title else 0)
        for row in rows:
            _draw_cell(figure, (width, height), PAD, top, row['query'], QUERY_COLOUR,
                       _wrap(row.get('caption', '')))
            for column, entry in enumerate(row['gallery']):
                left = PAD + GAP + (column + 1) * (CELL_W + PAD)
                label = f'{entry["rank"]}\n{entry["distance"]:.3f}'
                _draw_cell(figure, (width, height), left, top, entry['path'],
                           FRAME_COLOURS[entry['correct']], label)
            top += CELL_H + LABEL + PAD
        save_png(figure, out_path)
    finally:
        plt.close(figure)
    return width, height


def save_png(figure, out_path):
    """Write a figure as a 256-colour PNG: enough for plots and small photos, and 2-3 times
    smaller than a full-colour one."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=DPI)
    with written_atomically(out_path) as tmp:
        Image.open(buffer).convert('RGB').quantize(colors=256).save(tmp, format='png',
                                                                    optimize=True)


def _draw_cell(figure, size, left, top, path, colour, label):
    """One framed image whose top-left corner is (left, top) pixels, label centred under it."""
    width, height = size
    axes = figure.add_axes([left / width, 1 - (top + CELL_H) / height, CELL_W / width,
                            CELL_H / height])
    axes.imshow(letterboxed(path, (CELL_W - 2 * FRAME, CELL_H - 2 * FRAME)), aspect='auto',
                extent=(FRAME, CELL_W - FRAME, CELL_H - FRAME, FRAME))
    axes.add_patch(Rectangle((FRAME / 2, FRAME / 2), CELL_W - FRAME, CELL_H - FRAME, fill=False,
                             edgecolor=colour, linewidth=FRAME * 72 / DPI))
    axes.set_xlim(0, CELL_W)
    axes.set_ylim(CELL_H, 0)
    axes.axis('off')
    figure.text((left + CELL_W / 2) / width, 1 - (top + CELL_H + 2) / height, label,
                ha='center', va='top', fontsize=7, linespacing=1.1)


def letterboxed(path, size):
    """The RGB image at path scaled to fit (width, height) pixels, centred on white, as an array."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.pad(image.convert('RGB'), size, color='white'))
    except (OSError, UnidentifiedImageError):
        raise UserError(f'cannot read the image {path}; expected a readable image file.') from None


def _wrap(caption):
    return '\n'.join(textwrap.wrap(str(caption), CAPTION_CHARS)[:CAPTION_LINES])


def top_ranked(fused, query_pid, query_camid, gallery, matching, topk):
    """Gallery indices of one query's first topk entries as the evaluation ranks them: a stable
    argsort of its fused distances [G], the entries its matching rule ignores dropped."""
    order = torch.argsort(torch.as_tensor(fused), stable=True).numpy()
    rule = MATCHING_RULES[matching]
    if rule is not None:
        order = order[~rule(query_pid, query_camid, gallery.pids[order], gallery.camids[order])]
    return order[:topk]


def rank_list_numbers(store, query, gallery, matching, weights, query_rows, topk):
    """The rows draw_rank_lists takes for the queries query_rows of a query/gallery pair of
    ImageLists: each gallery entry with its index in the gallery, id, camera, fused distance
    (inference.fused_distance, as test.py ranks), rank (1-based, after the matching rule) and
    correct (same id as the query)."""
    fused = fused_distance(store.select(query)[list(query_rows)], store.select(gallery), weights)
    rows = []
    for distances, row in zip(fused, query_rows):
        pid, camid = int(query.pids[row]), int(query.camids[row])
        gallery_rows = top_ranked(distances, pid, camid, gallery, matching, topk)
        rows.append({
            'query': query.paths[row], 'pid': pid, 'camid': camid,
            'caption': f'query {MODALITY_TAGS[query.modality]} id {pid} cam {camid}',
            'gallery': [{'path': gallery.paths[g], 'index': int(g), 'pid': int(gallery.pids[g]),
                         'camid': int(gallery.camids[g]), 'distance': float(distances[g]),
                         'rank': rank, 'correct': bool(gallery.pids[g] == pid)}
                        for rank, g in enumerate(gallery_rows, 1)]})
    return rows


# ----------------------------------------------------------------------------------------------
# Distributions of pair distances

DISTANCE_BINS = 2000  # equal histogram bins over the range fused distances can take
PLOT_BINS = 40  # about this many bins, merged from those, span the distances that occur
CHUNK_ELEMENTS = 1 << 22  # distances held at once: a block of rows times all columns


def pair_distance_statistics(store, weights, chunk_elements=CHUNK_ELEMENTS):
    """Histograms, pair counts, means and standard deviations of the fused distances of
    positive (same id) and negative pairs: across modalities (every visible image x every
    infrared image) and within each modality (every unordered pair of two distinct images).
    Histograms count in DISTANCE_BINS equal bins from -bound to bound (fused_distance_bound); the
    plot merges them into plot_bins (bin indices bounding about PLOT_BINS bins over the range that
    occurs), and the overlap area of each positive/negative pair of distributions is measured in
    those. Computed in blocks of rows: no [N, M] matrix or mask is ever whole."""
    modalities = sorted(store.features)
    bound = fused_distance_bound(weights, next(iter(store.features.values())).shape[2])
    groups = [(m, m, m) for m in modalities]
    if len(modalities) == 2:
        groups.insert(0, ('cross-modality', 'visible', 'infrared'))
    curves = {}
    for group, first, second in groups:
        negative, positive = _pair_histograms(store, first, second, weights, bound,
                                              chunk_elements)
        curves[f'{group} positive'], curves[f'{group} negative'] = positive, negative
    bounds = plot_bins(np.sum([curve['counts'] for curve in curves.values()], axis=0))
    overlap = {group: overlap_area(merged_counts(curves[f'{group} positive']['counts'], bounds),
                                   merged_counts(curves[f'{group} negative']['counts'], bounds))
               for group, _, _ in groups}
    return {'bin_edges': np.linspace(-bound, bound, DISTANCE_BINS + 1).tolist(),
            'plot_bins': bounds.tolist(), 'curves': curves, 'overlap': overlap}


def fused_distance_bound(weights, branches):
    """The largest magnitude a fused distance can have: 4 x branches x (w_pool + w_feat), as
    each flip-summed embedding has a norm of at most 2; 1 for one feature alone (a cosine); a
    method's own fusion (a callable) says it as its distance_bound."""
    if callable(weights):
        return float(weights.distance_bound)
    if 0.0 in weights:
        return 1.0
    return 4.0 * branches * sum(weights)


def plot_bins(counts):
    """Fine-bin indices bounding the plot bins: runs of equal length covering the first to the
    last non-empty bin of counts, about PLOT_BINS of them (len = plot bins + 1)."""
    used = np.flatnonzero(counts)
    first, last = (used[0], used[-1]) if len(used) else (0, len(counts) - 1)
    width = max(1, math.ceil((last + 1 - first) / PLOT_BINS))
    bounds = np.arange(first, last + 1 + width, width)
    return np.minimum(bounds[:np.searchsorted(bounds, last + 1) + 1], len(counts))


def merged_counts(counts, bounds):
    """The counts of fine bins summed within each plot bin of plot_bins' bounds."""
    return np.add.reduceat(np.asarray(counts), bounds[:-1])


def _pair_histograms(store, first, second, weights, bound, chunk_elements):
    """(negative, positive) statistics of the pairs of images of modalities first x second;
    when first == second only the pairs (i, j) with i < j."""
    within = first == second
    rows_features, columns_features = store.features[first], store.features[second]
    device = rows_features.device
    row_pids = torch.as_tensor(store.pids[first], device=device)
    column_pids = torch.as_tensor(store.pids[second], device=device)
    counts = torch.zeros(3 * DISTANCE_BINS, dtype=torch.int64, device=device)  # neg, pos, none
    sums = torch.zeros(2, 2, dtype=torch.float64, device=device)  # [all | positive, (x, x^2)]
    shift = None  # x = distance - shift, the first block's mean: moments without cancellation
    block = max(1, chunk_elements // max(1, len(column_pids)))
    for start in range(0, len(row_pids), block):
        stop = min(start + block, len(row_pids))
        columns = slice(start if within else 0, None)
        distances = fused_distance(rows_features[start:stop], columns_features[columns], weights)
        same_id = row_pids[start:stop, None] == column_pids[None, columns]
        key = ((distances + bound) * (DISTANCE_BINS / (2 * bound))).long()
        key.clamp_(0, DISTANCE_BINS - 1)
        key += DISTANCE_BINS * same_id
        shift = float(distances.mean()) if shift is None else shift
        shifted = distances.sub_(shift)
        if within:  # column start + j pairs with row start + i only when j > i
            not_a_pair = torch.ones_like(same_id).tril_()
            key.masked_fill_(not_a_pair, 2 * DISTANCE_BINS)
            shifted.masked_fill_(not_a_pair, 0.0)
        counts += torch.bincount(key.flatten(), minlength=3 * DISTANCE_BINS)
        positive = torch.where(same_id, shifted, 0.0)
        for kind, values in enumerate((shifted, positive)):  # row sums, then in float64
            sums[kind, 0] += values.sum(1).double().sum()
            sums[kind, 1] += values.square().sum(1).double().sum()
    counts = counts.cpu().numpy().reshape(3, DISTANCE_BINS)
    sums = sums.cpu().numpy()
    return _moments(counts[0], sums[0] - sums[1], shift), _moments(counts[1], sums[1], shift)


def _moments(counts, sums, shift):
    """Pairs, mean, std and counts of a histogram whose values x = distance - shift summed to
    sums = (sum x, sum x^2)."""
    pairs = int(counts.sum())
    if not pairs:
        return {'pairs': 0, 'mean': None, 'std': None, 'counts': counts.tolist()}
    mean = sums[0] / pairs
    std = math.sqrt(max(0.0, sums[1] / pairs - mean ** 2))
    return {'pairs': pairs, 'mean': float(shift + mean), 'std': float(std),
            'counts': counts.tolist()}


def overlap_area(positive_counts, negative_counts):
    """Area shared by two histograms normalised to unit mass (0: apart, 1: identical); None
    when either is empty."""
    positive, negative = np.asarray(positive_counts, float), np.asarray(negative_counts, float)
    if positive.sum() == 0 or negative.sum() == 0:
        return None
    return float(np.minimum(positive / positive.sum(), negative / negative.sum()).sum())


# ----------------------------------------------------------------------------------------------
# t-SNE

TSNE_EMBEDDING = 1  # which of (pooled, BNNeck) the t-SNE shows: BNNeck, the test feature


def tsne_numbers(store, ids, max_points, seed):
    """2-D t-SNE (scikit-learn, PCA start, seeded) of the test images of `ids`: the 'original'
    panel embeds each image's original-branch BNNeck feature, at most max_points images chosen
    at random; DEEN's 'branches' panel embeds the original and generated features of each image
    together, at most max_points points (max_points // branches images, a subset of the first)."""
    points = [(m, int(row)) for m in sorted(store.features)
              for row in np.flatnonzero(np.isin(store.pids[m], ids))]
    order = np.random.default_rng(seed).permutation(len(points))
    branches = next(iter(store.features.values())).shape[2]
    panels = {'original': _tsne_panel(store, [points[i] for i in sorted(order[:max_points])],
                                      [0], seed)}
    if branches > 1:
        images = [points[i] for i in sorted(order[:max_points // branches])]
        panels['branches'] = _tsne_panel(store, images, list(range(branches)), seed)
    return {'ids': [int(pid) for pid in ids], 'images': len(points), 'embedding': 'BNNeck',
            'branches': branches, 'panels': panels}


def _tsne_panel(store, points, branches, seed):
    if len(points) * len(branches) < 4:
        raise UserError(f'the chosen identities have {len(points)} test images; t-SNE needs at '
                        f'least 4 points (choose more or other --ids).')
    chosen = [(m, row, b) for m, row in points for b in branches]
    features = torch.stack([store.features[m][row, TSNE_EMBEDDING, b] for m, row, b in chosen])
    features = torch.nn.functional.normalize(features.float().cpu(), dim=1).numpy()
    perplexity = min(30.0, (len(chosen) - 1) / 3)
    xy = TSNE(n_components=2, perplexity=perplexity, init='pca',
              random_state=seed).fit_transform(features)
    return {'points': len(chosen), 'perplexity': perplexity,
            'x': xy[:, 0].tolist(), 'y': xy[:, 1].tolist(),
            'pid': [int(store.pids[m][row]) for m, row, _ in chosen],
            'modality': [m for m, _, _ in chosen], 'branch': [b for _, _, b in chosen],
            'path': [store.paths[m][row] for m, row, _ in chosen]}


# ----------------------------------------------------------------------------------------------
# CMC and training curves

def cmc_numbers(results, trials, fusion):
    """{setting: CMC per trial, mean and std per rank, mAP and mINP per trial} of one fusion from
    evaluation.evaluate_store's results (the numbers test.py summarises)."""
    numbers = {}
    for setting, by_fusion in results.items():
        per_trial = by_fusion[fusion]
        cmc = np.stack([c for c, _, _ in per_trial])
        numbers[setting] = {'trials': list(trials), 'fusion': fusion,
                            'ranks': list(range(1, cmc.shape[1] + 1)), 'cmc': cmc.tolist(),
                            'mean': cmc.mean(0).tolist(), 'std': cmc.std(0).tolist(),
                            'mAP': [float(m) for _, m, _ in per_trial],
                            'mINP': [float(m) for _, _, m in per_trial]}
    return numbers


def read_history(path):
    """The records of a training history file (training.history_path), one per epoch in order;
    the last line of an epoch wins (a resumed run appends)."""
    by_epoch = {}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                by_epoch[int(record['epoch'])] = record
                float(record['lr']), dict(record['losses'])
            except (ValueError, KeyError, TypeError):
                raise UserError(f'line {number} of {path} is not a JSON object with epoch, lr and '
                                f'losses; expected the _history.jsonl file train.py writes.') from None
    if not by_epoch:
        raise UserError(f'{path} holds no epochs; expected the _history.jsonl file train.py writes.')
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def training_curve_numbers(records):
    """Per epoch: the learning rate and each loss term; per evaluated epoch: Rank-1, mAP, mINP."""
    terms = sorted({term for record in records for term in record['losses']})
    evaluated = [record for record in records if record.get('metrics')]
    return {'epochs': [record['epoch'] for record in records],
            'lr': [record['lr'] for record in records],
            'losses': {term: [record['losses'].get(term) for record in records] for term in terms},
            'evaluated': {'epochs': [record['epoch'] for record in evaluated],
                          'direction': evaluated[-1]['metrics']['direction'] if evaluated else None,
                          **{metric: [record['metrics'][metric] for record in evaluated]
                             for metric in ('rank1', 'mAP', 'mINP')}}}


# ----------------------------------------------------------------------------------------------
# Drawing the figures (fixed sizes: FIGURE_INCHES x DPI pixels per panel)

PANEL_INCHES = (6.0, 5.0)  # one panel of a t-SNE, distance, CMC or training-curve figure
MODALITY_MARKERS = {'visible': 'o', 'infrared': '^'}
BRANCH_MARKERS = ('o', 's', 'D', 'v', 'P', 'X', '*', 'h')  # original, generated 1, 2, ... (cycled)


def branch_marker(branch):
    """The t-SNE marker of an embedding branch (0 = original), for any number of branches."""
    return BRANCH_MARKERS[branch % len(BRANCH_MARKERS)]


def branch_name(branch):
    return 'original' if branch == 0 else f'generated {branch}'
POSITIVE_COLOUR, NEGATIVE_COLOUR = FRAME_COLOURS[True], FRAME_COLOURS[False]
MODALITY_LINES = {'visible': '-', 'infrared': '--'}


def figure_size(panels):
    """(width, height) in pixels of a figure of `panels` panels side by side."""
    return round(panels * PANEL_INCHES[0] * DPI), round(PANEL_INCHES[1] * DPI)


def _panels(count):
    figure, axes = plt.subplots(1, count, figsize=(count * PANEL_INCHES[0], PANEL_INCHES[1]),
                                dpi=DPI, squeeze=False)
    return figure, list(axes[0])


def _save(figure, out_path):
    try:
        figure.tight_layout()
        save_png(figure, out_path)
    finally:
        plt.close(figure)
    return figure_size(len(figure.axes))


def _id_colours(ids):
    """A distinct colour per identity: tab10 / tab20, or evenly spread over 'turbo' beyond 20."""
    ids = sorted(ids)
    if len(ids) <= 20:
        palette = plt.get_cmap('tab10' if len(ids) <= 10 else 'tab20').colors
        return {pid: palette[i] for i, pid in enumerate(ids)}
    cmap = plt.get_cmap('turbo')
    return {pid: cmap(i / max(1, len(ids) - 1)) for i, pid in enumerate(ids)}


def draw_tsne(numbers, out_path):
    """The t-SNE panels of tsne_numbers: colour = identity; original panel marker = modality;
    branches panel marker = branch, filled = visible, hollow = infrared."""
    panels = numbers['panels']
    figure, axes = _panels(len(panels))
    colours = _id_colours(numbers['ids'])
    for ax, (name, panel) in zip(axes, panels.items()):
        x, y = np.asarray(panel['x']), np.asarray(panel['y'])
        pids, branches = np.asarray(panel['pid']), np.asarray(panel['branch'])
        modalities = np.asarray(panel['modality'])
        for modality in MODALITY_MARKERS:
            for branch in sorted(set(branches.tolist())):
                chosen = (modalities == modality) & (branches == branch)
                if not chosen.any():
                    continue
                marker = MODALITY_MARKERS[modality] if name == 'original' else branch_marker(branch)
                colour = [colours[pid] for pid in pids[chosen]]
                filled = modality == 'visible' or name == 'original'
                ax.scatter(x[chosen], y[chosen], s=22, marker=marker, linewidths=1.1,
                           c=colour if filled else 'none', edgecolors=colour)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(handles=_tsne_legend(name, numbers['branches']), fontsize=7, loc='best')
        what = ('original embedding' if name == 'original' else
                f'original + {numbers["branches"] - 1} generated embeddings (DEE)')
        ax.set_title(f'{what}, BNNeck: {panel["points"]} points', fontsize=9)
    figure.suptitle(f't-SNE of {len(numbers["ids"])} test identities (colour = identity)',
                    fontsize=10)
    return _save(figure, out_path)


def _tsne_legend(name, branches):
    if name == 'original':
        return [Line2D([], [], marker=marker, color='k', linestyle='', label=modality)
                for modality, marker in MODALITY_MARKERS.items()]
    handles = [Line2D([], [], marker=branch_marker(b), color='k', linestyle='',
                      label=branch_name(b)) for b in range(branches)]
    return handles + [Line2D([], [], marker='o', color='k', markerfacecolor='none', linestyle='',
                             label='hollow: infrared')]


def draw_distances(numbers, out_path):
    """Densities of the positive and negative pair distances of pair_distance_statistics: one
    panel across modalities (overlap shaded), one within each modality; means as vertical lines."""
    bounds = np.asarray(numbers['plot_bins'])
    edges = np.asarray(numbers['bin_edges'])[bounds]
    curves, overlap = numbers['curves'], numbers['overlap']
    cross = 'cross-modality' in overlap
    figure, axes = _panels(2 if cross else 1)
    margin = 0.05 * (edges[-1] - edges[0])
    if cross:
        densities = [_draw_density(axes[0], edges, bounds, curves[f'cross-modality {kind}'], colour, '-',
                                   f'{kind} pairs')
                     for kind, colour in (('positive', POSITIVE_COLOUR), ('negative', NEGATIVE_COLOUR))]
        if all(d is not None for d in densities):
            axes[0].stairs(np.minimum(*densities), edges, fill=True, color='0.6', alpha=0.5,
                           label=f'overlap {overlap["cross-modality"]:.1%}')
        axes[0].set_title('visible x infrared pairs', fontsize=10)
    for modality in (m for m in MODALITY_LINES if m in overlap):
        for kind, colour in (('positive', POSITIVE_COLOUR), ('negative', NEGATIVE_COLOUR)):
            _draw_density(axes[-1], edges, bounds, curves[f'{modality} {kind}'], colour,
                          MODALITY_LINES[modality], f'{modality} {kind}')
    axes[-1].set_title('pairs within a modality (' + ', '.join(
        f'{m} overlap {percent(v)}' for m, v in overlap.items() if m != 'cross-modality') + ')',
        fontsize=9)
    for ax in axes:
        ax.set_xlim(edges[0] - margin, edges[-1] + margin)
        ax.set_xlabel('fused distance (negative fused similarity)')
        ax.set_ylabel('density')
        ax.legend(fontsize=7)
    return _save(figure, out_path)


def _draw_density(ax, edges, bounds, curve, colour, style, label):
    """Step curve of one histogram as a density in the plot bins (edges, and bounds in fine
    bins), with its mean; the density, or None if the histogram is empty."""
    if not curve['pairs']:
        return None
    density = merged_counts(curve['counts'], bounds) / (curve['pairs'] * np.diff(edges))
    ax.stairs(density, edges, color=colour, linestyle=style, linewidth=1.2,
              label=f'{label}: {curve["pairs"]:,} (mean {curve["mean"]:.2f})')
    ax.axvline(curve['mean'], color=colour, linestyle=style, linewidth=0.8, alpha=0.8)
    return density


def percent(value):
    return 'n/a' if value is None else f'{value:.1%}'


def draw_cmc(numbers, out_path):
    """CMC curve of each setting of cmc_numbers: mean over trials and a band of ± one std."""
    figure, (ax,) = _panels(1)
    for setting, curve in numbers.items():
        ranks = np.asarray(curve['ranks'])
        mean, std = 100 * np.asarray(curve['mean']), 100 * np.asarray(curve['std'])
        line, = ax.plot(ranks, mean, marker='.', label=f'{setting}: Rank-1 {mean[0]:.1f}%, '
                        f'mAP {100 * np.mean(curve["mAP"]):.1f}%')
        ax.fill_between(ranks, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    first = next(iter(numbers.values()))
    trials = len(first['trials'])
    ax.set_title(f'CMC, fusion {first["fusion"]} (mean' + (f' ± std over {trials} trials)'
                                                            if trials > 1 else ', 1 trial)'),
                 fontsize=10)
    ax.set_xlabel('rank')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel('matching rate (%)')
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    return _save(figure, out_path)


def draw_training_curves(numbers, out_path):
    """Three panels: each loss term, the learning rate, Rank-1 / mAP / mINP per evaluated epoch."""
    figure, (losses, lr, metrics) = _panels(3)
    epochs = numbers['epochs']
    for term, values in numbers['losses'].items():
        losses.plot(epochs, [np.nan if v is None else v for v in values], label=term,
                    linewidth=2 if term == 'loss' else 1)
    losses.set_title('training losses (per-epoch means)', fontsize=10)
    losses.legend(fontsize=7)
    lr.plot(epochs, numbers['lr'], color='k')
    if min(numbers['lr']) > 0:
        lr.set_yscale('log')
    lr.set_title('learning rate', fontsize=10)
    evaluated = numbers['evaluated']
    for metric in ('rank1', 'mAP', 'mINP'):
        metrics.plot(evaluated['epochs'], [100 * v for v in evaluated[metric]], marker='o',
                     markersize=3, label=metric.replace('rank1', 'Rank-1'))
    metrics.set_title(f'{evaluated["direction"] or "no evaluated epoch"} (gallery trial 0), %',
                      fontsize=10)
    if evaluated['epochs']:
        metrics.legend(fontsize=7)
    for ax in (losses, lr, metrics):
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _save(figure, out_path)


def draw_sweep(numbers, out_path):
    """A parameter study (reproduce.py --sweep): Rank-1 and mAP in % against the swept value,
    the paper's choice marked by a dashed line when it has one."""
    figure, (ax,) = _panels(1)
    for metric, style in (('Rank-1', 'o-'), ('mAP', 's--')):
        ax.plot(numbers['values'], numbers[metric], style, label=metric)
    if numbers.get('paper_choice') is not None:
        ax.axvline(numbers['paper_choice'], color='grey', linestyle=':',
                   label=f'paper: {numbers["flag"]} {numbers["paper_choice"]:g}')
    ax.set_xlabel(numbers['flag'])
    ax.set_ylabel('%')
    ax.set_title(f'{numbers["dataset"]} {numbers["setting"]}, fusion {numbers["fusion"]}',
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, out_path)


BENCHMARK_COLOURS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#9467bd')  # ours, then each published source


def draw_benchmark(numbers, out_path):
    """A benchmark table (reproduce.py --table benchmark) as horizontal grouped bars: one panel
    per entry of numbers['panels'] ({title, methods, series: {name: [value in % or None]}}),
    one group per method (labelled as given), one bar per series (ours first); a missing value
    (None) is left out."""
    panels = numbers['panels']
    figure, axes = _panels(len(panels))
    for ax, panel in zip(axes, panels):
        methods, series = panel['methods'], panel['series']
        height = 0.8 / max(1, len(series))
        positions = np.arange(len(methods))[::-1]
        for number, (name, values) in enumerate(series.items()):
            shown = [(y - number * height, v) for y, v in zip(positions, values) if v is not None]
            if shown:
                ys, vs = zip(*shown)
                bars = ax.barh(ys, vs, height=height, label=name,
                               color=BENCHMARK_COLOURS[number % len(BENCHMARK_COLOURS)])
                ax.bar_label(bars, fmt='%.1f', fontsize=6, padding=2)
        ax.set_yticks(positions - (len(series) - 1) * height / 2)
        ax.set_yticklabels(methods, fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel('%')
        ax.set_title(panel['title'], fontsize=10)
        ax.grid(axis='x', alpha=0.3)
        ax.legend(fontsize=7, loc='best')
    return _save(figure, out_path)


def draw_corruption_grid(numbers, out_path):
    """The corruption x severity grid (reproduce.py --table robustness): Rank-1 and mAP in % of
    each corruption (rows) at each severity (columns) as two annotated heat maps, the clean and
    mixed-set values in the titles; a cell not yet tested is blank."""
    figure, axes = _panels(2)
    figure.set_size_inches(PANEL_INCHES[0] * 2, PANEL_INCHES[1] * 1.6)
    for ax, metric in zip(axes, ('Rank-1', 'mAP')):
        grid = np.array([[np.nan if v is None else v for v in row] for row in numbers[metric]],
                        dtype=float)
        clean, mixed = numbers['clean'].get(metric), numbers['mixed'].get(metric)
        top = max([1.0, clean or 0.0] + ([float(np.nanmax(grid))] if np.isfinite(grid).any()
                                         else []))
        ax.imshow(grid, cmap='viridis', aspect='auto', vmin=0, vmax=top)
        for (row, column), value in np.ndenumerate(grid):
            if np.isfinite(value):  # dark text on the bright end of viridis
                ax.text(column, row, f'{value:.1f}', ha='center', va='center', fontsize=6,
                        color='black' if value > 0.6 * top else 'white')
        ax.set_xticks(range(len(numbers['severities'])), numbers['severities'])
        ax.set_yticks(range(len(numbers['corruptions'])), numbers['corruptions'], fontsize=7)
        ax.set_xlabel('severity')
        ax.set_title(f'{metric} %: clean {_or_dash(clean)}, mixed set {_or_dash(mixed)}',
                     fontsize=9)
    figure.suptitle(f'{numbers["dataset"]} {numbers["method"]}, {numbers["setting"]}, fusion '
                    f'{numbers["fusion"]}, corrupted {numbers["modality"]} images', fontsize=10)
    try:
        figure.tight_layout()
        save_png(figure, out_path)
    finally:
        plt.close(figure)
    width, height = figure.get_size_inches() * DPI
    return round(width), round(height)


def _or_dash(value):
    return '—' if value is None else f'{value:.1f}'


def draw_transfer(numbers, out_path):
    """The transfer matrix (reproduce.py --table transfer): one heat map per metric, a row per
    training dataset and a column per target, each cell's value in %, '-' where not run."""
    figure, axes = _panels(2)
    for ax, metric in zip(axes, ('Rank-1', 'mAP')):
        values = np.array([[np.nan if cell is None else cell[metric] for cell in row]
                           for row in numbers['cells']], dtype=float)
        ax.imshow(np.nan_to_num(values, nan=0.0), cmap='viridis', vmin=0, vmax=100)
        for (row, column), value in np.ndenumerate(values):
            ax.text(column, row, '-' if np.isnan(value) else f'{value:.1f}', ha='center',
                    va='center', color='white' if np.isnan(value) or value < 60 else 'black')
        ax.set_xticks(range(len(numbers['targets'])), numbers['target_titles'])
        ax.set_yticks(range(len(numbers['sources'])), numbers['source_titles'])
        ax.set_xlabel('tested on')
        ax.set_ylabel('trained on')
        ax.set_title(f'{numbers["method"]} {metric} (%), fusion {numbers["fusion"]}', fontsize=10)
    return _save(figure, out_path)
