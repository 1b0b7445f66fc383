"""Synthetic VI-ReID datasets in the on-disk layouts of SYSU-MM01, LLCM and RegDB (DATASETS.md),
and the renderer of their drawn people: used by the tests and by `train.py --dataset demo`."""
import colorsys
import itertools
import math
import os
import pathlib
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# ----------------------------------------------------------------------------------------------
# Facts of the layouts

SYSU_CAMERAS = {'visible': (1, 2, 4, 5), 'infrared': (3, 6)}
LLCM_CAMERAS = {'visible': (1, 2, 3, 4, 5, 6, 7, 8, 9), 'infrared': (1, 2, 4, 5, 6, 7, 8, 9)}
REGDB_TRIALS = range(1, 11)
LOW_LIGHT_CAMERAS = (3, 7, 9)  # visible cameras rendered dark and noisy (LLCM-style low light)
LLCM_TAGS = {'visible': 'vis', 'infrared': 'nir'}

# The embedded demo (train.py --dataset demo trains DEEN on it at 64x32, 4 ids x 4 images, CPU).
# 60 test identities: enough that every reported column (Rank-1/5/10/20, mAP, mINP) can fall short
# of 100% (with 20, Rank-20 is 100% by construction).
DEMO_CONFIG = dict(num_train_ids=40, num_test_ids=60, images_per_camera=2, size=(64, 128),
                   seed=2023)
DEMO_MARKER = '.demo_complete'
DEMO_FOLDERS = ('train_vis', 'train_nir', 'test_vis', 'test_nir', 'idx')

IDENTITY_SEED = 20240517  # the look of identity pid depends on this and pid only
CAMERA_SEED = 977         # the look of a camera depends on this and its number only
MODALITY_CODES = {'visible': 0, 'infrared': 1, 'thermal': 2}
PATTERNS = ('plain', 'hstripes', 'vstripes', 'checks', 'dots')
VIEWS = ('front', 'back', 'side')

README_TEXT = """SYNTHETIC DATA - not the real {title}.

Written by tools/synthetic_data.py ({function}) in the on-disk layout of {title}, for tests and
the demo. The people are drawn figures: each identity has its own build, clothing colours, shirt
texture and bag. In near-infrared a garment's brightness follows a law of its dye's hue (not
the grey of its colour: dark clothes may be bright), plus a per-garment deviation; thermal
images show warm skin and garments by thickness. No image comes from the real dataset.

{summary}
"""


# ----------------------------------------------------------------------------------------------
# Identities and cameras: stable random attributes

def identity_attributes(pid):
    """The look of identity pid (depends on pid only): build, colours (RGB 0..255), shirt
    texture, lower garment, bag, and per-part near-infrared ('nir') and 'thermal' intensities
    in 0..1: NIR from nir_reflectance (a law of the dye's hue, not its brightness), thermal
    drawn independently of the colours (warm skin, garments by thickness)."""
    rng = np.random.default_rng([IDENTITY_SEED, int(pid)])
    attrs = dict(
        height=rng.uniform(0.74, 0.92),      # figure height / canvas height
        build=rng.uniform(0.75, 1.3),        # width multiplier
        head=rng.uniform(0.85, 1.2),         # head size multiplier
        legs=rng.uniform(0.42, 0.52),        # leg length / figure height
        skin=_skin_colour(rng),
        hair=_hair_colour(rng),
        long_hair=bool(rng.random() < 0.35),
        shirt=_garment_colour(rng),
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        pattern_colour=_garment_colour(rng),
        pattern_period=rng.uniform(0.12, 0.25),  # stripe/check/dot period / torso height
        long_sleeves=bool(rng.random() < 0.6),
        trousers=_garment_colour(rng),
        lower=('long', 'long', 'shorts', 'skirt')[rng.integers(4)],
        shoes=_garment_colour(rng),
        bag=('none', 'backpack', 'shoulder')[rng.integers(3)],
        bag_colour=_garment_colour(rng),
    )
    parts = ('shirt', 'pattern', 'trousers', 'shoes', 'bag')
    keys = dict(shirt='shirt', pattern='pattern_colour', trousers='trousers', shoes='shoes',
                bag='bag_colour')
    attrs['nir'] = {part: nir_reflectance(attrs[key], rng) for part, key in keys.items()}
    attrs['nir'].update(hair=float(rng.uniform(0.15, 0.45)), skin=float(rng.uniform(0.65, 0.85)))
    attrs['thermal'] = {part: float(rng.uniform(0.35, 0.75)) for part in parts}
    attrs['thermal'].update(hair=float(rng.uniform(0.4, 0.6)), skin=float(rng.uniform(0.85, 0.97)))
    return attrs


