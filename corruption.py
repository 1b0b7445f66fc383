"""Corrupted test images, the protocol of CIL (Chen et al., "Benchmarks for Corruption Invariant
Person Re-identification", NeurIPS 2021 Datasets and Benchmarks: SYSU-MM01-C, RegDB-C; extended
here to LLCM): the 20 corruptions at severities 1-5, the mixed set (one random corruption and
severity per image) or one cell of the grid, made reproducible: each image's corruption is a
function of the seed and the image's content only, whatever the process or worker that decodes
it. This module owns test.py's corruption flags and their checks, the optional imagecorruptions
library behind its compatibility layer (one shim per breakage, each naming the versions that need
it) and its seeding, CIL's rain (written here), the per-image draws, the cache of corrupted
images and what the results file records of them."""
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import inspect
import itertools
import os
import sys
import types
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from utils import UserError, flag, written_atomically

# CIL's list, in its order (its corruption.py): the 15 ImageNet-C corruptions of imagecorruptions,
# CIL's rain among them, then imagecorruptions' four validation corruptions.
CORRUPTIONS = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur',
               'motion_blur', 'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast',
               'elastic_transform', 'pixelate', 'rain', 'jpeg_compression', 'speckle_noise',
               'gaussian_blur', 'spatter', 'saturate')
OUR_OWN = ('rain',)  # written here; the others are imagecorruptions' functions
SEVERITIES = (1, 2, 3, 4, 5)
CIL_SIZE = (144, 288)  # (w, h) every image is resized to (Lanczos) before it is corrupted
DEFAULT_SEED = 0
MODALITIES = {'visible': ('visible',), 'infrared': ('infrared',), 'both': ('visible', 'infrared')}
LIBRARY = 'imagecorruptions'
EXTRA_REQUIREMENTS = 'requirements-corruption.txt'
CACHE_VERSION = 1  # bump when the corrupted pixels of an unchanged library would change
SYSU_TRIAL = 0     # SYSU-MM01-C tests gallery trial 0 only (CIL's test.py)

CIL_SOURCE = ('Chen et al., "Benchmarks for Corruption Invariant Person Re-identification", '
              'NeurIPS 2021 Datasets and Benchmarks; https://github.com/MinghuiChen43/CIL-ReID '
              '(README, cross-modality table) and https://github.com/Zoky-2020/CIL-CrossModal')


# ----------------------------------------------------------------------------------------------
# The flags (test.py, visualize.py) and their checks

def add_corruption_args(parser):
    """The "corruption" group of test.py and visualize.py (docs/testing.md, Corrupted images)."""
    group = parser.add_argument_group('corruption', 'corrupted test images, the CIL protocol '
                                      '(docs/testing.md)')
    group.add_argument('--corrupt', action='store_true', help='CIL\'s mixed set: each image of '
                       '--corrupt-modality gets one random corruption at a random severity')
    group.add_argument('--corruption', metavar='NAME', help='one cell of the grid: this '
                       'corruption on every image of --corrupt-modality (with --severity)')
    group.add_argument('--severity', type=int, help='severity 1..5 of --corruption')
    group.add_argument('--corrupt-seed', type=int, help=f'seed of the draws (default: '
                       f'{DEFAULT_SEED}); an image\'s corruption depends on it and the '
                       f'image\'s content only')
    group.add_argument('--corrupt-modality', choices=tuple(MODALITIES), help='the images '
                       'corrupted (default: visible, as CIL)')
    group.add_argument('--corrupt-cache', metavar='DIR', help='keep the corrupted images in this '
                       'folder (keyed by image, corruption, severity, seed) for later runs')


