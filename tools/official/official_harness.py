"""Import the official VideoLights code (github dpaul06/VideoLights) from a scratch checkout and run it on a CPU.

The side-by-side checks in tools/ and tests/ use this module; the package never does. No official code is in this
repository: `tools/official/setup.sh SOURCE [DEST]` makes the checkout and its Python environment, and the checks
find them through two environment variables (or a command-line option that overrides them):

* `VIDEOLIGHTS_OFFICIAL`: the checkout (the folder holding `video_lights/`, `utils/`, `standalone_eval/`);
* `VIDEOLIGHTS_OFFICIAL_PY`: the interpreter of its environment, for the checks that run the official code in a
  child process (its evaluator needs scikit-learn, its loops tqdm); default: `venv/bin/python` beside the checkout.

What the official code needs to run here, done at run time without editing any of its files:

* Imported-but-unused modules that may be missing (`pandas` for `dict_to_markdown`, `torchtext` for the GloVe
  variant of Charades, `fvcore` for a FLOP counter, `torch.utils.tensorboard`) get empty stand-ins while the
  official modules are imported; the stand-ins leave `sys.modules` afterwards (torch's own import scans must not
  see a fake package). `SummaryWriter` becomes a writer that records nothing.
* The decoder moves its zero target with an unconditional `.cuda()` (video_lights/transformer.py,
  `VLTransformer.forward`): on a machine without CUDA `Tensor.cuda` returns the tensor itself, and a model built
  by `build` runs its forward with that rule on a GPU machine too, so that the official model stays on the CPU.
* Its checkpoints hold the options as an `argparse.Namespace`; `torch.load` (safe by default since torch 2.6)
  is told that this one class may be rebuilt.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import os
import random
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ENV, ENV_PY = 'VIDEOLIGHTS_OFFICIAL', 'VIDEOLIGHTS_OFFICIAL_PY'
COMPARED_COMMIT = '76308bb0ad007981bd58f393ad0bbb8f07720953'
SETUP_HINT = ("make one with `bash tools/official/setup.sh GIT_DIR_OR_URL [DEST]` and export the "
              f"{ENV} (and {ENV_PY}) it prints")
MODULES = ('model', 'matcher', 'config', 'start_end_dataset', 'transformer', 'span_utils')
# feature widths of the two QVHighlights variants, before the options code adds the 2 TEF dims
VARIANTS = {'sf_clip': dict(v_dims=(2304, 512), t_dims=(512,)),                  # qvhl/train.sh with slowfast_clip
            'sf_clip_blip': dict(v_dims=(2304, 512, 768), t_dims=(512, 768))}    # the released qvhl/train.sh


# ---------------------------------------------------------------------------------------------------------------
# where the checkout and its interpreter are
# ---------------------------------------------------------------------------------------------------------------
def checkout(path: str | os.PathLike | None = None) -> Path | None:
    "The official checkout: `path`, else $VIDEOLIGHTS_OFFICIAL; None when neither is set or it is not a checkout."
    p = path or os.environ.get(ENV)
    if not p: return None
    p = Path(p).expanduser().resolve()
    return p if (p / 'video_lights' / 'model.py').is_file() else None


def require_checkout(path: str | os.PathLike | None = None) -> Path:
    "The official checkout, or a FileNotFoundError that says how to make one."
    p = checkout(path)
    if p is None:
        given = path or os.environ.get(ENV)
        where = f"{given} is not a checkout of dpaul06/VideoLights (no video_lights/model.py)" if given else \
            f"no official checkout given (--official or ${ENV})"
        raise FileNotFoundError(f"{where}; {SETUP_HINT}")
    return p


def python(path: str | os.PathLike | None = None, official: str | os.PathLike | None = None) -> str | None:
    "The official environment's interpreter: `path`, $VIDEOLIGHTS_OFFICIAL_PY, or venv/bin/python beside the checkout."
    p = path or os.environ.get(ENV_PY)
    if p: return str(p) if Path(p).exists() else None
    co = checkout(official)
    if co is None: return None
    guess = co.parent / 'venv' / 'bin' / 'python'
    return str(guess) if guess.exists() else None


def require_environment(official: str | os.PathLike | None = None,
                        official_python: str | os.PathLike | None = None) -> tuple[str, str]:
    "The official checkout and its interpreter, or a FileNotFoundError that says what is missing and how to make it."
    co = str(require_checkout(official))
    py = python(official_python, co)
    if py is None: raise FileNotFoundError(f"no interpreter for the official code; {SETUP_HINT}")
    return co, py


def missing(need_python: bool = False) -> str | None:
    "Why a check that needs the official code cannot run here (None when it can): the reason for `pytest.skip`."
    if checkout() is None:
        given = os.environ.get(ENV)
        return (f"${ENV}={given} is not an official checkout" if given else f"${ENV} is not set") + f"; {SETUP_HINT}"
    if need_python and python() is None:
        return f"no interpreter for the official code (${ENV_PY} unset or missing); {SETUP_HINT}"
    return None


def commit(path: str | os.PathLike | None = None) -> str | None:
    "The commit of the checkout, as setup.sh recorded it."
    f = require_checkout(path) / 'OFFICIAL_COMMIT'
    return f.read_text().strip() if f.is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# importing it
# ---------------------------------------------------------------------------------------------------------------
class _NullWriter:
    "Stand-in for tensorboard's SummaryWriter: accepts every call, writes nothing."
    def __init__(self, *a, **k): pass
    def __getattr__(self, name): return lambda *a, **k: None


def _stand_in(name: str, added: list, **attrs):
    "An empty module `name` in sys.modules when the real one cannot be imported; recorded in `added`."
    try:
        return importlib.import_module(name)
    except Exception:
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        parent, _, child = name.rpartition('.')
        if parent in sys.modules: setattr(sys.modules[parent], child, m)
        sys.modules[name] = m
        added.append(name)
        return m


def _cuda_is_identity_without_cuda():
    """On a machine without CUDA, `Tensor.cuda` returns the tensor itself (the official decoder calls it
    unconditionally)."""
    import torch
    if torch.cuda.is_available() or getattr(torch.Tensor.cuda, '_official_harness', False): return
    def cuda(self, *a, **k): return self
    cuda._official_harness = True
    torch.Tensor.cuda = cuda


@contextlib.contextmanager
def cuda_is_identity():
    "`Tensor.cuda` returns the tensor itself inside this block (keeps an official model on the CPU of a GPU machine)."
    import torch
    real = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try: yield
    finally: torch.Tensor.cuda = real


def allow_namespace_checkpoints():
    "Let `torch.load` (weights_only) rebuild the `argparse.Namespace` that official checkpoints store as `opt`."
    import torch
    torch.serialization.add_safe_globals([argparse.Namespace])


def load(path: str | os.PathLike | None = None, modules: tuple = MODULES, extra: tuple = ()) -> SimpleNamespace:
    """Import the official modules (`video_lights.NAME` for NAME in `modules`, plus dotted names in `extra`, e.g.
    'video_lights.train', 'standalone_eval.eval') from the checkout. Returns a namespace: one attribute per module
    (`dataset` for `start_end_dataset`; `extra` names by their last part), `path`, `commit`, `basic_utils`."""
    import torch
    root = require_checkout(path)
    added: list = []
    for name in ('pandas', 'torchtext', 'torchtext.vocab', 'torch.utils.tensorboard'):
        _stand_in(name, added, SummaryWriter=_NullWriter)
    for name in ('fvcore', 'fvcore.nn'):
        _stand_in(name, added, FlopCountAnalysis=None)
    _cuda_is_identity_without_cuda()
    allow_namespace_checkpoints()
    if str(root) not in sys.path: sys.path.insert(0, str(root))
    try:
        mods = {m: importlib.import_module(f'video_lights.{m}') for m in modules}
        mods.update({n.rsplit('.', 1)[-1]: importlib.import_module(n) for n in extra})
        mods['basic_utils'] = importlib.import_module('utils.basic_utils')
    finally:
        for name in added: sys.modules.pop(name, None)
    if 'start_end_dataset' in mods: mods['dataset'] = mods.pop('start_end_dataset')
    f = root / 'OFFICIAL_COMMIT'
    return SimpleNamespace(path=str(root), commit=f.read_text().strip() if f.is_file() else None, **mods)


# ---------------------------------------------------------------------------------------------------------------
# options, model, criterion, optimiser as the official scripts make them
# ---------------------------------------------------------------------------------------------------------------
def qvhl_flags(variant: str = 'sf_clip_blip') -> list[str]:
    "The model/loss flags of video_lights/scripts/qvhl/train.sh for a feature variant (CPU device)."
    v = VARIANTS[variant]
    return ['--dset_name', 'hl', '--ctx_mode', 'video_tef', '--v_feat_dim', str(sum(v['v_dims'])),
            '--t_feat_dim', str(sum(v['t_dims'])), '--bsz', '32', '--dec_layers', '3', '--enc_layers', '3',
            '--bicmf_layers', '1', '--mr_to_hd_loss', '--hard_pos_neg_loss', '--contrastive_align_loss',
            '--contrastive_align_loss_coef', '0.2', '--hidden_dim', '256', '--seed', '2018', '--device', '-1']


def options(off: SimpleNamespace, flags: list[str], test: bool = False) -> argparse.Namespace:
    """Official options from command-line `flags`: the parser of video_lights/config.py (`TestOptions` with `test`),
    then the derived fields of `BaseOptions.parse` (device, pin_memory, use_tef/use_video, the 2 TEF dims), without
    its side effects (results folder, code zip, opt.json)."""
    import torch
    bo = off.config.TestOptions() if test else off.config.BaseOptions()
    bo.initialize()
    opt = bo.parser.parse_args(list(flags))
    opt.device = torch.device('cuda' if opt.device >= 0 else 'cpu')
    opt.pin_memory = not opt.no_pin_memory
    opt.use_tef, opt.use_video = 'tef' in opt.ctx_mode, 'video' in opt.ctx_mode
    if not opt.use_video: opt.v_feat_dim = 0
    if opt.use_tef: opt.v_feat_dim += 2
    return opt


def make_opt(off: SimpleNamespace, variant: str, extra: list[str] | None = None) -> argparse.Namespace:
    "Official options of the QVHighlights recipe for `variant`, plus `extra` flags (later flags win)."
    return options(off, qvhl_flags(variant) + list(extra or []))


def on_cpu(model):
    "Run `model`'s forward with `cuda_is_identity`, so the official model stays on the CPU, GPU or not."
    fwd = model.forward
    def forward(*a, **k):
        with cuda_is_identity(): return fwd(*a, **k)
    model.forward = forward
    return model


def build(off: SimpleNamespace, opt: argparse.Namespace) -> tuple:
    "(model, criterion, AdamW) as video_lights/inference.py `setup_model` makes them (one parameter group)."
    import torch
    model, criterion = off.model.build_model(opt)
    model.to(opt.device)
    criterion.to(opt.device)
    if opt.device.type == 'cpu': on_cpu(model)
    params = [{'params': [p for n, p in model.named_parameters() if p.requires_grad]}]
    return model, criterion, torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.wd)


def set_seed(seed: int):
    "Seed python, numpy and torch, as video_lights/train.py `set_seed` does (its CUDA seeding aside)."
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fix_bicmf_mask_order(model) -> list:
    """Forward pre-hooks that give the official Bi-CMF cross-attentions per-sample masks (no file edited).

    The official layer tiles its (B, Lq, Lk) pair masks over the heads with `.repeat(nhead, 1, 1)` (index h*B + b)
    while `nn.MultiheadAttention` reads a 3-D mask as index b*nhead + h, so for B > 1 head h of sample b gets the
    mask of sample (b*nhead + h) mod B. The hooks put the mask in batch-major order. Returns the hook handles."""
    handles = []
    def reorder(m, args, kwargs):
        am, kpm = kwargs.get('attn_mask'), kwargs.get('key_padding_mask')
        if am is None or am.dim() != 3 or kpm is None: return None
        B, H = kpm.shape[0], m.num_heads
        am = am.view(H, B, *am.shape[1:]).transpose(0, 1).reshape(B * H, *am.shape[1:])
        return args, {**kwargs, 'attn_mask': am}
    for mod in model.modules():
        if type(mod).__name__ == 'BiCMFLayer':
            handles += [a.register_forward_pre_hook(reorder, with_kwargs=True)
                        for a in (mod.cross_attn_1, mod.cross_attn_2, mod.cross_attn_3)]
    return handles


# ---------------------------------------------------------------------------------------------------------------
# synthetic batches in the official collate format
# ---------------------------------------------------------------------------------------------------------------
def synth_annotation(rng: np.random.Generator, n_clips: int, clip_len: float = 2.) -> dict:
    """A QVHighlights-like record for `n_clips` clips: 1-3 disjoint GT windows, 3 annotator scores (0-4) per
    relevant clip."""
    want, busy, wins = int(rng.integers(1, 4)), np.zeros(n_clips + 1, bool), []
    longest = max(1, min(15, n_clips // (want + 1)))
    for _ in range(200):
        if len(wins) == want: break
        n = int(rng.integers(1, longest + 1))
        st = int(rng.integers(0, n_clips - n + 1))
        if busy[max(0, st - 1):st + n + 1].any(): continue   # a free clip between windows keeps them apart
        busy[st:st + n] = True
        wins.append((st, st + n - 1))
    wins.sort()
    rel = [c for st, ed in wins for c in range(st, ed + 1)]
    return dict(duration=n_clips * clip_len, relevant_windows=[[st * clip_len, (ed + 1) * clip_len] for st, ed in wins],
                relevant_clip_ids=rel, saliency_scores=rng.integers(0, 5, size=(len(rel), 3)).tolist())


def _label_maker(off: SimpleNamespace, opt: argparse.Namespace):
    "A `StartEndDataset` without data, used only for its label methods (span and saliency targets)."
    ds = object.__new__(off.dataset.StartEndDataset)
    ds.dset_name, ds.max_windows, ds.span_loss_type = 'hl', opt.max_windows, opt.span_loss_type
    ds.clip_len, ds.max_v_l = opt.clip_length, opt.max_v_l
    return ds


def synth_item(off, opt, labels, rng: np.random.Generator, n_clips: int, n_tokens: int, variant: str, qid: int = 0):
    "One dataset item (`dict(meta, model_inputs)`) built the way `StartEndDataset.__getitem__` builds it (hl)."
    import torch
    l2n, v = off.basic_utils.l2_normalize_np_array, VARIANTS[variant]
    feats = lambda n, dims: np.concatenate([l2n(rng.standard_normal((n, d)).astype(np.float32)) for d in dims], 1)
    vid, txt = torch.from_numpy(feats(n_clips, v['v_dims'])), torch.from_numpy(feats(n_tokens, v['t_dims']))
    st = torch.arange(0, n_clips, 1.0) / n_clips
    vid = torch.cat([vid, torch.stack([st, st + 1.0 / n_clips], 1)], 1)          # (Lv, Dv + 2) with the TEF
    meta = dict(synth_annotation(rng, n_clips, opt.clip_length), qid=qid, query='synthetic', vid=f'synthetic_{qid}')
    mi = dict(query_feat=txt, video_feat=vid, span_labels=labels.get_span_labels(meta['relevant_windows'], n_clips))
    (mi['saliency_pos_labels'], mi['saliency_neg_labels'], mi['saliency_all_labels'],
     mi['saliency_pos_index']) = labels.get_saliency_labels_all(meta['relevant_clip_ids'], meta['saliency_scores'],
                                                                n_clips)
    return dict(meta=meta, model_inputs=mi)


def synth_batch(off, opt, variant: str, B: int, seed: int, v_range=(20, 75), q_range=(8, 32), lengths=None):
    """A collated official batch `(model_inputs, targets, lengths)`, as the official `train_epoch` feeds it.
    Lengths (clips, tokens) are drawn uniformly from the inclusive ranges unless `lengths` gives them."""
    rng = np.random.default_rng(seed)
    random.seed(seed)                                   # the dataset draws its easy pos/neg clips from `random`
    labels = _label_maker(off, opt)
    if lengths is None:
        lengths = [(int(rng.integers(v_range[0], v_range[1] + 1)), int(rng.integers(q_range[0], q_range[1] + 1)))
                   for _ in range(B)]
    items = [synth_item(off, opt, labels, rng, lv, lq, variant, qid=i) for i, (lv, lq) in enumerate(lengths)]
    _, batched = off.dataset.start_end_collate(items)
    mi, targets = off.dataset.prepare_batch_inputs(batched, opt.device)
    return mi, targets, lengths