def nir_reflectance(rgb, rng):
    """Near-infrared reflectance (0..1) of a garment of visible colour rgb: a law of the dye's
    hue and saturation that ignores its brightness (a dark red may be bright in NIR, a light
    blue dark), plus a per-garment material deviation. A network can learn the law from the
    training identities; a grey conversion of the visible image does not follow it."""
    hue, sat, value = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    law = 0.5 + 0.38 * sat * math.sin(2 * math.pi * hue + 1.0) + 0.12 * (1 - sat) * (value - 0.5)
    return float(np.clip(law + rng.normal(0.0, 0.06), 0.06, 0.95))


def _garment_colour(rng):
    return _hsv_to_rgb(rng.random(), rng.uniform(0.0, 1.0) ** 0.6, rng.uniform(0.12, 0.98))


def _skin_colour(rng):
    tones = ((240, 200, 170), (225, 175, 140), (190, 140, 100), (150, 100, 70), (100, 65, 45))
    base = np.array(tones[rng.integers(len(tones))], float) * rng.uniform(0.92, 1.05)
    return tuple(int(v) for v in np.clip(base, 0, 255))


def _hair_colour(rng):
    tones = ((20, 15, 10), (60, 40, 25), (120, 80, 40), (200, 170, 110), (150, 150, 150))
    return tones[rng.integers(len(tones))]


def _hsv_to_rgb(hue, sat, value):
    sector, frac = int(hue * 6) % 6, hue * 6 - int(hue * 6)
    p, q, t = value * (1 - sat), value * (1 - frac * sat), value * (1 - (1 - frac) * sat)
    rgb = ((value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value),
           (value, p, q))[sector]
    return tuple(int(round(255 * c)) for c in rgb)


def camera_profile(camera):
    """The look of camera number `camera` (depends on the number only): viewpoint weights
    (front, back, side), illumination gain and colour cast, person scale, scene colours, NIR
    background and IR-illuminator falloff; cameras in LOW_LIGHT_CAMERAS are low-light."""
    rng = np.random.default_rng([CAMERA_SEED, int(camera)])
    return dict(
        views=rng.dirichlet((1.0, 1.0, 1.0)) * 0.6 + 0.4 / 3,
        gain=rng.uniform(0.8, 1.15),
        cast=rng.uniform(0.85, 1.15, size=3).astype(np.float32),
        scale=rng.uniform(0.85, 1.0),
        low_light=int(camera) in LOW_LIGHT_CAMERAS,
        wall=_hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.4), rng.uniform(0.35, 0.85)),
        floor=_hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.6)),
        horizon=rng.uniform(0.55, 0.8),
        nir_wall=rng.uniform(0.1, 0.45),
        nir_floor=rng.uniform(0.1, 0.4),
        nir_falloff=rng.uniform(0.3, 0.7),
    )


# ----------------------------------------------------------------------------------------------
# The renderer

def render_person(pid, camera, modality, index, rng, size):
    """A synthetic person of identity pid seen by camera number `camera` in `modality`
    ('visible', 'infrared' = NIR, or 'thermal'): an RGB PIL image of size (w, h); infrared and
    thermal images have three equal channels. `index` is not used (per-image randomness comes
    from the numpy Generator `rng`). Random numbers are drawn in the same order in every
    modality, so the same seed renders the same pose and scene in each."""
    del index
    w, h = size
    attrs, cam = identity_attributes(pid), camera_profile(camera)
    pose = _random_pose(rng, cam)
    scene = _random_scene(rng)
    noise_sigma = rng.uniform(0.01, 0.03)
    palette = _palette(attrs, cam, modality)
    scale = 2 if w < 48 else 1  # supersample small canvases so thin parts survive
    canvas = Image.new('RGB', (w * scale, h * scale))
    draw = ImageDraw.Draw(canvas)
    _draw_background(draw, w * scale, h * scale, cam, scene, palette)
    _draw_figure(draw, w * scale, h * scale, attrs, pose, palette)
    if scale != 1:
        canvas = canvas.resize((w, h), Image.BILINEAR)
    return _finish(canvas, cam, modality, pose, noise_sigma, rng)


