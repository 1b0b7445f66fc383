"""Synthetic VI-ReID datasets in the on-disk layouts of SYSU-MM01, RegDB and LLCM, for the tests
and the embedded demo: drawn people whose identity survives the change of modality."""
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

LLCM_CAMERAS = {'visible': list(range(1, 10)), 'infrared': [1, 2, 4, 5, 6, 7, 8, 9]}
SYSU_CAMERAS = {'visible': [1, 2, 4, 5], 'infrared': [3, 6]}
LOW_LIGHT_CAMERAS = {3, 6, 9}  # LLCM-style visible cameras that see a dark, noisy scene
DEMO_MARKER = '.demo_complete'


@dataclass(frozen=True)
class Person:
    """What stays the same across cameras and modalities: build, clothes and how they reflect
    near-infrared light (which follows the material, not the visible colour)."""
    width: float
    leg: float
    head: float
    shirt: tuple
    trousers: tuple
    shoes: tuple
    hair: tuple
    texture: int  # 0 plain, 1 stripes, 2 checks, 3 dots
    texture_colour: tuple
    bag: int      # 0 none, 1 left, 2 right
    nir: dict     # garment -> reflectance in [0.1, 1]


def person(pid):
    """The attributes of identity pid, from a generator seeded by pid alone."""
    rng = np.random.default_rng([20230318, pid])
    colour = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))  # noqa: E731
    return Person(width=rng.uniform(0.28, 0.44), leg=rng.uniform(0.36, 0.5), head=rng.uniform(0.07, 0.1),
                  shirt=colour(), trousers=colour(), shoes=colour(), hair=colour(),
                  texture=int(rng.integers(0, 4)), texture_colour=colour(), bag=int(rng.integers(0, 3)),
                  nir={part: float(rng.uniform(0.1, 1.0))
                       for part in ('shirt', 'trousers', 'shoes', 'hair', 'texture', 'bag', 'skin')})


def render_person(pid, camera, modality, index, rng, size):
    """One image of identity pid seen by camera in modality ('visible' or 'infrared')."""
    width, height = size
    who = person(pid)
    visible = modality == 'visible'
    light = 0.35 if visible and camera in LOW_LIGHT_CAMERAS else rng.uniform(0.75, 1.1)

    def paint(part, rgb):
        if visible:
            return tuple(int(min(255, c * light)) for c in rgb)
        level = int(min(255, 40 + 215 * who.nir[part] * rng.uniform(0.85, 1.1)))
        return (level, level, level)

    image = Image.new('RGB', size, _background(camera, visible, rng))
    draw = ImageDraw.Draw(image)
    for _ in range(3):  # clutter
        x, y = rng.integers(0, width, 2), rng.integers(0, height, 2)
        shade = tuple(int(v) for v in rng.integers(0, 120 if visible else 70, 3))
        draw.rectangle([min(x), min(y), max(x), max(y)], fill=shade if visible else (shade[0],) * 3)
    scale = rng.uniform(0.85, 1.0)
    cx = width / 2 + rng.uniform(-0.08, 0.08) * width
    top = height * (0.04 + rng.uniform(0, 0.05))
    body_h = height * 0.9 * scale
    head_r = who.head * body_h
    torso_w = who.width * width * scale
    torso_top = top + 2 * head_r
    legs_top = top + body_h * (1 - who.leg)
    feet = top + body_h
    draw.ellipse([cx - head_r, top, cx + head_r, top + 2 * head_r], fill=paint('skin', (224, 180, 150)))
    draw.rectangle([cx - head_r, top, cx + head_r, top + head_r * 0.7], fill=paint('hair', who.hair))
    draw.rectangle([cx - torso_w / 2, torso_top, cx + torso_w / 2, legs_top], fill=paint('shirt', who.shirt))
    _draw_texture(draw, who, paint('texture', who.texture_colour),
                  (cx - torso_w / 2, torso_top, cx + torso_w / 2, legs_top))
    gap = max(1.0, torso_w * 0.08)
    for side in (-1, 1):
        x0 = cx + side * gap / 2
        x1 = cx + side * torso_w * 0.45
        draw.rectangle([min(x0, x1), legs_top, max(x0, x1), feet - body_h * 0.04],
                       fill=paint('trousers', who.trousers))
        draw.rectangle([min(x0, x1), feet - body_h * 0.04, max(x0, x1), feet], fill=paint('shoes', who.shoes))
    if who.bag:
        side = -1 if who.bag == 1 else 1
        bx = cx + side * (torso_w / 2 + torso_w * 0.15)
        draw.rectangle([bx - torso_w * 0.15, torso_top + body_h * 0.15, bx + torso_w * 0.15,
                        torso_top + body_h * 0.35], fill=paint('bag', (90, 60, 30)))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _sensor(image, visible, camera, rng)


