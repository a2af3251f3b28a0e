"""Check that `videolights.video` makes the features the official extractors make, side by side, encoder by encoder.

Both sides get the same synthetic video (a textured 320x180 clip written with PyAV), the same queries and the same
randomly initialised weights, written in the released formats: a SlowFast R50 as a PySlowFast Caffe2 `.pkl`, a CLIP
ViT as an OpenAI state-dict `.pt` with its BPE vocabulary, and a small BLIP-2 (2-block ViT of two 88-wide heads,
2-layer Q-Former, 32 queries) as LAVIS releases it (`blip2_pretrained.pth`, `eva_vit_g.pth`, `bert-base-uncased/`).
The official code runs in a child process under the interpreter of its own environment and is imported at run
time, never copied here:

* SlowFast: HERO_Video_Feature_Extractor's `slowfast/extract_feature/extract.py` (`main`, run as its README says:
  `--clip_len 2 TEST.CHECKPOINT_FILE_PATH SLOWFAST_8x8_R50.pkl`, with the PySlowFast copy and the
  `extract_SLOWFAST_8x8_R50.yaml` config vendored in the official repository's `extract_feature/slowfast`);
* CLIP: the official repository's `run_on_video/data_utils.py` `ClipFeatureExtractor` (`encode_video`,
  `encode_text_query`) with its vendored OpenAI CLIP (`extract_feature/clip`);
* BLIP-2: the official `extract_feature/extract_query_blip_features_qvhl.py` (imported whole: its module-level
  `load_model_and_preprocess(name="blip2_feature_extractor", model_type="pretrain")`, then its `encode_video` and
  `encode_text_query`), with LAVIS' own model, processors and loader from a salesforce/LAVIS checkout.

    python tools/check_official_extract.py --official OFFICIAL_CHECKOUT --hero HERO_CHECKOUT --lavis LAVIS_CHECKOUT
    VIDEOLIGHTS_OFFICIAL=... VIDEOLIGHTS_HERO=... VIDEOLIGHTS_LAVIS=... \
        python tools/check_official_extract.py --sf-width 8

Options and environment: --official / $VIDEOLIGHTS_OFFICIAL (the official checkout), --hero / $VIDEOLIGHTS_HERO
(a HERO_Video_Feature_Extractor checkout; only SlowFast needs it), --lavis / $VIDEOLIGHTS_LAVIS (a salesforce/LAVIS
checkout, the folder holding `lavis/`; only BLIP-2 needs it), --official-python / $VIDEOLIGHTS_OFFICIAL_PY (the
interpreter of the official environment, default this one; it needs torch, torchvision, ffmpeg-python, Pillow, ftfy,
regex, pandas, opencv-python-headless, fvcore, simplejson, and for BLIP-2 transformers, omegaconf, timm, iopath;
`ffmpeg` and `ffprobe` must be on PATH). The rows compared are chosen by --encoders (default: clip, plus slowfast
with --hero and blip with --lavis).
Stand-ins used in the child, none of which computes anything that is compared: CUDA calls become CPU no-ops on a
machine without a GPU, `detectron2` (imported by PySlowFast's unused detection head) and `dataflow` (HERO's
unused parallel loader) are empty modules, `torchvision`'s package init (which loads its compiled ops) is skipped
so that only its pure-Python modules are imported, OpenAI's BPE file (absent from the official repository's
vendored CLIP) is read from our test file, and HERO's `FEATURE_LENGTH` follows --sf-width. For BLIP-2: LAVIS'
package inits (`lavis/__init__.py`, `lavis/models/__init__.py`, which import every LAVIS model, dataset and task)
are skipped, the two modules the extractor needs are imported (`blip2_models/blip2_qformer.py`,
`processors/blip_processors.py`) and `load_model_and_preprocess` / `load_preprocess` are compiled from
`lavis/models/__init__.py` itself; `fairscale` (imported for the ViT-L's gradient checkpointing) is an empty module;
three helpers that transformers moved from `modeling_utils` to `pytorch_utils` after the 4.33 LAVIS pins are put
back; the release files are found where LAVIS' downloader caches them ($TORCH_HOME) and `bert-base-uncased` in the
working directory, as a folder of that name (with random BERT weights, which `blip2_pretrained.pth` replaces, as
with the real ones); `create_eva_vit_g` builds the toy ViT's width and depth instead of 1408 and 39; and when CLIP
is not compared, the OpenAI CLIP package that `run_on_video/data_utils.py` imports (its `VideoProcessor` does not
use it) is an empty module.

Prints one row per encoder and side (video, each query's text): shape, max |ours - official|, min cosine (per clip
or token), max |official|; the official outputs are rounded to the precision the official features are stored in
(float16 for SlowFast and CLIP, float32 for BLIP-2) before comparing. Exits 1 when a max difference exceeds --tol
times max |official| for float16 features (default 1e-3, about two float16 steps) or --tol32 times it for float32
ones (default 1e-5), or when the official model has a weight (other than BLIP-2's unused language-model head) that
the files did not set.
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, tempfile
from pathlib import Path

import numpy as np

QUERIES = ['A man in a red hat opens the door.', 'the dog runs!! then jumps & sits', 'Two people cook pasta; one laughs']


# ---------------------------------------------------------------------------------------------------------------
# the official side (runs in the child process, under the official environment; imports nothing from videolights)
# ---------------------------------------------------------------------------------------------------------------
def _stub(name, **attrs):
    import importlib.machinery, types
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)  # for `importlib.util.find_spec` (transformers' probes)
    for k, v in attrs.items(): setattr(m, k, v)
    sys.modules[name] = m
    return m


def _bare_package(name):
    "Register a package without running its __init__ (its submodules still import from its folder)."
    import importlib.util, types
    if name in sys.modules: return sys.modules[name]
    spec = importlib.util.find_spec(name)
    m = types.ModuleType(name); m.__path__ = list(spec.submodule_search_locations); m.__file__ = spec.origin
    m.__spec__ = spec  # so that `importlib.util.find_spec` (transformers' package probe) still finds it
    sys.modules[name] = m
    return m


def _cpu_shims():
    "CUDA calls of the official extractors become CPU no-ops when there is no GPU."
    import contextlib, torch
    if torch.cuda.is_available(): return
    class _Stream:
        def wait_stream(self, s): pass
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.record_stream = lambda self, s: None
    torch.cuda.current_device, torch.cuda.synchronize = (lambda: 0), (lambda *a, **k: None)
    torch.cuda.HalfTensor = lambda *shape: torch.zeros(*shape, dtype=torch.half)
    torch.cuda.Stream, torch.cuda.current_stream, torch.cuda.stream = _Stream, (lambda *a: _Stream()), (lambda s: contextlib.nullcontext())


def official_slowfast(a, out):
    "HERO's extract.py main() on the video, with the Caffe2 .pkl; also checks that its loader covers every weight."
    import torch
    _cpu_shims()
    hero, off = Path(a['hero']) / 'slowfast' / 'extract_feature', Path(a['official']) / 'extract_feature' / 'slowfast'
    sys.path[:0] = [str(hero), str(off / 'build' / 'lib')]
    _stub('detectron2'); _stub('detectron2.layers', ROIAlign=None)
    _stub('dataflow', DataFlow=object, MultiProcessMapDataZMQ=None)
    import preprocessing, yuv_reader
    preprocessing.Normalize.__init__.__defaults__ = (torch.device('cpu'),) if not torch.cuda.is_available() else \
        preprocessing.Normalize.__init__.__defaults__
    if not torch.cuda.is_available(): yuv_reader.YuvRgbConverter.__init__.__defaults__ = (torch.device('cpu'),)
    import extract
    extract.FEATURE_LENGTH = a['sf_dim']
    csv, feat = Path(a['work']) / 'sf.csv', Path(a['work']) / 'sf_official.npz'
    csv.write_text(f"video_path,feature_path\n{a['video']},{feat}\n")
    sys.argv = ['extract.py', '--csv', str(csv), '--cfg', str(off / 'configs/Kinetics/c2/extract_SLOWFAST_8x8_R50.yaml'),
                '--clip_len', '2', '--num_decoding_thread', '0', 'TEST.CHECKPOINT_FILE_PATH', a['sf_pkl'],
                'RESNET.WIDTH_PER_GROUP', str(a['sf_width']), 'OUTPUT_DIR', a['work'],
                'NUM_GPUS', '1' if torch.cuda.is_available() else '0']
    extract.main()
    out['slowfast_video'] = np.load(feat)['features'].astype(np.float32)
    import pickle
    from slowfast.utils.c2_model_loading import get_name_convert_func
    from slowfast.models.model_builder import build_model
    cfg = extract.load_config(extract.parse_args())
    with open(a['sf_pkl'], 'rb') as f: blobs = pickle.load(f, encoding='latin1')['blobs']
    conv = get_name_convert_func()
    keys = {k for k in build_model(cfg).state_dict() if not k.endswith('num_batches_tracked')}
    out['slowfast_uncovered'] = np.array(len(keys - {conv(n) for n in blobs}))


def official_clip(a, out):
    "ClipFeatureExtractor.encode_video / encode_text_query of the official repository, on our OpenAI-format file."
    import gzip
    sys.path.insert(0, a['official'])
    _bare_package('torchvision')
    real_open, bpe = gzip.open, str(Path(a['clip_dir']) / 'bpe_simple_vocab_16e6.txt.gz')
    gzip.open = lambda p, *x, **k: real_open(bpe if str(p).endswith('bpe_simple_vocab_16e6.txt.gz') else p, *x, **k)
    from run_on_video.data_utils import ClipFeatureExtractor
    gzip.open = real_open
    fe = ClipFeatureExtractor(framerate=1 / 2, size=224, centercrop=True,
                              model_name_or_path=str(Path(a['clip_dir']) / 'model.pt'), device='cpu')
    out['clip_video'] = fe.encode_video(a['video']).float().numpy()
    for i, r in enumerate(fe.encode_text_query(QUERIES)): out[f'clip_text_{i}'] = r['last_hidden_state'].float().numpy()


def _lavis(checkout):
    "Import LAVIS' BLIP-2 feature extractor and `load_model_and_preprocess` without LAVIS' package inits."
    import ast, logging, torch
    import transformers.modeling_utils as mu, transformers.pytorch_utils as pu
    for n in ('apply_chunking_to_forward', 'find_pruneable_heads_and_indices', 'prune_linear_layer'):
        if not hasattr(mu, n): setattr(mu, n, getattr(pu, n))  # moved to pytorch_utils after transformers 4.33
    sys.path.insert(0, checkout)
    _bare_package('lavis')  # before its subpackages, whose lookup would otherwise run lavis/__init__.py
    lm, lp = _bare_package('lavis.models'), _bare_package('lavis.processors')
    for n in ('fairscale', 'fairscale.nn', 'fairscale.nn.checkpoint'): _stub(n)
    _stub('fairscale.nn.checkpoint.checkpoint_activations', checkpoint_wrapper=None)
    from omegaconf import OmegaConf
    from lavis.common.registry import registry
    from lavis.models.base_model import BaseModel
    from lavis.processors.base_processor import BaseProcessor
    lm.BaseModel, lp.BaseProcessor = BaseModel, BaseProcessor  # what the registry checks registered classes against
    import lavis.models.blip2_models.blip2_qformer, lavis.processors.blip_processors  # register the model, processors
    registry.register_path('library_root', str(Path(checkout) / 'lavis'))
    tree = ast.parse(Path(lm.__file__).read_text())
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef)
            and n.name in ('load_preprocess', 'load_model_and_preprocess')]
    lm.__dict__.update(torch=torch, logging=logging, OmegaConf=OmegaConf, registry=registry)
    exec(compile(ast.Module(defs, []), lm.__file__, 'exec'), lm.__dict__)


def official_blip(a, out):
    "extract_query_blip_features_qvhl.py's encode_video / encode_text_query with LAVIS' blip2_feature_extractor."
    import shutil, torch
    d, work = Path(a['blip_dir']), Path(a['work'])
    cwd, ckpts = work / 'lavis_cwd', work / 'torch_home' / 'hub' / 'checkpoints'
    _bare_package('torchvision')
    shutil.copytree(d / 'bert-base-uncased', cwd / 'bert-base-uncased')  # from_pretrained("bert-base-uncased") finds it
    from transformers import BertConfig, BertForMaskedLM
    BertForMaskedLM(BertConfig.from_pretrained(cwd / 'bert-base-uncased')).save_pretrained(cwd / 'bert-base-uncased')
    ckpts.mkdir(parents=True)
    for f in ('eva_vit_g.pth', 'blip2_pretrained.pth'): (ckpts / f).symlink_to(d / f)  # LAVIS' download cache
    os.environ['TORCH_HOME'] = str(work / 'torch_home')
    _lavis(a['lavis'])
    import lavis.models.eva_vit as eva
    vit, VT = torch.load(d / 'eva_vit_g.pth'), eva.VisionTransformer
    W, depth = vit['cls_token'].shape[-1], len({k.split('.')[1] for k in vit if k.startswith('blocks.')}) - 1
    eva.VisionTransformer = lambda **kw: VT(**{**kw, 'embed_dim': W, 'depth': depth, 'num_heads': W // 88})
    sys.path.insert(0, a['official'])
    import extract_feature
    if 'run_on_video.data_utils' not in sys.modules: extract_feature.clip = _stub('extract_feature.clip')
    os.chdir(cwd)
    import extract_feature.extract_query_blip_features_qvhl as off
    out['blip_video'] = off.encode_video(a['video']).float().numpy()
    for i, r in enumerate(off.encode_text_query(QUERIES)): out[f'blip_text_{i}'] = r.text_embeds[0].float().numpy()
    files = {'visual_encoder.' + k for k in vit} | set(torch.load(d / 'blip2_pretrained.pth')['model'])
    unset = [k for k in off.model.state_dict() if k not in files and not k.startswith('Qformer.cls.')]  # cls: LM head
    out['blip_uncovered'] = np.array(len(unset))


def official_side(args_json):
    a, out = json.loads(Path(args_json).read_text()), {}
    for enc in a['encoders']: globals()[f'official_{enc}'](a, out)
    np.savez(Path(a['work']) / 'official.npz', **out)


# ---------------------------------------------------------------------------------------------------------------
# our side and the comparison
# ---------------------------------------------------------------------------------------------------------------
def textured_video(path, w=320, h=180, fps=25, seconds=7.3):
    "A moving colour texture (so that resizing and chroma handling matter), written with PyAV."
    import av
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), 'w') as c:
        s = c.add_stream('mpeg4', rate=fps); s.width, s.height, s.pix_fmt, s.bit_rate = w, h, 'yuv420p', 4_000_000
        for k in range(int(round(seconds * fps))):
            a = np.stack([128 + 100 * np.sin(xx / 7 + k / 5) * np.cos(yy / 5), (xx * 255 / w + 3 * k) % 255,
                          (yy * 255 / h + 2 * k) % 255], -1).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format='rgb24')): c.mux(p)
        for p in s.encode(): c.mux(p)
    return Path(path)


def compare(name, ours, off, dtype='float32'):
    "Per-clip (per-token) max |diff| and cosine between two (L, D) arrays, the official one rounded to `dtype`."
    ours, off = np.asarray(ours, np.float64), np.asarray(off).astype(dtype).astype(np.float64)
    if ours.shape != off.shape: return dict(name=name, shape=f'{ours.shape} vs {off.shape}', max_diff=np.inf, min_cos=-1.)
    cos = (ours * off).sum(1) / np.maximum(np.linalg.norm(ours, axis=1) * np.linalg.norm(off, axis=1), 1e-12)
    return dict(name=name, shape=str(ours.shape), max_diff=float(np.abs(ours - off).max()), min_cos=float(cos.min()),
                scale=float(np.abs(off).max()), dtype=str(dtype))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--official', default=os.environ.get('VIDEOLIGHTS_OFFICIAL'))
    p.add_argument('--hero', default=os.environ.get('VIDEOLIGHTS_HERO'))
    p.add_argument('--lavis', default=os.environ.get('VIDEOLIGHTS_LAVIS'), help='a salesforce/LAVIS checkout (BLIP-2)')
    p.add_argument('--official-python', default=os.environ.get('VIDEOLIGHTS_OFFICIAL_PY'))
    p.add_argument('--encoders', default=None, help='comma-separated subset of slowfast,clip,blip (default: clip, '
                   'slowfast with --hero, blip with --lavis)')
    p.add_argument('--sf-width', type=int, default=64, help='SlowFast WIDTH_PER_GROUP (64 = the released R50; 8 is fast)')
    p.add_argument('--seconds', type=float, default=7.3); p.add_argument('--fps', type=float, default=25)
    p.add_argument('--tol', type=float, default=1e-3, help='float16 features: max |diff| / max |official| allowed')
    p.add_argument('--tol32', type=float, default=1e-5, help='float32 features (BLIP-2): the same (~100 float32 steps)')
    p.add_argument('--json', default=None, help='also write the table as JSON')
    p.add_argument('--_official-side', dest='official_side', default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.official_side: return official_side(a.official_side)
    if not a.official or not (Path(a.official) / 'extract_feature').is_dir():
        p.error('give the official checkout with --official or VIDEOLIGHTS_OFFICIAL (the folder holding extract_feature/)')
    encs = a.encoders.split(',') if a.encoders else ['slowfast'] * bool(a.hero) + ['clip'] + ['blip'] * bool(a.lavis)
    encs = [e for e in ('slowfast', 'clip', 'blip') if e in encs]  # BLIP-2 last: it may stand in for the CLIP import
    if 'slowfast' in encs and not a.hero: p.error('SlowFast needs --hero or VIDEOLIGHTS_HERO (a HERO_Video_Feature_Extractor checkout)')
    if 'blip' in encs and not (a.lavis and (Path(a.lavis) / 'lavis' / 'models' / 'blip2_models').is_dir()):
        p.error('BLIP-2 needs --lavis or VIDEOLIGHTS_LAVIS (a salesforce/LAVIS checkout, the folder holding lavis/)')
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from videolights import video as V
    work = Path(tempfile.mkdtemp(prefix='vl_check_extract_'))
    video = textured_video(work / 'video.mp4', fps=a.fps, seconds=a.seconds)
    args = dict(work=str(work), video=str(video), official=str(Path(a.official).resolve()), encoders=encs,
                hero=a.hero and str(Path(a.hero).resolve()), lavis=a.lavis and str(Path(a.lavis).resolve()))
    ours, rows = {}, []
    if 'slowfast' in encs:
        pkl = V.make_tiny_slowfast(work / 'sf.pkl', width=a.sf_width, depths=(3, 4, 6, 3))
        args.update(sf_pkl=str(pkl), sf_width=a.sf_width, sf_dim=a.sf_width * 32 + a.sf_width // 8 * 32)
        ours['slowfast'] = V.SlowFastEncoder(pkl)
    if 'clip' in encs:
        args.update(clip_dir=str(V.make_tiny_openai_clip(work / 'clip')))
        ours['clip'] = V.CLIPEncoder(work / 'clip')
    if 'blip' in encs:
        args.update(blip_dir=str(V.make_tiny_lavis_blip2(work / 'blip2')))
        ours['blip'] = V.BLIP2Encoder(work / 'blip2')
    (work / 'args.json').write_text(json.dumps(args))
    py = a.official_python or sys.executable
    r = subprocess.run([py, str(Path(__file__).resolve()), '--_official-side', str(work / 'args.json')], cwd=work)
    if r.returncode: sys.exit(f"the official side failed (exit {r.returncode}); its output is above")
    off = np.load(work / 'official.npz')
    feats = V.extract_video(video, ours)
    for n, e in ours.items():
        rows.append(compare(f'{n} video', feats[e.video_feature_type], off[f'{n}_video'], e.dtype))
        if e.text_dim is not None:
            for i, t in enumerate(e.encode_text(QUERIES)):
                rows.append(compare(f'{n} text q{i}', t.numpy(), off[f'{n}_text_{i}'], e.dtype))
    for n, what in (('slowfast', 'the .pkl'), ('blip', 'the LAVIS files')):
        if n in encs and int(off[f'{n}_uncovered']):
            rows.append(dict(name=f'{n} weights', shape=f"{int(off[f'{n}_uncovered'])} not in {what}",
                             max_diff=np.inf, min_cos=-1.))
    print(f"official extractors vs videolights on a {a.seconds:g}-s {a.fps:g}-fps 320x180 video ({work})")
    print(f"{'encoder':<18}{'shape':>14}{'max |diff|':>14}{'min cosine':>14}{'max |official|':>16}")
    for r in rows:
        print(f"{r['name']:<18}{r['shape']:>14}{r['max_diff']:>14.3g}{r['min_cos']:>14.8f}{r.get('scale', float('nan')):>16.3g}")
    if a.json: Path(a.json).write_text(json.dumps(rows, indent=1))
    tol = lambda r: a.tol32 if r.get('dtype') == 'float32' else a.tol
    bad = [r['name'] for r in rows if not r['max_diff'] <= tol(r) * r.get('scale', 0)]
    print('OK' if not bad else f"FAILED (max |diff| > {a.tol} (float16) or {a.tol32} (float32) x max |official|): "
                               f"{', '.join(bad)}")
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