def _random_pose(rng, cam):
    return dict(view=VIEWS[rng.choice(3, p=cam['views'])], mirror=bool(rng.random() < 0.5),
                scale=cam['scale'] * rng.uniform(0.94, 1.06),
                dx=rng.uniform(-0.07, 0.07), dy=rng.uniform(-0.03, 0.03),
                stride=rng.uniform(0.0, 0.14), swing=rng.uniform(-0.1, 0.1),
                light=rng.uniform(0.88, 1.12))


def _random_scene(rng):
    """Background clutter: boxes in relative coordinates, each a shade of the wall."""
    boxes = []
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = rng.uniform(-0.1, 0.9), rng.uniform(0.0, 0.75)
        boxes.append(dict(box=(x0, y0, x0 + rng.uniform(0.1, 0.45), y0 + rng.uniform(0.05, 0.4)),
                          shade=rng.uniform(-0.4, 0.4), ellipse=bool(rng.random() < 0.3)))
    return boxes


def _palette(attrs, cam, modality):
    """Part name -> RGB colour in `modality` (infrared/thermal: grey levels of the materials)."""
    keys = dict(skin='skin', hair='hair', shirt='shirt', pattern='pattern_colour',
                trousers='trousers', shoes='shoes', bag='bag_colour')
    if modality == 'visible':
        colours = {part: attrs[key] for part, key in keys.items()}
        colours.update(wall=cam['wall'], floor=cam['floor'])
        return colours
    if modality not in ('infrared', 'thermal'):
        raise ValueError(f"modality must be 'visible', 'infrared' or 'thermal', not {modality!r}")
    levels = dict(attrs['nir'] if modality == 'infrared' else attrs['thermal'])
    if modality == 'infrared':
        levels.update(wall=cam['nir_wall'], floor=cam['nir_floor'])
    else:
        levels.update(wall=0.15 + 0.1 * cam['nir_wall'], floor=0.1 + 0.1 * cam['nir_floor'])
    return {part: (int(255 * value),) * 3 for part, value in levels.items()}


def _shade(colour, amount):
    """Lighter (amount > 0) or darker (amount < 0) copy of an RGB colour."""
    if amount >= 0:
        return tuple(int(c + (255 - c) * amount) for c in colour)
    return tuple(int(c * (1 + amount)) for c in colour)


def _draw_background(draw, w, h, cam, scene, palette):
    horizon = int(cam['horizon'] * h)
    draw.rectangle((0, 0, w, horizon), fill=palette['wall'])
    draw.rectangle((0, horizon, w, h), fill=palette['floor'])
    for item in scene:
        x0, y0, x1, y1 = item['box']
        box = (int(x0 * w), int(y0 * h), int(x1 * w), int(y1 * h))
        (draw.ellipse if item['ellipse'] else draw.rectangle)(
            box, fill=_shade(palette['wall'], item['shade']))


def _draw_figure(draw, w, h, attrs, pose, palette):
    """Legs, textured torso, arms, head and bag, seen from the pose's viewpoint."""
    body_h = attrs['height'] * h * pose['scale']
    top = h * 0.52 - body_h / 2 + pose['dy'] * h
    cx = w * (0.5 + pose['dx'])
    side = pose['view'] == 'side'
    width = w * 0.34 * attrs['build'] * pose['scale'] * (0.62 if side else 1.0)
    head_r = body_h * 0.075 * attrs['head']
    neck, hip, foot = top + 2 * head_r, top + body_h * (1 - attrs['legs']), top + body_h
    line = max(1, int(round(w / 28)))
    flip = -1 if pose['mirror'] else 1
    backpack = attrs['bag'] == 'backpack'

    if backpack and pose['view'] == 'front':
        _draw_backpack(draw, cx, neck, hip, width, palette, line, straps_only=True)
    _draw_legs(draw, cx, hip, foot, width, pose, attrs, palette)
    _draw_torso(draw, (cx - width / 2, neck, cx + width / 2, hip), attrs, palette, line)
    _draw_arms(draw, cx, neck, hip, width, pose, attrs, palette, flip)
    _draw_head(draw, cx + (flip * head_r * 0.3 if side else 0), top, head_r, attrs, pose, palette)
    if backpack and pose['view'] != 'front':
        _draw_backpack(draw, cx - (flip * width * 0.45 if side else 0), neck, hip, width, palette,
                       line, straps_only=False)
    if attrs['bag'] == 'shoulder':
        _draw_shoulder_bag(draw, cx, neck, hip, width, palette, line, flip)