def _background(camera, visible, rng):
    base = np.random.default_rng([7, camera, visible]).integers(40, 200, 3)
    if not visible:
        return (int(base.mean() * 0.4),) * 3
    scale = 0.3 if camera in LOW_LIGHT_CAMERAS else 1.0
    return tuple(int(c * scale * rng.uniform(0.9, 1.1)) for c in base)


def _draw_texture(draw, who, colour, box):
    x0, y0, x1, y1 = box
    step = max(2.0, (y1 - y0) / 5)
    if who.texture == 1:
        for y in np.arange(y0, y1, step):
            draw.rectangle([x0, y, x1, y + step / 2.5], fill=colour)
    elif who.texture == 2:
        for y in np.arange(y0, y1, step):
            for x in np.arange(x0, x1, step):
                if int((x - x0) / step + (y - y0) / step) % 2:
                    draw.rectangle([x, y, x + step / 2, y + step / 2], fill=colour)
    elif who.texture == 3:
        for y in np.arange(y0 + step / 2, y1, step):
            draw.ellipse([x0 + (x1 - x0) / 3, y - step / 4, x0 + 2 * (x1 - x0) / 3, y + step / 4], fill=colour)


def _sensor(image, visible, camera, rng):
    """Sensor noise: low-light visible cameras and infrared are noisy; infrared is also blurred."""
    if not visible:
        image = image.filter(ImageFilter.GaussianBlur(0.6))
    noise = 25 if (not visible or camera in LOW_LIGHT_CAMERAS) else 8
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0, noise, pixels.shape[:2] + ((1,) if not visible else (3,)))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# Layouts

def _save(root, relative, image):
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, quality=92) if path.endswith('.jpg') else image.save(path)


def _write(root, relative, text):
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as handle:
        handle.write(text)


def _readme(root, name):
    _write(root, 'README.txt', f'Synthetic {name}-layout data written by tools/synthetic_data.py '
                               f'for tests and the demo; not real people.\n')


def _cameras(rng, cameras, low, high, required=()):
    count = int(rng.integers(low, min(high, len(cameras)) + 1))
    chosen = set(rng.choice(cameras, count, replace=False).tolist()) | set(required)
    return sorted(chosen)


def make_llcm(root, num_train_ids=6, num_test_ids=5, images_per_camera=2, size=(16, 32), seed=0,
              render=None):
    """LLCM layout: idx/train_vis.txt, idx/train_nir.txt ('relative/path label'), idx/test_id.txt,
    train_{vis,nir}/camN/PPPP/PPPP_c0N_sXXXXXX_fXXXX_{vis,nir}.jpg and test_{vis,nir}/... .
    Ids: train 1..num_train_ids, test the next num_test_ids; visible cameras 1-9, infrared 1, 2,
    4-9 (no NIR cam3); each id is seen by 2-4 cameras per modality, the first test id by camera 1
    in both modalities. Returns {'train_ids', 'test_ids', 'cameras': {pid: {modality: [cams]}},
    'counts': {'train_vis', 'train_nir', 'test_vis', 'test_nir'}}."""
    render = render or render_person
    rng = np.random.default_rng(seed)
    train_ids = list(range(1, num_train_ids + 1))
    test_ids = list(range(num_train_ids + 1, num_train_ids + num_test_ids + 1))
    summary = {'train_ids': train_ids, 'test_ids': test_ids, 'cameras': {},
               'counts': {'train_vis': 0, 'train_nir': 0, 'test_vis': 0, 'test_nir': 0}}
    index = {'visible': [], 'infrared': []}
    for split, ids in (('train', train_ids), ('test', test_ids)):
        for label, pid in enumerate(ids):
            summary['cameras'][pid] = {}
            for modality, tag in (('visible', 'vis'), ('infrared', 'nir')):
                required = (1,) if pid == test_ids[0] else ()
                cameras = _cameras(rng, LLCM_CAMERAS[modality], 2, 4, required)
                summary['cameras'][pid][modality] = cameras
                for cam in cameras:
                    for k in range(images_per_camera):
                        name = f'{pid:04d}_c{cam:02d}_s{int(rng.integers(1e6)):06d}_f{k:04d}_{tag}.jpg'
                        relative = f'{split}_{tag}/cam{cam}/{pid:04d}/{name}'
                        _save(root, relative, render(pid, cam, modality, k, rng, size))
                        summary['counts'][f'{split}_{tag}'] += 1
                        if split == 'train':
                            index[modality].append(f'{relative} {label}')
    _write(root, 'idx/train_vis.txt', '\n'.join(index['visible']) + '\n')
    _write(root, 'idx/train_nir.txt', '\n'.join(index['infrared']) + '\n')
    _write(root, 'idx/test_id.txt', ','.join(map(str, test_ids)) + '\n')
    _readme(root, 'LLCM')
    return summary