class Setting(NamedTuple):
    """What a corrupted test does: corruption None (the mixed set) or a name with its severity."""
    corruption: str
    severity: int
    seed: int
    modality: str
    cache_dir: str

    @property
    def mixed(self):
        return self.corruption is None

    @property
    def modalities(self):
        return MODALITIES[self.modality]

    def describe(self):
        """One line: what is corrupted, how, with which seed."""
        what = ('CIL mixed set (one random corruption and severity per image)' if self.mixed
                else f'{self.corruption} at severity {self.severity}')
        return f'corrupted {self.modality} images: {what}, seed {self.seed}'

    def tag(self):
        """A short label for file names and table titles: mixed_seed0, fog3_seed0 (+ modality
        when it is not visible)."""
        what = 'mixed' if self.mixed else f'{self.corruption}{self.severity}'
        where = '' if self.modality == 'visible' else f'_{self.modality}'
        return f'{what}{where}_seed{self.seed}'


def check_corruption_flags(args):
    """The corruption flags are coherent and the library is there; sets args.corrupted to a
    Setting (None for a clean test). Every problem is one sentence, before anything is loaded."""
    if args.corrupt and args.corruption is not None:
        raise UserError(f'pass {flag("corrupt")} (CIL\'s mixed set) or {flag("corruption")} NAME '
                        f'{flag("severity")} S (one cell), not both.')
    if not args.corrupt and args.corruption is None:
        refuse_stray_flags(args)
        args.corrupted = None
        return None
    check_severity(args)
    check_library('corrupt' if args.corrupt else 'corruption')
    args.corrupted = Setting(args.corruption, args.severity,
                             DEFAULT_SEED if args.corrupt_seed is None else args.corrupt_seed,
                             args.corrupt_modality or 'visible', args.corrupt_cache)
    return args.corrupted


def refuse_stray_flags(args):
    """A clean test takes none of the flags that set a corrupted one."""
    given = [dest for dest in ('corrupt_seed', 'corrupt_modality', 'corrupt_cache', 'severity')
             if getattr(args, dest) is not None]
    if given:
        raise UserError(f'{flag(given[0])} sets a corrupted test; add {flag("corrupt")} or '
                        f'{flag("corruption")} NAME.')


def check_severity(args):
    """--corruption NAME comes with --severity 1..5, --corrupt without one."""
    if args.corruption is not None:
        check_corruption_name(args.corruption)
        if args.severity is None:
            raise UserError(f'{flag("corruption")} {args.corruption} needs {flag("severity")} '
                            f'1..5.')
    elif args.severity is not None:
        raise UserError(f'{flag("severity")} is the severity of {flag("corruption")} NAME; '
                        f'{flag("corrupt")} draws one per image.')
    if args.severity is not None and args.severity not in SEVERITIES:
        raise UserError(f'{flag("severity")} must be 1..5, got {args.severity}.')


def check_corruption_name(name):
    if name not in CORRUPTIONS:
        raise UserError(f'{flag("corruption")} {name} is not a corruption; expected one of '
                        f'{", ".join(CORRUPTIONS)}.')


def check_library(dest='corrupt'):
    """UserError naming the extra when imagecorruptions (or one of its own dependencies) is not
    installed."""
    missing = [name for name in (LIBRARY, 'skimage', 'cv2', 'scipy')
               if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f'{flag(dest)} needs the optional package {LIBRARY} ({missing[0]} is not '
                        f'installed): pip install -r {EXTRA_REQUIREMENTS}.')


def corrupted_trials(setting, layout, trials, given):
    """The gallery trials a test runs: SYSU-MM01-C tests trial 0 only (CIL), so a corrupted
    SYSU-MM01 test keeps [0] of 'all' and refuses another trial; else the trials unchanged."""
    if setting is None or layout != 'sysu':
        return trials
    if str(given) != 'all' and trials != [SYSU_TRIAL]:
        raise UserError(f'SYSU-MM01-C tests gallery trial {SYSU_TRIAL} only (CIL\'s protocol); '
                        f'pass {flag("trial")} {SYSU_TRIAL} or leave it out.')
    return [SYSU_TRIAL]