def _limb(draw, x0, y0, x1, y1, width, colour):
    """A straight limb from (x0, y0) to (x1, y1): a quadrilateral of the given width."""
    length = math.hypot(x1 - x0, y1 - y0) or 1.0
    nx, ny = -(y1 - y0) / length * width / 2, (x1 - x0) / length * width / 2
    draw.polygon([(x0 + nx, y0 + ny), (x1 + nx, y1 + ny), (x1 - nx, y1 - ny), (x0 - nx, y0 - ny)],
                 fill=colour)


def _draw_legs(draw, cx, hip, foot, width, pose, attrs, palette):
    leg_w = width * 0.36
    stride = pose['stride'] * (foot - hip)
    cut = {'long': 1.0, 'shorts': 0.4, 'skirt': 0.5}[attrs['lower']]
    for sign in (-1, 1):
        hx = cx + sign * width * 0.22
        fx = hx + sign * stride
        _limb(draw, hx, hip, fx, foot, leg_w, palette['skin'])
        _limb(draw, hx, hip, hx + (fx - hx) * cut, hip + (foot - hip) * cut, leg_w * 1.05,
              palette['trousers'])
        shoe_h = max(1.0, (foot - hip) * 0.08)
        draw.rectangle((fx - leg_w * 0.6, foot - shoe_h, fx + leg_w * 0.7, foot),
                       fill=palette['shoes'])
    if attrs['lower'] == 'skirt':
        y = hip + (foot - hip) * 0.5
        draw.polygon([(cx - width * 0.48, hip), (cx + width * 0.48, hip),
                      (cx + width * 0.7, y), (cx - width * 0.7, y)], fill=palette['trousers'])


def _draw_torso(draw, box, attrs, palette, line):
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=palette['shirt'])
    period = max(2.0 * line, attrs['pattern_period'] * (y1 - y0))
    kind, colour = attrs['pattern'], palette['pattern']
    if kind in ('hstripes', 'checks'):
        for y in np.arange(y0 + period / 2, y1, period):
            draw.rectangle((x0, y, x1, min(y1, y + period / 2 - 0.5)), fill=colour)
    if kind in ('vstripes', 'checks'):
        for x in np.arange(x0 + period / 2, x1, period):
            draw.rectangle((x, y0, min(x1, x + period / 2 - 0.5), y1), fill=colour)
    if kind == 'dots':
        r = max(0.75, period * 0.25)
        for y, x in itertools.product(np.arange(y0 + period / 2, y1 - r, period),
                                      np.arange(x0 + period / 2, x1 - r, period)):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)


def _draw_arms(draw, cx, neck, hip, width, pose, attrs, palette, flip):
    arm_w, length = width * 0.24, (hip - neck) * 1.15
    side = pose['view'] == 'side'
    sleeve = 0.95 if attrs['long_sleeves'] else 0.4
    for sign in ((flip,) if side else (-1, 1)):
        sx = cx if side else cx + sign * (width / 2 + arm_w * 0.4)
        sy = neck + arm_w * 0.4
        ex, ey = sx + sign * (width * 0.08 + pose['swing'] * length), neck + length
        _limb(draw, sx, sy, ex, ey, arm_w, palette['skin'])
        _limb(draw, sx, sy, sx + (ex - sx) * sleeve, sy + (ey - sy) * sleeve, arm_w * 1.1,
              palette['shirt'])


def _draw_head(draw, cx, top, r, attrs, pose, palette):
    box = (cx - r * 0.85, top, cx + r * 0.85, top + 2 * r)
    back = pose['view'] == 'back'
    if back:
        draw.ellipse(box, fill=palette['hair'])
    else:
        draw.ellipse(box, fill=palette['skin'])
        draw.chord((box[0], box[1], box[2], box[3] - r * 0.5), 180, 360, fill=palette['hair'])
    if attrs['long_hair']:
        strands = ([(cx - r * 0.85, top + r, cx + r * 0.85, top + 2.6 * r)] if back else
                   [(cx - r * 0.95, top + r * 0.6, cx - r * 0.6, top + 2.5 * r),
                    (cx + r * 0.6, top + r * 0.6, cx + r * 0.95, top + 2.5 * r)])
        for strand in strands:
            draw.rectangle(strand, fill=palette['hair'])


