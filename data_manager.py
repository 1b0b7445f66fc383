"""Image lists of SYSU-MM01, RegDB and LLCM (training sets, test queries and random galleries):
one generic reader driven by a table of per-dataset facts, under the names VI-ReID repos call;
and the training lists of several datasets merged into one identity space by fixed offsets."""
import dataclasses
import os
import random
import re
from dataclasses import dataclass

import numpy as np

from utils import UserError

MODALITIES = ('visible', 'infrared')
SEARCH_MODES = ('all', 'indoor')
MULTI_SHOT_IMAGES = 10  # gallery images per id and camera in multi-shot mode
GALLERY_TRIALS = 10  # random gallery draws reported for SYSU-MM01 and LLCM

# What each direction ranks: (query modality, how it is drawn), (gallery modality, how it is
# drawn); 'every' = all test images, 'sampled' = the random gallery of the trial (DATASETS.md).
DIRECTION_PLANS = {
    'ir_to_vis': (('infrared', 'every'), ('visible', 'sampled')),
    'vis_to_ir': (('visible', 'every'), ('infrared', 'sampled')),
    # the released DEEN script's "VIS to IR": the NIR single-shot set ranks every VIS test image
    'released_vis_to_ir': (('infrared', 'sampled'), ('visible', 'every')),
    # the released DEEN script's RegDB test: the images of vis_to_ir / ir_to_vis, but each passes
    # through the other modality's stem (its test modes are swapped relative to its training)
    'released_routing_vis_to_ir': (('visible', 'every'), ('infrared', 'every')),
    'released_routing_ir_to_vis': (('infrared', 'every'), ('visible', 'every')),
}
# Directions whose images pass through the other modality's stem, and that other modality.
OTHER_STEM_DIRECTIONS = ('released_routing_vis_to_ir', 'released_routing_ir_to_vis')
OTHER_MODALITY = {'visible': 'infrared', 'infrared': 'visible'}


@dataclass(frozen=True)
class DatasetFacts:
    """Everything that differs between the datasets; the readers below know nothing else."""
    title: str
    layout: str                  # the expected folder, as a phrase for error messages
    cameras: dict                # modality -> camera numbers of its camN folders, in gallery order
    directions: tuple            # the test directions (DIRECTION_PLANS keys) of its protocol
    image_folders: dict = None   # modality -> folder under the root holding camN/PPPP/ test images
    indoor_cameras: tuple = ()   # visible cameras of the indoor search
    test_id_file: str = None     # one comma-separated line of test ids
    train_id_files: tuple = ()   # id lists whose camN/PPPP/ folders make the training set
    train_index: dict = None     # modality -> 'relative/path label' list of training images
    test_index: dict = None      # modality -> 'relative/path label' list of test images
    trials: range = None         # allowed split numbers, when the index files are per trial
    camera_folders: bool = True  # cameras named by camN folders (else one camera per modality)
    matching: str = 'none'       # eval_metrics.MATCHING_RULES key
    identity_cmc: bool = False   # CMC over distinct gallery identities (else over images)
    train_classes: int = None    # identities of the published training set (a released
                                 # checkpoint's class count names its dataset)

    @property
    def random_gallery(self):
        return self.test_index is None

    @property
    def test_trials(self):
        """The trials reported: the split numbers (RegDB), else the gallery seeds 0..9."""
        return self.trials if self.trials is not None else range(GALLERY_TRIALS)