def check_corrupted_modality(setting, image_lists, dataset):
    """UserError when the protocol's images hold none of the modality to corrupt."""
    if setting is None:
        return
    held = {image_list.modality for image_list in image_lists}
    absent = [modality for modality in setting.modalities if modality not in held]
    if absent:
        raise UserError(f'{flag("corrupt_modality")} {setting.modality}: the {dataset} protocol '
                        f'tested here has no {absent[0]} image.')


# ----------------------------------------------------------------------------------------------
# The library and its compatibility layer

class Shim(NamedTuple):
    """A fix of imagecorruptions 1.1.2 (its last release) for a newer library: what breaks
    without it, the versions that need it, and whether the installed ones do."""
    breaks: str
    needed_by: str
    needed: object  # () -> bool


def _no_pkg_resources():
    return importlib.util.find_spec('pkg_resources') is None


def _gaussian_lacks_multichannel():
    from skimage.filters import gaussian
    return 'multichannel' not in inspect.signature(gaussian).parameters


SHIMS = {
    'pkg_resources': Shim('importing the library (pkg_resources.resource_filename names the frost '
                          'images\' folder)', 'setuptools >= 82 (no pkg_resources)',
                          _no_pkg_resources),
    'np.float_': Shim('fog (its plasma fractal allocates np.float_)', 'numpy >= 2',
                      lambda: not hasattr(np, 'float_')),
    'gaussian multichannel': Shim('gaussian_blur and glass_blur (skimage.filters.gaussian('
                                  'multichannel=True))', 'scikit-image without multichannel= '
                                  '(channel_axis since 0.19, multichannel removed after its '
                                  'deprecation)', _gaussian_lacks_multichannel),
    'seeded impulse noise': Shim('repeatability of impulse_noise (skimage.util.random_noise draws '
                                 'from a generator of its own, not numpy\'s global state)',
                                 'every scikit-image version', lambda: True),
}
_copies = itertools.count()
_LOADED = {}


def needed_shims():
    """The names of the SHIMS the installed libraries need."""
    return tuple(name for name, shim in SHIMS.items() if shim.needed())


def load_corruptions(shims=None):
    """A fresh copy of imagecorruptions' corruption functions (its corruptions.py, loaded from
    the installed package without running the package's __init__, which imports them too) with
    `shims` applied (names of SHIMS; default: those the installed libraries need)."""
    shims = needed_shims() if shims is None else tuple(shims)
    unknown = set(shims) - set(SHIMS)
    if unknown:
        raise ValueError(f'unknown shims {sorted(unknown)}')
    folder = importlib.util.find_spec(LIBRARY).submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(f'_{LIBRARY}_copy{next(_copies)}',
                                                  os.path.join(folder, 'corruptions.py'))
    module = importlib.util.module_from_spec(spec)
    with _pkg_resources_stand_in(folder, 'pkg_resources' in shims), warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # scipy.ndimage.interpolation
        spec.loader.exec_module(module)
    if 'np.float_' in shims:
        module.np = _NumpyWithFloat()
    if 'gaussian multichannel' in shims:
        module.gaussian = _gaussian_with_multichannel(module.gaussian)
    if 'seeded impulse noise' in shims:
        module.sk = _SkimageWithSeededNoise(module.sk)
    return module


def library():
    """This process's shimmed copy of the library (loaded once per process)."""
    if 'module' not in _LOADED:
        _LOADED['module'] = load_corruptions()
    return _LOADED['module']


@contextlib.contextmanager
def _pkg_resources_stand_in(folder, wanted):
    """While the library is imported, a pkg_resources whose resource_filename points into the
    library's folder, when pkg_resources is not installed; removed again afterwards, so no other
    code ever sees it."""
    if not wanted or not _no_pkg_resources() or 'pkg_resources' in sys.modules:
        yield
        return
    stand_in = types.ModuleType('pkg_resources')
    stand_in.resource_filename = lambda _package, name: os.path.normpath(os.path.join(folder, name))
    sys.modules['pkg_resources'] = stand_in
    try:
        yield
    finally:
        sys.modules.pop('pkg_resources', None)