def _draw_backpack(draw, cx, neck, hip, width, palette, line, straps_only):
    height = (hip - neck) * 0.7
    if straps_only:
        for sign in (-1, 1):
            x = cx + sign * width * 0.28
            draw.line((x, neck, x, neck + height * 0.8), fill=palette['bag'], width=line)
        return
    y0 = neck + (hip - neck) * 0.08
    draw.rounded_rectangle((cx - width * 0.38, y0, cx + width * 0.38, y0 + height),
                           radius=max(1, line), fill=palette['bag'])


def _draw_shoulder_bag(draw, cx, neck, hip, width, palette, line, flip):
    x = cx + flip * width * 0.6
    torso = hip - neck
    draw.line((cx - flip * width * 0.3, neck, x, hip - torso * 0.15), fill=palette['bag'],
              width=line)
    draw.rectangle((x - width * 0.22, hip - torso * 0.25, x + width * 0.22, hip + torso * 0.1),
                   fill=palette['bag'])


def _finish(canvas, cam, modality, pose, noise_sigma, rng):
    """Camera effects, then noise: illumination and colour cast, darkness for low-light cameras
    (visible); blur and IR-illuminator falloff (infrared); strong blur (thermal)."""
    if modality != 'visible':
        radius = (0.5 if modality == 'infrared' else 1.0) * canvas.width / 48
        canvas = canvas.convert('L').filter(ImageFilter.GaussianBlur(radius))
    pixels = np.asarray(canvas, dtype=np.float32) / 255.0
    h, w = pixels.shape[:2]
    if modality == 'visible':
        pixels = pixels * (cam['gain'] * pose['light'] * cam['cast'])
        if cam['low_light']:
            pixels = pixels * 0.35 + np.array([0.02, 0.02, 0.04], np.float32)
            noise_sigma += 0.035
    elif modality == 'infrared':
        ys, xs = np.mgrid[0:h, 0:w]
        dist = ((xs - w / 2) / w) ** 2 + ((ys - h / 2) / h) ** 2
        pixels = pixels * (pose['light'] * (1 - cam['nir_falloff'] * 2.5 * dist))
        noise_sigma += 0.01
    shape = pixels.shape
    pixels = pixels + rng.normal(0.0, noise_sigma, size=shape).astype(np.float32)
    image = np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8)
    if modality != 'visible':
        image = np.repeat(image[..., None], 3, axis=2)
    return Image.fromarray(image, 'RGB')


# ----------------------------------------------------------------------------------------------
# Writing files

def image_rng(seed, pid, camera, modality, index):
    """The random stream of one image: independent of the order in which images are written."""
    return np.random.default_rng([int(seed), int(pid), int(camera), MODALITY_CODES[modality],
                                  int(index)])


def _write_image(path, render, pid, camera, modality, index, seed, size, stream=None):
    """Render one image and save it (format from the suffix). stream: the (camera, modality)
    whose random stream to use, when it is not the image's own."""
    rng = image_rng(seed, pid, *(stream or (camera, modality)), index)
    image = render(pid, camera, modality, index, rng, tuple(size))
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {'quality': 92} if path.suffix == '.jpg' else {}
    image.convert('RGB').save(path, **options)


def _write_text(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(f'{line}\n' for line in lines))


def _write_readme(root, title, function, summary):
    lines = [f'{key}: {value}' for key, value in summary.items()
             if key not in ('files', 'cameras', 'trials', 'train_labels')]
    for modality, by_id in summary.get('cameras', {}).items():
        lines.append(f'{modality} cameras by id: {by_id}')
    for trial, split in summary.get('trials', {}).items():
        lines.append(f"trial {trial}: train ids {split['train']}, test ids {split['test']}")
    text = README_TEXT.format(title=title, function=function, summary='\n'.join(lines))
    (root / 'README.txt').write_text(text)


def sparse_ids(rng, count, first=1):
    """`count` ascending ids from `first`, with gaps (about 40% of the steps skip a number)."""
    ids, pid = [], first
    for _ in range(count):
        ids.append(pid)
        pid += 1 + int(rng.random() < 0.4) + int(rng.random() < 0.15)
    return ids