DATASET_FACTS = {
    'sysu': DatasetFacts(
        title='SYSU-MM01',
        layout='cam1..cam6/PPPP/*.jpg and exp/{train,val,test}_id.txt',
        cameras={'visible': (1, 2, 4, 5), 'infrared': (3, 6)},
        directions=('ir_to_vis',),
        image_folders={'visible': '', 'infrared': ''},
        indoor_cameras=(1, 2),
        test_id_file='exp/test_id.txt',
        train_id_files=('exp/train_id.txt', 'exp/val_id.txt'),
        matching='cam3_ignores_cam2', identity_cmc=True, train_classes=395),
    'llcm': DatasetFacts(
        title='LLCM',
        layout='idx/{train_vis,train_nir}.txt, idx/test_id.txt, test_vis/cam1..cam9/PPPP/ and '
               'test_nir/camN/PPPP/',
        cameras={'visible': (1, 2, 3, 4, 5, 6, 7, 8, 9), 'infrared': (1, 2, 4, 5, 6, 7, 8, 9)},
        directions=('ir_to_vis', 'vis_to_ir', 'released_vis_to_ir'),
        image_folders={'visible': 'test_vis', 'infrared': 'test_nir'},
        test_id_file='idx/test_id.txt',
        train_index={'visible': 'idx/train_vis.txt', 'infrared': 'idx/train_nir.txt'},
        matching='same_id_and_camera', identity_cmc=True, train_classes=713),
    'regdb': DatasetFacts(
        title='RegDB',
        layout='Visible/, Thermal/ and idx/{train,test}_{visible,thermal}_{1..10}.txt',
        cameras={'visible': (1,), 'infrared': (2,)},
        directions=('vis_to_ir', 'ir_to_vis', 'released_routing_vis_to_ir',
                    'released_routing_ir_to_vis'),
        train_index={'visible': 'idx/train_visible_{trial}.txt',
                     'infrared': 'idx/train_thermal_{trial}.txt'},
        test_index={'visible': 'idx/test_visible_{trial}.txt',
                    'infrared': 'idx/test_thermal_{trial}.txt'},
        trials=range(1, 11), camera_folders=False, train_classes=206),
}
DATASET_ALIASES = {'demo': 'llcm'}  # the demo data uses LLCM's layout and rules
DATASETS = (*DATASET_FACTS, *DATASET_ALIASES)  # the --dataset choices of train.py and test.py
DEFAULT_DATA_PATHS = {'sysu': 'data/SYSU-MM01', 'regdb': 'data/RegDB', 'llcm': 'data/LLCM',
                      'demo': 'data/demo'}
# The order in which the identity spaces of several training datasets are merged, whatever order
# they are named in (L2RW's): RegDB's identities first, then SYSU-MM01's, then LLCM's.
SOURCE_ORDER = ('regdb', 'sysu', 'llcm')


@dataclass(frozen=True)
class ImageList:
    paths: list          # full paths (data_path joined), str
    pids: np.ndarray     # int64 identity labels
    camids: np.ndarray   # int64 camera numbers (RegDB: 1 for visible, 2 for thermal)
    modality: str        # 'visible' or 'infrared' (RegDB thermal and LLCM NIR are 'infrared')
    stem: str = None     # the modality whose stem the images pass through; default their own

    def __post_init__(self):
        if self.stem is None:
            object.__setattr__(self, 'stem', self.modality)

    def __len__(self):
        return len(self.paths)


# ----------------------------------------------------------------------------------------------
# Public API

def layout_of(dataset):
    """The dataset whose layout and rules `dataset` uses ('demo' -> 'llcm')."""
    name = DATASET_ALIASES.get(dataset, dataset)
    if name not in DATASET_FACTS:
        known = ', '.join(sorted(DATASETS))
        raise UserError(f'unknown dataset {dataset!r}; expected one of {known}.')
    return name


def dataset_facts(dataset):
    """The DatasetFacts of a dataset name or alias."""
    return DATASET_FACTS[layout_of(dataset)]


def dataset_of_class_count(count):
    """The dataset whose published training set has `count` identities, or None."""
    return next((name for name, facts in DATASET_FACTS.items() if facts.train_classes == count),
                None)


def query_gallery(dataset, direction, data_path, trial, mode='all', multi_shot=False):
    """(query, gallery) ImageLists of one test trial: the gallery seed (SYSU-MM01, LLCM) or the
    split number (RegDB). mode ('all' | 'indoor') is SYSU-MM01's search mode."""
    facts = dataset_facts(dataset)
    if direction not in facts.directions:
        raise UserError(f'unknown direction {direction!r} for {facts.title}; expected one of '
                        f'{", ".join(facts.directions)}.')
    if multi_shot and not facts.random_gallery:
        raise UserError(f'multi-shot galleries exist for SYSU-MM01 and LLCM, not {facts.title}.')
    visible_cameras = _search_cameras(facts, mode)
    _check_root(facts, data_path)
    lists = [_test_images(facts, data_path, modality, draw, trial, multi_shot,
                          visible_cameras if modality == 'visible' else None)
             for modality, draw in DIRECTION_PLANS[direction]]
    if direction in OTHER_STEM_DIRECTIONS:
        lists = [dataclasses.replace(lst, stem=OTHER_MODALITY[lst.modality]) for lst in lists]
    return tuple(lists)