def make_sysu(root, num_train_ids=4, num_val_ids=2, num_test_ids=4, images_per_camera=2,
              size=(16, 32), seed=0, render=None):
    """SYSU-MM01 layout: camN/PPPP/NNNN.jpg (cams 1, 2, 4, 5 visible; 3, 6 infrared) and
    exp/{train,val,test}_id.txt. Ids are odd numbers 1, 3, 5, ... (train, then val, then test).
    Every id has a visible and an infrared camera; every test id has an indoor (1 or 2) and an
    outdoor (4 or 5) visible camera; the first test id is seen by all six cameras."""
    render = render or render_person
    rng = np.random.default_rng(seed)
    ids = [2 * k + 1 for k in range(num_train_ids + num_val_ids + num_test_ids)]
    splits = {'train': ids[:num_train_ids], 'val': ids[num_train_ids:num_train_ids + num_val_ids],
              'test': ids[num_train_ids + num_val_ids:]}
    summary = {f'{name}_ids': value for name, value in splits.items()}
    summary['cameras'], summary['counts'] = {}, {'visible': 0, 'infrared': 0}
    for pid in ids:
        if pid == splits['test'][0]:
            cams = {'visible': [1, 2, 4, 5], 'infrared': [3, 6]}
        else:
            indoor_outdoor = ((int(rng.choice([1, 2])), int(rng.choice([4, 5])))
                              if pid in splits['test'] else ())
            cams = {'visible': _cameras(rng, SYSU_CAMERAS['visible'], 1, 3, indoor_outdoor),
                    'infrared': _cameras(rng, SYSU_CAMERAS['infrared'], 1, 2)}
        summary['cameras'][pid] = cams
        for modality, cameras in cams.items():
            for cam in cameras:
                for k in range(images_per_camera):
                    _save(root, f'cam{cam}/{pid:04d}/{k + 1:04d}.jpg', render(pid, cam, modality, k, rng, size))
                    summary['counts'][modality] += 1
    for name, members in splits.items():
        _write(root, f'exp/{name}_id.txt', ','.join(map(str, members)) + '\n')
    _readme(root, 'SYSU-MM01')
    return summary


def make_regdb(root, num_ids=8, images_per_modality=10, size=(16, 32), seed=0, render=None):
    """RegDB layout: Visible/ID/{male,female}_front_v_NNNNN_ID.bmp, Thermal/ID/..._t_... and
    idx/{train,test}_{visible,thermal}_{1..10}.txt. Trial T splits ids 1..num_ids in halves at
    random (seeded by T); labels are 0-based in ascending id order within each half."""
    render = render or render_person
    rng = np.random.default_rng(seed)
    files = {'visible': {}, 'thermal': {}}
    counter = 0
    for pid in range(1, num_ids + 1):
        gender = 'male' if pid % 2 else 'female'
        for modality, folder, tag in (('visible', 'Visible', 'v'), ('thermal', 'Thermal', 't')):
            files[modality][pid] = []
            for k in range(images_per_modality):
                counter += 1
                relative = f'{folder}/{pid}/{gender}_front_{tag}_{counter:05d}_{pid}.bmp'
                image = render(pid, 1 if modality == 'visible' else 2,
                               'visible' if modality == 'visible' else 'infrared', k, rng, size)
                _save(root, relative, image)
                files[modality][pid].append(relative)
    splits = {}
    for trial in range(1, 11):
        order = np.random.default_rng([seed, trial]).permutation(np.arange(1, num_ids + 1))
        halves = {'train': sorted(order[:num_ids // 2].tolist()), 'test': sorted(order[num_ids // 2:].tolist())}
        splits[trial] = halves
        for split, members in halves.items():
            for modality in ('visible', 'thermal'):
                lines = [f'{path} {label}' for label, pid in enumerate(members)
                         for path in files[modality][pid]]
                _write(root, f'idx/{split}_{modality}_{trial}.txt', '\n'.join(lines) + '\n')
    _readme(root, 'RegDB')
    return {'ids': list(range(1, num_ids + 1)), 'splits': splits, 'files': files}


# The embedded demo (README): small enough to train on two CPU cores in minutes.
DEMO = dict(num_train_ids=32, num_test_ids=16, images_per_camera=2, size=(32, 64), seed=2023)


def make_demo_dataset(root):
    """Write the demo dataset (LLCM layout) into root once; later calls find the marker file
    written last and return at once. Returns root."""
    if os.path.exists(os.path.join(root, DEMO_MARKER)):
        return root
    make_llcm(root, **DEMO)
    _write(root, DEMO_MARKER, 'complete\n')
    return root