def _subset(rng, cameras, low, high):
    k = int(rng.integers(low, min(high, len(cameras)) + 1))
    return sorted(int(c) for c in rng.choice(np.array(cameras), size=k, replace=False))


# ----------------------------------------------------------------------------------------------
# LLCM

def make_llcm(root, num_train_ids=6, num_test_ids=5, images_per_camera=2, size=(16, 32), seed=0,
              render=None):
    """Write an LLCM-layout dataset under `root`; returns its summary.

    Ids: num_train_ids + num_test_ids ascending 4-digit ids from 1 with gaps (sparse_ids); the
    first num_train_ids train (labels 0.. in ascending id order), the rest test.
    Cameras: every id has 2-4 of the visible cameras 1-9 and 1-3 of the NIR cameras 1, 2, 4-9
    (never NIR cam3), so ids are missing from some cameras. The first test id has VIS and NIR
    images in one same camera number; others may too. Every (id, modality, camera) present
    holds `images_per_camera` images.
    Files: {train,test}_{vis,nir}/camN/PPPP/PPPP_c0N_sXXXXXX_fXXXX_{vis,nir}.jpg (one sequence
    number per id, modality and camera); idx/train_vis.txt and idx/train_nir.txt list the
    training images as 'relative/path label'; idx/test_id.txt is one comma-separated line.
    Summary: layout, train_ids, test_ids, train_labels {pid: label}, cameras {modality: {pid:
    [cams]}}, counts {'train'|'test': {modality: images}}, same_camera_ids (test ids with VIS and
    NIR in a shared camera), images_per_camera, size, seed.
    """
    root, render = pathlib.Path(root), render or render_person
    rng = np.random.default_rng([int(seed), 1])
    ids = sparse_ids(rng, num_train_ids + num_test_ids)
    splits = {'train': ids[:num_train_ids], 'test': ids[num_train_ids:]}
    cameras = {'visible': {}, 'infrared': {}}
    for pid in ids:
        vis, nir = _llcm_cameras(rng, shared=pid in splits['test'][:1])
        cameras['visible'][pid], cameras['infrared'][pid] = vis, nir
    counts = {split: {'visible': 0, 'infrared': 0} for split in splits}
    index = {'visible': [], 'infrared': []}
    sequence = int(rng.integers(100000, 800000))
    for split, split_ids in splits.items():
        for label, pid in enumerate(split_ids):
            for modality, tag in LLCM_TAGS.items():
                for camera in cameras[modality][pid]:
                    sequence += int(rng.integers(1, 50))
                    for k in range(images_per_camera):
                        relative = (f'{split}_{tag}/cam{camera}/{pid:04d}/{pid:04d}_c{camera:02d}'
                                    f'_s{sequence:06d}_f{5 * k + 1:04d}_{tag}.jpg')
                        _write_image(root / relative, render, pid, camera, modality, k, seed, size)
                        counts[split][modality] += 1
                        if split == 'train':
                            index[modality].append(f'{relative} {label}')
    _write_text(root / 'idx' / 'train_vis.txt', index['visible'])
    _write_text(root / 'idx' / 'train_nir.txt', index['infrared'])
    _write_text(root / 'idx' / 'test_id.txt', [','.join(map(str, splits['test']))])
    summary = dict(layout='llcm', train_ids=splits['train'], test_ids=splits['test'],
                   train_labels={pid: n for n, pid in enumerate(splits['train'])},
                   cameras=cameras, counts=counts,
                   same_camera_ids=[pid for pid in splits['test'] if
                                    set(cameras['visible'][pid]) & set(cameras['infrared'][pid])],
                   images_per_camera=images_per_camera, size=tuple(size), seed=seed)
    _write_readme(root, 'LLCM', 'make_llcm', summary)
    return summary


def _llcm_cameras(rng, shared):
    """(visible cameras, NIR cameras) of one id; shared: at least one camera in both."""
    vis = _subset(rng, LLCM_CAMERAS['visible'], 2, 4)
    nir = _subset(rng, LLCM_CAMERAS['infrared'], 1, 3)
    if shared and not set(vis) & set(nir):
        common = [c for c in vis if c in LLCM_CAMERAS['infrared']]  # vis has >= 2, so not empty
        nir = sorted(set(nir) | {common[0]})
    return vis, nir


# ----------------------------------------------------------------------------------------------
# SYSU-MM01