def train_image_lists(dataset, data_path, trial=1):
    """{'visible': ImageList, 'infrared': ImageList} of the training images, ids relabelled
    0..N-1 in ascending order of the original id, with one mapping for both modalities."""
    facts = dataset_facts(dataset)
    _check_root(facts, data_path)
    if facts.train_index is not None:
        entries = {m: _read_index(facts, data_path, facts.train_index[m], m, trial)
                   for m in MODALITIES}
    else:
        ids = sorted({pid for name in facts.train_id_files
                      for pid in _read_ids(facts, data_path, name)})
        entries = {m: _folder_images(facts, data_path, m, ids, facts.cameras[m], 'every')
                   for m in MODALITIES}
    for modality, images in entries.items():
        if not images:
            raise UserError(f'no {modality} training images found in {data_path}; expected the '
                            f'{facts.title} layout {facts.layout}.')
    label_of = _shared_labels(facts, {m: [pid for _, pid, _ in entries[m]] for m in MODALITIES})
    return {m: _image_list([(path, label_of[pid], cam) for path, pid, cam in entries[m]], m)
            for m in MODALITIES}


@dataclass(frozen=True)
class Source:
    """One training dataset of a run on several: its name (a SOURCE_ORDER entry), its root and,
    for RegDB, its split."""
    dataset: str
    data_path: str
    trial: int = 1


@dataclass(frozen=True)
class SourceLists:
    """The training lists of one source (its own labels 0..identities-1) and the offset its labels
    take in the merged identity space."""
    source: Source
    lists: dict          # {'visible': ImageList, 'infrared': ImageList}
    identities: int
    offset: int


def ordered_sources(sources):
    """The sources in SOURCE_ORDER; a dataset named twice or outside SOURCE_ORDER is refused."""
    names = [source.dataset for source in sources]
    unknown = [name for name in names if name not in SOURCE_ORDER]
    if unknown:
        raise UserError(f'unknown training dataset {unknown[0]!r}; expected one of '
                        f'{", ".join(SOURCE_ORDER)}.')
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f'training dataset {twice[0]} is named twice; name each dataset once.')
    return sorted(sources, key=lambda source: SOURCE_ORDER.index(source.dataset))


def source_train_image_lists(sources):
    """[SourceLists] of the sources in SOURCE_ORDER: each source's training lists as
    train_image_lists reads them, and its offset, the identities of the sources before it."""
    parts, offset = [], 0
    for source in ordered_sources(sources):
        lists = train_image_lists(source.dataset, source.data_path, trial=source.trial)
        identities = int(lists['visible'].pids.max()) + 1
        parts.append(SourceLists(source, lists, identities, offset))
        offset += identities
    return parts


def merged_train_image_lists(parts):
    """{'visible': ImageList, 'infrared': ImageList} of [SourceLists]: the sources' images in
    order, each label raised by its source's offset (disjoint identities; one source: its lists
    as they are)."""
    if len(parts) == 1 and parts[0].offset == 0:
        return parts[0].lists
    merged = {}
    for modality in MODALITIES:
        lists = [part.lists[modality] for part in parts]
        merged[modality] = ImageList(
            [path for image_list in lists for path in image_list.paths],
            np.concatenate([lst.pids + part.offset for lst, part in zip(lists, parts)]),
            np.concatenate([lst.camids for lst in lists]), modality)
    return merged


def source_records(parts):
    """What a checkpoint records of its sources: [{dataset, data_path, trial (RegDB; else None),
    identities, offset}] in merge order."""
    return [{'dataset': part.source.dataset, 'data_path': part.source.data_path,
             'trial': part.source.trial if part.source.dataset == 'regdb' else None,
             'identities': part.identities, 'offset': part.offset} for part in parts]


# The names the AGW / DDAG / DEEN family calls; each returns (paths, ids, cameras).

