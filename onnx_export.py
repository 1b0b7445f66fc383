"""ONNX export of a trained network (any method) as test.py uses it (eval mode, flip test-time
augmentation inside the graph, per-branch L2-normalised (pooled, BNNeck) features), and its check
against PyTorch with onnxruntime."""
import copy

import numpy as np
import torch

from data_loader import IMAGENET_MEAN, IMAGENET_STD, TestImageSet
from inference import embed_batch
from methods import get_method
from utils import UserError, written_atomically

OPSET = 18
ONNX_PACKAGES = ('onnx', 'onnxruntime', 'onnxscript')  # onnxscript: torch.onnx's exporter
EXAMPLE_BATCH = 2            # the batch traced; the graph takes any batch size
TOLERANCE = {False: 1e-4, True: 1e-2}  # max |ONNX - PyTorch fp32| of a feature, by fp16


class ExportMismatch(RuntimeError):
    """The exported graph's features differ from PyTorch's by more than the tolerance."""


def require_onnx():
    """Import the optional ONNX packages, or a UserError saying what to install."""
    try:
        for package in ONNX_PACKAGES:
            __import__(package)
    except ImportError:
        raise UserError(f'ONNX export needs the optional packages {", ".join(ONNX_PACKAGES)}: '
                        f'pip install {" ".join(ONNX_PACKAGES)}.') from None


class FeatureGraph(torch.nn.Module):
    """What the graph computes: normalised images [B, 3, H, W] of each modality (one input per
    modality, in the order given) -> their features [B, 2, branches, D] as embed_batch (and so
    test.py) computes them, flip included. fp16: weights and activations in float16, inputs
    and outputs float32."""

    def __init__(self, model, modalities, fp16=False):
        super().__init__()
        self.model = copy.deepcopy(model).half() if fp16 else model
        self.modalities, self.fp16 = tuple(modalities), fp16

    def forward(self, images, second_images=None):
        batches = (images, second_images)[:len(self.modalities)]
        return tuple(embed_batch(self.model, modality, batch.half() if self.fp16 else batch)
                     for modality, batch in zip(self.modalities, batches))


def io_names(modalities):
    """(input names, output names): 'images' -> 'features' for one modality, '<modality>' ->
    '<modality>_features' for both."""
    if len(modalities) == 1:
        return ['images'], ['features']
    return list(modalities), [f'{modality}_features' for modality in modalities]


def export_onnx(model, info, modalities, path, fp16=False, opset=OPSET):
    """Write the FeatureGraph of model (eval mode, CPU) for modalities to path: a batch
    dimension of any size, the checkpoint's image size, and metadata naming the inputs' layout
    and normalisation, the output layout and the fusions."""
    graph = FeatureGraph(model.cpu().eval(), modalities, fp16).eval()
    inputs, outputs = io_names(modalities)
    example = tuple(torch.zeros(EXAMPLE_BATCH, 3, info['img_h'], info['img_w']) for _ in modalities)
    batch = tuple({0: torch.export.Dim(f'{name}_batch', min=1)} for name in inputs)
    import onnx
    with written_atomically(path) as tmp:  # a failed export leaves an earlier file as it was
        torch.onnx.export(graph, example, tmp, input_names=inputs, output_names=outputs,
                          opset_version=opset, dynamic_shapes=batch, external_data=False,
                          verbose=False)
        proto = onnx.load(tmp)
        fixed = [i.name for i in proto.graph.input
                 if i.type.tensor_type.shape.dim[0].dim_param == '']
        if fixed:
            raise ExportMismatch(f'the exported graph fixed the batch size of {", ".join(fixed)}.')
        onnx.helper.set_model_props(proto, graph_metadata(info, modalities, fp16))
        onnx.save(proto, tmp)
    return path


def graph_metadata(info, modalities, fp16):
    """Strings stored in the ONNX file: what a user needs to feed it and read its output."""
    method = get_method(info['method'])
    return {
        'method': info['method'], 'arch': info['arch'], 'modalities': ','.join(modalities),
        'input_layout': f'float32 [batch, 3, {info["img_h"]}, {info["img_w"]}] RGB, NCHW',
        'input_normalisation': f'resize to {info["img_w"]}x{info["img_h"]} (Lanczos), scale to '
                               f'[0, 1], subtract mean {IMAGENET_MEAN}, divide by std '
                               f'{IMAGENET_STD}',
        'output_layout': f'float32 [batch, 2 ({", ".join(method.feature_kinds)}), branches, D]: '
                         f'per branch the sum of the L2-normalised embeddings of the image and '
                         f'its horizontal flip',
        'fusions': '; '.join(describe_fusion(name, fusion, method.feature_kinds)
                             for name, fusion in method.fusions.items()),
        'precision': 'float16 inside, float32 inputs and outputs' if fp16 else 'float32',
    }


def describe_fusion(name, fusion, kinds):
    """A fusion in words: the weighted dot products of the two feature kinds, or a method's own
    fusion's docstring."""
    if callable(fusion):
        return f'{name}: {" ".join((fusion.__doc__ or repr(fusion)).split())}'
    first, second = kinds
    return (f'{name}: distance = -sum({fusion[0]} * {first}.{first}\' + {fusion[1]} * '
            f'{second}.{second}\')')


def onnx_session(path, threads=None):
    """An onnxruntime CPU session of an exported file (threads: intra-op threads, default all)."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def onnx_features(session, modalities, batches):
    """The graph's outputs (numpy) for one float32 batch [B, 3, H, W] per modality."""
    inputs, _ = io_names(modalities)
    return session.run(None, {name: np.ascontiguousarray(batch.numpy(), dtype=np.float32)
                              for name, batch in zip(inputs, batches)})


def torch_features(model, modalities, batches):
    """PyTorch's features (fp32, as test.py computes them) for the same batches."""
    with torch.inference_mode():
        return [embed_batch(model, modality, batch).numpy()
                for modality, batch in zip(modalities, batches)]


def image_batch(images, img_h, img_w):
    """Image files or PIL images -> one normalised batch [N, 3, img_h, img_w], as test.py
    preprocesses them."""
    dataset = TestImageSet(images, img_h, img_w)
    return torch.stack([dataset[i] for i in range(len(dataset))])


def verify_export(model, path, modalities, fp16, checks):
    """Run the ONNX file and the PyTorch model on each named check ({name: [one batch per
    modality]}); returns {name: max |difference|} and raises ExportMismatch above TOLERANCE."""
    session = onnx_session(path)
    differences = {}
    for name, batches in checks.items():
        expected = torch_features(model.cpu().eval(), modalities, batches)
        got = onnx_features(session, modalities, batches)
        differences[name] = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
    worst = max(differences.values())
    if worst > TOLERANCE[fp16]:
        raise ExportMismatch(f'the ONNX features of {path} differ from PyTorch\'s by up to '
                             f'{worst:.2e} (> {TOLERANCE[fp16]:g}): ' +
                             ', '.join(f'{n} {d:.2e}' for n, d in differences.items()))
    return differences