def make_sysu(root, num_train_ids=4, num_val_ids=2, num_test_ids=4, images_per_camera=2,
              size=(16, 32), seed=0, render=None):
    """Write a SYSU-MM01-layout dataset under `root`; returns its summary.

    Ids: train, then val, then test ids, ascending from 1 with gaps (sparse_ids), listed in
    exp/train_id.txt, exp/val_id.txt, exp/test_id.txt (one comma-separated line, no padding).
    Cameras: visible 1, 2, 4, 5 and infrared 3, 6; each id has a random non-empty subset of
    each (so ids are missing from some cameras). Every test id has an indoor (1|2) and an
    outdoor (4|5) visible camera. The first test id has visible cams 1, 2, 4 and IR cams 3, 6;
    the second (when num_test_ids >= 2) visible cams 2, 5 and IR cam 3 only, so in the indoor
    search its cam3 queries have no match left once cam2 is ignored.
    Files: camN/PPPP/NNNN.jpg, NNNN = 0001.., `images_per_camera` per id and camera.
    Summary: layout, train_ids, val_ids, test_ids, cameras {modality: {pid: [cams]}}, counts
    {'train'|'val'|'test': {modality: images}}, images_per_camera, size, seed.
    """
    root, render = pathlib.Path(root), render or render_person
    rng = np.random.default_rng([int(seed), 2])
    ids = sparse_ids(rng, num_train_ids + num_val_ids + num_test_ids)
    bounds = (num_train_ids, num_train_ids + num_val_ids)
    splits = {'train': ids[:bounds[0]], 'val': ids[bounds[0]:bounds[1]], 'test': ids[bounds[1]:]}
    cameras = {'visible': {}, 'infrared': {}}
    for pid in ids:
        cameras['visible'][pid] = _subset(rng, SYSU_CAMERAS['visible'], 1, 4)
        cameras['infrared'][pid] = _subset(rng, SYSU_CAMERAS['infrared'], 1, 2)
    for n, pid in enumerate(splits['test']):
        cameras['visible'][pid], cameras['infrared'][pid] = _sysu_test_cameras(
            rng, n, cameras['visible'][pid], cameras['infrared'][pid])
    counts = {split: {'visible': 0, 'infrared': 0} for split in splits}
    for split, split_ids in splits.items():
        for pid, modality in itertools.product(split_ids, ('visible', 'infrared')):
            for camera in cameras[modality][pid]:
                for k in range(images_per_camera):
                    path = root / f'cam{camera}' / f'{pid:04d}' / f'{k + 1:04d}.jpg'
                    _write_image(path, render, pid, camera, modality, k, seed, size)
                    counts[split][modality] += 1
        _write_text(root / 'exp' / f'{split}_id.txt', [','.join(map(str, split_ids))])
    summary = dict(layout='sysu', train_ids=splits['train'], val_ids=splits['val'],
                   test_ids=splits['test'], cameras=cameras, counts=counts,
                   images_per_camera=images_per_camera, size=tuple(size), seed=seed)
    _write_readme(root, 'SYSU-MM01', 'make_sysu', summary)
    return summary


def _sysu_test_cameras(rng, n, visible, infrared):
    """(visible, infrared) cameras of the n-th test id (see make_sysu)."""
    if n == 0:
        return [1, 2, 4], [3, 6]
    if n == 1:
        return [2, 5], [3]
    cams = set(visible)
    if not cams & {1, 2}:
        cams.add(int(rng.choice([1, 2])))
    if not cams & {4, 5}:
        cams.add(int(rng.choice([4, 5])))
    return sorted(cams), infrared


# ----------------------------------------------------------------------------------------------
# RegDB