def process_query_sysu(data_path, mode='all'):
    """Every infrared test image of SYSU-MM01 (cams 3, 6); the same for both search modes."""
    _search_cameras(DATASET_FACTS['sysu'], mode)
    return _as_tuple(_test_list('sysu', data_path, 'infrared', 'every'))


def process_gallery_sysu(data_path, mode='all', trial=0, multi_shot=False):
    """The random visible gallery of SYSU-MM01 for one trial: cams 1, 2, 4, 5 ('all') or 1, 2
    ('indoor'); one image per id and camera, or 10 with multi_shot."""
    facts = DATASET_FACTS['sysu']
    return _as_tuple(_test_list('sysu', data_path, 'visible', 'sampled', trial, multi_shot,
                                _search_cameras(facts, mode)))


def process_query_llcm(data_path, mode):
    """Every LLCM test image of one modality: mode 1 = visible, 2 = near-infrared."""
    return _as_tuple(_test_list('llcm', data_path, _llcm_modality(mode), 'every'))


def process_gallery_llcm(data_path, mode, trial=0):
    """The random LLCM gallery of one trial and modality (mode 1 = visible, 2 = near-infrared)."""
    return _as_tuple(_test_list('llcm', data_path, _llcm_modality(mode), 'sampled', trial))


def process_test_regdb(data_path, trial, modal):
    """The RegDB test images of split `trial` (1..10), modal 'visible' or 'thermal'."""
    modalities = {'visible': 'visible', 'thermal': 'infrared'}
    if modal not in modalities:
        raise UserError(f'unknown RegDB modality {modal!r}; expected visible or thermal.')
    return _as_tuple(_test_list('regdb', data_path, modalities[modal], 'every', trial))


# ----------------------------------------------------------------------------------------------
# The generic reader

def _test_list(dataset, data_path, modality, draw, trial=0, multi_shot=False, cameras=None):
    facts = DATASET_FACTS[dataset]
    _check_root(facts, data_path)
    return _test_images(facts, data_path, modality, draw, trial, multi_shot, cameras)


def _test_images(facts, root, modality, draw, trial, multi_shot, cameras=None):
    """Test images of one modality: from the split's index file, or from camN/PPPP/ folders of
    the test ids ('every' image, or the trial's 'sampled' gallery)."""
    if facts.test_index is not None:
        entries = _read_index(facts, root, facts.test_index[modality], modality, trial)
    else:
        ids = sorted(_read_ids(facts, root, facts.test_id_file))
        cameras = cameras or facts.cameras[modality]
        entries = _folder_images(facts, root, modality, ids, cameras, draw, trial, multi_shot)
    if not entries:
        where = (facts.test_index[modality].format(trial=trial) if facts.test_index else
                 os.path.join(facts.image_folders[modality], 'camN', 'PPPP'))
        raise UserError(f'no {modality} test images found in {os.path.join(root, where)}; '
                        f'expected the {facts.title} layout {facts.layout}.')
    return _image_list(entries, modality)


def _folder_images(facts, root, modality, ids, cameras, draw, trial=0, multi_shot=False):
    """[(path, id, camera)] walking ids ascending and cameras in order; where CAM/PPPP exists,
    all of its files sorted by name ('every'), or for draw='sampled' the published protocol:
    random.seed(trial), then random.choice of the sorted paths (random.sample of 10 with
    multi_shot; all of them where a folder holds no more than 10)."""
    rng = random.Random(trial)  # same stream as random.seed(trial), without touching the global one
    entries = []
    for pid in ids:
        for camera in cameras:
            folder = os.path.join(root, facts.image_folders[modality], f'cam{camera}', f'{pid:04d}')
            if not os.path.isdir(folder):
                continue
            paths = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                           if not name.startswith('.'))
            if draw == 'sampled' and paths:
                paths = _draw_gallery(rng, paths, multi_shot)
            entries.extend((path, pid, camera) for path in paths)
    return entries


def _draw_gallery(rng, paths, multi_shot):
    """The trial's gallery images of one id and camera from its sorted paths."""
    if not multi_shot:
        return [rng.choice(paths)]
    return rng.sample(paths, MULTI_SHOT_IMAGES) if len(paths) > MULTI_SHOT_IMAGES else paths