class _NumpyWithFloat(types.ModuleType):
    """numpy as the library's module sees it: everything of numpy, plus float_ = float64."""

    def __init__(self):
        super().__init__('numpy')
        self.float_ = np.float64

    def __getattr__(self, name):
        return getattr(np, name)


def _gaussian_with_multichannel(gaussian):
    """skimage.filters.gaussian taking the old multichannel=True as channel_axis=-1."""
    def gaussian_multichannel(image, *args, multichannel=None, **kwargs):
        if multichannel:
            kwargs['channel_axis'] = -1
        return gaussian(image, *args, **kwargs)
    return gaussian_multichannel


class _SkimageWithSeededNoise(types.ModuleType):
    """skimage as the library's module sees it, whose util.random_noise takes its generator's
    seed from numpy's global state (which the caller seeds) unless it is given one."""

    def __init__(self, skimage):
        super().__init__('skimage')
        self._skimage = skimage
        self.util = types.SimpleNamespace(random_noise=_seeded(skimage.util.random_noise))

    def __getattr__(self, name):
        return getattr(self._skimage, name)


def _seeded(random_noise):
    keyword = 'rng' if 'rng' in inspect.signature(random_noise).parameters else 'seed'

    def random_noise_seeded(image, *args, **kwargs):
        kwargs.setdefault(keyword, int(np.random.randint(0, 2 ** 31 - 1)))
        return random_noise(image, *args, **kwargs)
    return random_noise_seeded


def library_versions():
    """{package: version} of what makes the corrupted pixels (the cache's key and the record)."""
    versions = {}
    for package in (LIBRARY, 'scikit-image', 'numpy', 'scipy', 'opencv-python', 'pillow'):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


# ----------------------------------------------------------------------------------------------
# CIL's rain (its corruption.py: albumentations' RandomRain as of 2021, then RandomBrightness),
# written here from that description; albumentations 2.x draws rain otherwise

RAIN_TYPES = {1: 'drizzle', 2: 'heavy', 3: 'heavy', 4: 'torrential', 5: 'torrential'}
RAIN_DROPS = {'drizzle': (770, 10), 'heavy': (600, 30), 'torrential': (500, 60)}  # px/drop, length
RAIN_COLOUR = (200, 200, 200)
RAIN_SLANT = 10