def make_regdb(root, num_ids=8, images_per_modality=10, size=(16, 32), seed=0, render=None):
    """Write a RegDB-layout dataset under `root`; returns its summary.

    Ids 1..num_ids (contiguous, as RegDB), each with `images_per_modality` visible images
    Visible/ID/{male|female}_{front|back}_v_XXXXX_ID.bmp and as many thermal twins
    Thermal/ID/..._t_XXXXX_ID.bmp (same running number XXXXX, same pose and scene as from
    RegDB's dual camera); rendered as camera 1 'visible' and camera 2 'thermal'.
    Trials T = 1..10: idx/{train,test}_{visible,thermal}_T.txt, lines 'relative/path label';
    each trial a random split into num_ids // 2 train ids and the rest test ids, different
    from the other trials' when enough splits exist; labels 0-based in ascending id order
    within each half; lines in id, then image order.
    Summary: layout, ids, trials {T: {'train': ids, 'test': ids}}, files {'visible'|'thermal':
    {pid: [relative paths]}}, images_per_modality, size, seed.
    """
    root, render = pathlib.Path(root), render or render_person
    rng = np.random.default_rng([int(seed), 3])
    ids = list(range(1, num_ids + 1))
    files = {'visible': {}, 'thermal': {}}
    number = int(rng.integers(1, 500))
    for pid in ids:
        prefix = f"{('male', 'female')[rng.integers(2)]}_{('front', 'back')[rng.integers(2)]}"
        files['visible'][pid], files['thermal'][pid] = [], []
        for k in range(images_per_modality):
            number += 1
            for modality, folder, tag, camera in (('visible', 'Visible', 'v', 1),
                                                  ('thermal', 'Thermal', 't', 2)):
                relative = f'{folder}/{pid}/{prefix}_{tag}_{number:05d}_{pid}.bmp'
                _write_image(root / relative, render, pid, camera, modality, k, seed, size,
                             stream=(1, 'visible'))
                files[modality][pid].append(relative)
    trials = regdb_splits(rng, ids)
    for trial, split in trials.items():
        for part, modality in itertools.product(('train', 'test'), ('visible', 'thermal')):
            lines = [f'{path} {label}' for label, pid in enumerate(split[part])
                     for path in files[modality][pid]]
            _write_text(root / 'idx' / f'{part}_{modality}_{trial}.txt', lines)
    summary = dict(layout='regdb', ids=ids, trials=trials, files=files,
                   images_per_modality=images_per_modality, size=tuple(size), seed=seed)
    _write_readme(root, 'RegDB', 'make_regdb', summary)
    return summary


def regdb_splits(rng, ids):
    """{T: {'train': ids, 'test': ids}} for T = 1..10: halves in ascending order, pairwise
    different when the ids allow that many splits."""
    possible = math.comb(len(ids), len(ids) // 2)
    trials, seen = {}, set()
    for trial in REGDB_TRIALS:
        while True:
            train = tuple(sorted(int(p) for p in rng.choice(ids, len(ids) // 2, replace=False)))
            if train not in seen or len(seen) >= possible:
                break
        seen.add(train)
        trials[trial] = {'train': list(train), 'test': [p for p in ids if p not in train]}
    return trials


# ----------------------------------------------------------------------------------------------
# The demo

def make_demo_dataset(root):
    """The demo dataset under `root`: make_llcm(**DEMO_CONFIG), written once. The marker file
    DEMO_MARKER is written last; a root that has it is returned untouched. After an interrupted
    attempt, the dataset's own folders are cleared and written again. Returns root as a Path."""
    root = pathlib.Path(root)
    marker = root / DEMO_MARKER
    if marker.is_file():
        return root
    for name in DEMO_FOLDERS:
        if (root / name).is_dir():
            shutil.rmtree(root / name)
    summary = make_llcm(root, **DEMO_CONFIG)
    marker.write_text(f"{DEMO_CONFIG}\nimages: {summary['counts']}\n")
    return root


# ----------------------------------------------------------------------------------------------
# An LLCM-sized folder for the benchmarks that time work on the whole training set

def add_llcm_sized_args(parser):
    """--data-path, --train-ids and --images-per-camera: the folder a benchmark runs on."""
    parser.add_argument('--data-path',
                        help='an existing LLCM-layout folder (default: generate one)')
    parser.add_argument('--train-ids', type=int, default=680,
                        help='training identities of the synthetic folder')
    parser.add_argument('--images-per-camera', type=int, default=9,
                        help='images per identity and camera')


def llcm_sized_folder(args, scratch, size):
    """args.data_path, or an LLCM-layout folder of args' size generated under scratch with images
    of size=(w, h) (its counts and generation time printed)."""
    if args.data_path is not None:
        return args.data_path
    data_path = os.path.join(scratch, 'llcm')
    start = time.perf_counter()
    summary = make_llcm(data_path, num_train_ids=args.train_ids, num_test_ids=10,
                        images_per_camera=args.images_per_camera, size=size, seed=1)
    print(f'generated {summary["counts"]} in {time.perf_counter() - start:.1f} s')
    return data_path