def _read_ids(facts, root, relative):
    """The ids of a one-line, comma-separated id file."""
    path = os.path.join(root, relative)
    text = _read_text(facts, root, path, 'one line of comma-separated ids')
    try:
        return [int(token) for token in text.replace('\n', ',').split(',') if token.strip()]
    except ValueError:
        raise UserError(f'{path} must hold one line of comma-separated integer ids.') from None


def _read_index(facts, root, template, modality, trial):
    """[(path, label, camera)] of a 'relative/path label' index file; the camera is the camN
    folder of the relative path, or the modality's only camera (RegDB)."""
    if facts.trials is not None:
        trial = _checked_trial(facts, trial)
    path = os.path.join(root, template.format(trial=trial))
    text = _read_text(facts, root, path, "one 'relative/path label' line per image")
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        relative, label = _index_line(line, path, number)
        camera = (_camera_folder(relative, path, number) if facts.camera_folders
                  else facts.cameras[modality][0])
        entries.append((os.path.join(root, relative), label, camera))
    return entries


def _index_line(line, path, number):
    fields = line.split()
    try:
        relative, label = fields
        return relative, int(label)
    except ValueError:
        raise UserError(f"line {number} of {path} is {line.strip()!r}; expected "
                        f"'relative/path label'.") from None


def _camera_folder(relative, index_path, number):
    """N of the camN folder in an index file's relative path (never of the data root's path)."""
    for part in reversed(relative.replace('\\', '/').split('/')[:-1]):
        found = re.fullmatch(r'cam(\d+)', part)
        if found:
            return int(found.group(1))
    raise UserError(f'line {number} of {index_path} names {relative}, which has no camN folder; '
                    f'expected paths like test_vis/cam1/0001/name.jpg.')


def _read_text(facts, root, path, content):
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        raise UserError(f'{path} does not exist; expected {content} in the {facts.title} layout '
                        f'{facts.layout} under {root}.') from None


def _check_root(facts, root):
    if not os.path.isdir(root):
        raise UserError(f'{facts.title} data root {root} does not exist; expected a folder with '
                        f'{facts.layout}.')


def _checked_trial(facts, trial):
    allowed = facts.trials
    try:
        number = int(trial)
    except (TypeError, ValueError):
        number = None
    if number is None or number not in allowed:
        raise UserError(f'{facts.title} trial {trial!r} does not exist; expected a split number '
                        f'{allowed.start}..{allowed.stop - 1}.')
    return number


def _search_cameras(facts, mode):
    """Visible gallery cameras of a search mode ('indoor' exists only where indoor cameras do)."""
    if mode not in SEARCH_MODES or (mode == 'indoor' and not facts.indoor_cameras):
        modes = 'all or indoor' if facts.indoor_cameras else 'all'
        raise UserError(f'unknown search mode {mode!r} for {facts.title}; expected {modes}.')
    return facts.indoor_cameras if mode == 'indoor' else facts.cameras['visible']


def _llcm_modality(mode):
    modalities = {1: 'visible', 2: 'infrared'}
    if mode not in modalities:
        raise UserError(f'unknown LLCM mode {mode!r}; expected 1 (visible) or 2 (near-infrared).')
    return modalities[mode]


def _shared_labels(facts, pids):
    """{original id: label} over ids ascending; every id must appear in both modalities."""
    visible, infrared = set(pids['visible']), set(pids['infrared'])
    lonely = sorted(visible ^ infrared)
    if lonely:
        shown = ', '.join(map(str, lonely[:10])) + (' ...' if len(lonely) > 10 else '')
        raise UserError(f'{facts.title} training ids {shown} appear in only one modality; '
                        f'expected every training id to have visible and infrared images.')
    return {pid: label for label, pid in enumerate(sorted(visible))}


def _image_list(entries, modality):
    paths = [path for path, _, _ in entries]
    pids = np.array([pid for _, pid, _ in entries], dtype=np.int64)
    camids = np.array([camera for _, _, camera in entries], dtype=np.int64)
    return ImageList(paths, pids, camids, modality)


def _as_tuple(image_list):
    return image_list.paths, image_list.pids, image_list.camids