def rain(image, severity, rng):
    """CIL's rain on a uint8 HxWx3 array: one streak per 770 / 600 / 500 pixels (drizzle at
    severity 1, heavy at 2-3, torrential at 4-5) of length 10 / 30 / 60, 1 px wide, colour
    (200, 200, 200), all slanted by one integer drawn in [-10, 10]; then the whole image is
    box-blurred over (2 + severity) pixels and darkened by (0.05 + 0.05 severity) x 255. Draws
    come from the numpy Generator rng."""
    from scipy.ndimage import uniform_filter
    height, width = image.shape[:2]
    per_drop, length = RAIN_DROPS[RAIN_TYPES[severity]]
    slant = int(rng.uniform(-RAIN_SLANT, RAIN_SLANT))
    count = height * width // per_drop
    xs = rng.integers(min(slant, 0), width - max(slant, 0) + 1, size=count)
    ys = rng.integers(0, max(height - length, 0) + 1, size=count)
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    for x, y in zip(xs.tolist(), ys.tolist()):
        draw.line([(x, y), (x + slant, y + length)], fill=RAIN_COLOUR, width=1)
    size = 2 + severity
    blurred = uniform_filter(np.asarray(canvas, dtype=np.float32), size=(size, size, 1),
                             mode='mirror')
    blurred = np.clip(np.round(blurred), 0, 255)
    return np.clip(blurred - (0.05 + 0.05 * severity) * 255, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Seeding: every draw is a function of (seed, image content[, corruption, severity])

DRAW_STREAM, PIXEL_STREAM = 0, 1


def image_key(path):
    """The identity of an image: the SHA-1 of its file's bytes (of a PIL image: of its mode,
    size and pixels), so the same image gets the same corruption wherever it lies."""
    digest = hashlib.sha1()
    if isinstance(path, Image.Image):
        digest.update(f'{path.mode} {path.size}'.encode())
        digest.update(path.tobytes())
    else:
        with open(path, 'rb') as handle:
            for block in iter(lambda: handle.read(1 << 20), b''):
                digest.update(block)
    return digest.hexdigest()


def _key_words(key):
    return [int(key[i:i + 8], 16) for i in range(0, len(key), 8)]


def mixed_draw(seed, key):
    """(corruption, severity) of an image in the mixed set: uniform over CORRUPTIONS and 1..5,
    from a generator seeded with (seed, the image's key)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, DRAW_STREAM, *_key_words(key)]))
    corruption = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
    return corruption, int(rng.integers(1, len(SEVERITIES) + 1))


def pixel_seed(seed, key, corruption, severity):
    """The SeedSequence of the random draws inside one corruption of one image: the same in the
    mixed set and in a cell of the grid, for the same (corruption, severity)."""
    return np.random.SeedSequence([seed, PIXEL_STREAM, *_key_words(key),
                                   CORRUPTIONS.index(corruption), severity])


@contextlib.contextmanager
def numpy_global_seeded(sequence):
    """numpy's global random state seeded from a SeedSequence for the block (the library draws
    from it), then restored as it was."""
    saved = np.random.get_state()
    np.random.seed(sequence.generate_state(8))
    try:
        yield
    finally:
        np.random.set_state(saved)


def corrupt_array(image, corruption, severity, sequence):
    """A uint8 HxWx3 array corrupted at a severity, every random draw seeded from the
    SeedSequence `sequence`; returns a new uint8 array of the same shape."""
    if corruption == 'rain':
        result = rain(image, severity, np.random.default_rng(sequence))
    else:
        function = getattr(library(), corruption)
        with numpy_global_seeded(sequence), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            result = function(Image.fromarray(np.ascontiguousarray(image)), severity)
    return np.asarray(result).astype(np.uint8)  # the library's own cast: truncation


def corrupt_image(image, corruption, severity, seed, key):
    """A PIL image resized to CIL_SIZE (Lanczos), then corrupted with the draws of (seed, key)."""
    array = np.asarray(image.convert('RGB').resize(CIL_SIZE, Image.Resampling.LANCZOS))
    return Image.fromarray(corrupt_array(array, corruption, severity,
                                         pixel_seed(seed, key, corruption, severity)))


# ----------------------------------------------------------------------------------------------
# The images of a test: which are corrupted and how (the draws), made in any worker

class Corruptor:
    """The corrupted images of an extraction, picklable for data-loader workers: plan maps an
    image path to (key, corruption, severity); image(path) decodes and corrupts it (through the
    cache folder when there is one)."""

    def __init__(self, seed, plan, cache_dir=None):
        self.seed, self.plan, self.cache_dir = seed, dict(plan), cache_dir

    def covers(self, path):
        return not isinstance(path, Image.Image) and path in self.plan

    def image(self, path):
        key, corruption, severity = self.plan[path]
        cached = self.cache_file(key, corruption, severity)
        if cached and os.path.isfile(cached):
            with Image.open(cached) as stored:
                return stored.convert('RGB')
        with Image.open(path) as original:
            corrupted = corrupt_image(original, corruption, severity, self.seed, key)
        if cached:
            with written_atomically(cached) as tmp:
                corrupted.save(tmp, format='PNG')
        return corrupted

    def cache_file(self, key, corruption, severity):
        if not self.cache_dir:
            return None
        return os.path.join(self.cache_dir, cache_version(), key[:2],
                            f'{key}_{corruption}{severity}_seed{self.seed}.png')


def cache_version():
    """The cache's subfolder: changes with CACHE_VERSION and the libraries' versions."""
    versions = ','.join(f'{name}={version}' for name, version in library_versions().items())
    return f'v{CACHE_VERSION}-' + hashlib.sha1(versions.encode()).hexdigest()[:10]


class Plan:
    """A Setting applied to the images of a run: the draws of every image of the corrupted
    modalities (keys hashed once per process), for the extraction and the results file."""

    def __init__(self, setting):
        self.setting, self.keys, self.draws = setting, {}, {}

    def draw(self, path):
        if path not in self.keys:
            self.keys[path] = image_key(path)
        key = self.keys[path]
        setting = self.setting
        corruption, severity = (mixed_draw(setting.seed, key) if setting.mixed
                                else (setting.corruption, setting.severity))
        self.draws[path] = (corruption, severity)
        return key, corruption, severity

    def corruptor(self, image_lists):
        """The Corruptor of the images of image_lists whose modality is corrupted."""
        plan = {path: self.draw(path) for image_list in image_lists
                if image_list.modality in self.setting.modalities for path in image_list.paths}
        return Corruptor(self.setting.seed, plan, self.setting.cache_dir)

    def record(self, data_path):
        """What the results file says of the corruption: the setting, the protocol's facts, the
        library versions and each corrupted image's (corruption, severity) by its path relative
        to the data folder."""
        setting = self.setting
        return {'corrupted': True, 'description': setting.describe(),
                'mode': 'mixed' if setting.mixed else 'cell', 'corruption': setting.corruption,
                'severity': setting.severity, 'seed': setting.seed, 'modality': setting.modality,
                'image_size_before_corruption': list(CIL_SIZE), 'corruptions': list(CORRUPTIONS),
                'source': CIL_SOURCE, 'libraries': library_versions(),
                'draws': {os.path.relpath(path, data_path): [corruption, severity]
                          for path, (corruption, severity) in sorted(self.draws.items())}}


def plan_of(args):
    """The run's Plan (made once, kept on args), or None for a clean test."""
    setting = getattr(args, 'corrupted', None)
    if setting is None:
        return None
    if getattr(args, 'corruption_plan', None) is None:
        args.corruption_plan = Plan(setting)
    return args.corruption_plan


def header(setting, layout):
    """The line above the tables of a corrupted test."""
    protocol = {'sysu': '; SYSU-MM01-C: gallery trial 0 only',
                'regdb': '; RegDB-C'}.get(layout, '')
    return f'{setting.describe()}{protocol}; each image resized to 144x288 before it is ' \
           f'corrupted; every image\'s (corruption, severity) is in the results file'


def corrupted_rows(rows, corruptor, folder):
    """Rank-list rows (figures.rank_list_numbers) as drawn on corrupted images: each image the
    corruptor covers is written once into folder as a PNG (at CIL's size) and the rows returned
    show that file; the given rows gain, per corrupted image, its 'corruption' [name, severity]
    and the 'shown' file."""
    written = {}

    def shown(path, entry):
        if not corruptor.covers(path):
            return path
        key, name, severity = corruptor.plan[path]
        if path not in written:
            written[path] = os.path.join(folder, f'{key[:16]}_{name}{severity}_seed'
                                                 f'{corruptor.seed}.png')
            with written_atomically(written[path]) as tmp:
                corruptor.image(path).save(tmp, format='PNG')
        entry.update(corruption=[name, severity], shown=written[path])
        return written[path]

    drawn = []
    for row in rows:
        query = {}
        drawn.append({**row, 'query': shown(row['query'], query),
                      'gallery': [{**entry, 'path': shown(entry['path'], entry)}
                                  for entry in row['gallery']]})
        if query:
            row['query_corruption'], row['query_shown'] = query['corruption'], query['shown']
    return drawn
