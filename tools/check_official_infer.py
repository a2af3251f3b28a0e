"""Run the official `inference.py` and `videolights evaluate` on the same official checkpoint and data; compare.

    python tools/check_official_infer.py [--cases qvh_val qvh_test charades tvsum] [--n 60] [--json OUT.json]
                                         [--workdir DIR] [--official DIR] [--official-python PY]

For every case, synthetic data is written in the official layout (per-file .npz features at the real widths, the
annotation files of the recipe) and a model of the recipe's preset (random weights, seeded) is written as the
official `train.py` writes a checkpoint (`artifacts.save_official_checkpoint`: official names, the `opt` Namespace,
and `opt.json` beside it, which the official inference reads its options from). Then, on that checkpoint:

* the official `video_lights/inference.py` (`start_inference`, with the command line of its `inference.sh`) runs in
  the official environment as a child process (`tools/official/infer_probe.py`);
* `videolights evaluate --ckpt model_best.ckpt` runs here, with the same split, annotation file and NMS threshold.

Compared: the files each side writes (same names), every submission line (qid, query, vid in the same order), every
window after post-processing (clamp, rounding to the clip grid, order, 4-decimal scores, and after NMS where the
run uses it), every saliency score, and every metric (the whole metrics JSON, key by key). TVSum writes no
submission officially: our saliency scores are compared with the raw scores of the official model (as the half
floats our submission stores) and our mAP with its `latest_metric.jsonl`.

Cases:
  qvh_val    QVHighlights val (the preset `qvhighlights`: SlowFast 2304 + CLIP 512 + BLIP-2 768 / CLIP 512 + BLIP-2
             768), with ground truth: submission and metrics, without and with NMS (--nms-thd, default 0.7)
  qvh_test   QVHighlights test (no ground truth): the CodaLab file hl_test_submission.jsonl, without and with NMS
  charades   Charades-STA (`charades`, 1-s clips; the test file evaluated as `val`, as charades_sta/train.sh does;
             no saliency in the submission)
  charades_vgg  the VGG (4096) + GloVe (300) variant of charades_sta/train_vgg.sh (clips of 0.166666 s,
             `--max_v_l -1`), videos stretched to 4x their length so that windows pass 150 s, twice: with the TEF
             as the script runs it, and without. The official inference clamps Charades windows to [0, 360] when
             `opt.v_feat_dim == 4096`, else to [0, 150]; with the TEF the options hold 4098, so the script's own run
             clamps at 150 and only a TEF-less run reaches the 360 branch. The official loader embeds the query
             words with GloVe at load time (torchtext; here a seeded stand-in vocabulary of the queries' words, given
             to the probe) and does not L2-normalise them; videolights reads text features per query, so the same
             vectors are written per query for it.
  tvsum      TVSum (`tvsum`, I3D 2048 / CLIP 512), all ten domains, each its own checkpoint and opt.json, on the
             val file and on the train file (5 videos per domain)

Exit status 1 on any difference, 2 when the official checkout or its interpreter is missing.
No official code is in this file: it is imported at run time from a scratch checkout (--official, else
$VIDEOLIGHTS_OFFICIAL; made by tools/official/setup.sh).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools' / 'official'))
import official_harness as H  # noqa: E402

CASES = ('qvh_val', 'qvh_test', 'charades', 'charades_vgg', 'tvsum')
RAW = ('pred_logits', 'pred_spans', 'saliency_scores')   # the model outputs the inference decodes
RAW_TOL = 1e-4   # largest float32 difference of our forward from the official one (both float32, CPU)
TVSUM_DOMAINS = ('BK', 'BT', 'DS', 'FM', 'GA', 'MS', 'PK', 'PR', 'VT', 'VU')


# ---------------------------------------------------------------------------------------------------------------
# data in the official layout, real widths
# ---------------------------------------------------------------------------------------------------------------
def _head(path: Path, n: int) -> list[dict]:
    "The first `n` lines of an annotation file, as the official loader reads them (no cleaning)."
    out = []
    with open(path) as f:
        for line in f:
            if len(out) == n: break
            if line.strip(): out.append(json.loads(line))
    return out


def _write_jsonl(path: Path, recs: list[dict]):
    path.write_text(''.join(json.dumps(r) + '\n' for r in recs))


def write_qvh(root: Path, n: int, seed: int) -> dict:
    "`videolights synth` at the real widths with BLIP-2 (first n real val records) + the first n test records."
    from videolights.data import write_fake_features
    from videolights.synth import feature_dims, synth
    synth(root, seed=seed, size='qvh', dims='real', blip=True, n_train=4, n_val=n, h5=False, progress=False)
    test = [{k: r[k] for k in ('qid', 'query', 'duration', 'vid')}
            for r in _head(REPO / 'data' / 'qvhighlights' / 'highlight_test_release.jsonl', n)]
    _write_jsonl(root / 'highlight_test_release.jsonl', test)
    v, t = feature_dims('real', blip=True)
    write_fake_features(root / 'features', test, v, t, clip_len=2., seed=seed + 1, max_clips=75)
    return dict(val=root / 'highlight_val_release.jsonl', test=root / 'highlight_test_release.jsonl')


def write_charades(root: Path, n: int, seed: int) -> dict:
    "The first n Charades-STA test records (as released) with SlowFast/CLIP/BLIP-2 features of 1-s clips."
    from videolights.data import write_fake_features
    root.mkdir(parents=True, exist_ok=True)
    recs = _head(REPO / 'data' / 'charades_sta' / 'charades_sta_test_tvr_format.jsonl', n)
    _write_jsonl(root / 'charades_sta_test_tvr_format.jsonl', recs)
    write_fake_features(root / 'features', recs, {'slowfast_features': 2304, 'clip_features': 512,
                        'blip_video_features': 768}, {'clip_text_features': 512, 'blip_text_features': 768},
                        clip_len=1., seed=seed)
    return dict(val=root / 'charades_sta_test_tvr_format.jsonl')


VGG_CLIP = 0.166666   # charades_sta/train_vgg.sh --clip_length
VGG_STRETCH = 4.      # video lengths (and windows) times this, so that predictions pass 150 s


def write_charades_vgg(root: Path, n: int, seed: int) -> dict:
    """The n longest Charades-STA test records, stretched VGG_STRETCH times, with VGG features of 0.166666-s clips in
    the official layout (`vgg_features/rgb_features/{vid}.npy`, the folder name that turns on the official GloVe
    path), a stand-in GloVe vocabulary of the queries' words (`glove.npz`, for the probe) and, for videolights, the
    GloVe vectors of each query as its text features (`ours/features/text/qid{qid}.npz`; `ours/features/vgg` links
    the video folder)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    recs = _head(REPO / 'data' / 'charades_sta' / 'charades_sta_test_tvr_format.jsonl', 10 ** 6)
    recs = sorted(recs, key=lambda r: (-r['duration'], r['qid']))[:n]   # the longest videos
    for r in recs:
        r['duration'] = round(r['duration'] * VGG_STRETCH, 2)
        r['relevant_windows'] = [[round(t * VGG_STRETCH, 2) for t in w] for w in r['relevant_windows']]
    _write_jsonl(root / 'charades_sta_test_tvr_format.jsonl', recs)
    vdir = root / 'features' / 'vgg_features' / 'rgb_features'
    vdir.mkdir(parents=True, exist_ok=True)
    for r in recs:
        if not (p := vdir / f"{r['vid']}.npy").exists():
            np.save(p, rng.standard_normal((int(r['duration'] / VGG_CLIP), 4096), dtype=np.float32))
    (root / 'features' / 'clip_text_features').mkdir(exist_ok=True)   # named by the script, never read with GloVe
    words = sorted({w.lower() for r in recs for w in r['query'].split()})
    vecs = rng.standard_normal((len(words), 300)).astype(np.float32)
    np.savez(root / 'glove.npz', words=np.array(words), vectors=vecs)
    ours = root / 'ours'
    (ours / 'features' / 'text').mkdir(parents=True, exist_ok=True)
    if not (ours / 'features' / 'vgg').exists():
        (ours / 'features' / 'vgg').symlink_to(vdir.resolve(), target_is_directory=True)
    shutil.copyfile(root / 'charades_sta_test_tvr_format.jsonl', ours / 'charades_sta_test_tvr_format.jsonl')
    idx = {w: i for i, w in enumerate(words)}
    for r in recs:
        np.savez(ours / 'features' / 'text' / f"qid{r['qid']}.npz",
                 last_hidden_state=vecs[[idx[w.lower()] for w in r['query'].split()]])
    return dict(val=root / 'charades_sta_test_tvr_format.jsonl', glove=root / 'glove.npz', ours=ours)


def write_tvsum(root: Path, seed: int) -> dict:
    "TVSum as released: I3D rgb/flow halves (1024 each) per video as .npy, CLIP 'token' text features (.npz)."
    rng = np.random.default_rng(seed)
    feats = root / 'features'
    (feats / 'video_features').mkdir(parents=True, exist_ok=True)
    (feats / 'query_features').mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ('val', 'train'):
        src = REPO / 'data' / 'tvsum' / f'tvsum_{split}.jsonl'
        shutil.copyfile(src, root / src.name)
        paths[split] = root / src.name
        for r in _head(src, 10 ** 6):
            for part in ('rgb', 'opt'):
                np.save(feats / 'video_features' / f"{r['vid']}_{part}.npy",
                        rng.standard_normal((len(r['label']), 1024), dtype=np.float32))
            np.savez(feats / 'query_features' / f"{r['qid']}.npz",
                     token=rng.standard_normal((int(rng.integers(4, 12)), 512), dtype=np.float32))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# the checkpoint, as the official train.py leaves it
# ---------------------------------------------------------------------------------------------------------------
def write_checkpoint(preset: str, folder: Path, feat_root: Path, seed: int, opt: dict | None = None, **over) -> Path:
    "A seeded random model of `preset` written as an official checkpoint (+ opt.json, with `opt` set) in `folder`."
    from videolights.artifacts import save_official_checkpoint
    from videolights.config import get_preset
    from videolights.model import build_model
    cfg = get_preset(preset, **over)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    return save_official_checkpoint(model, cfg, folder / 'model_best.ckpt', epoch=7, feat_root=str(feat_root),
                                    device=-1, **(opt or {}))


# ---------------------------------------------------------------------------------------------------------------
# the two sides
# ---------------------------------------------------------------------------------------------------------------
def run_official(runs: list[dict], work: Path, official: str, py: str) -> list[dict]:
    "The official inference on every run (one child process); each run's new files moved to run['official_out']."
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / 'infer_cfg.json'
    cfg.write_text(json.dumps(dict(official=official, out=str(work), runs=runs)))
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')}
    r = subprocess.run([py, str(REPO / 'tools' / 'official' / 'infer_probe.py'), str(cfg)], capture_output=True,
                       text=True, env=env, cwd=official)
    (work / 'official.log').write_text(r.stdout + r.stderr)
    if r.returncode:
        raise RuntimeError(f"official inference failed ({work / 'official.log'}):\n" + (r.stdout + r.stderr)[-3000:])
    return json.loads((work / 'infer_probe.json').read_text())


class Replay(torch.nn.Module):
    "Gives back, batch after batch, the outputs the official model gave (checking that the batches are the same)."
    def __init__(self, batches: list[dict]):
        super().__init__()
        self.batches, self.i = batches, 0

    def forward(self, **inputs):
        b = self.batches[self.i]
        self.i += 1
        if not torch.equal(inputs['src_vid_mask'].cpu().bool(), b['src_vid_mask'].bool()):
            raise RuntimeError(f"batch {self.i - 1}: our batch is not the official one (video masks "
                               f"{tuple(inputs['src_vid_mask'].shape)} vs {tuple(b['src_vid_mask'].shape)})")
        return {k: v for k, v in b.items() if k != 'src_vid_mask'}


def run_ours(run: dict, mode: str) -> list[dict]:
    """`videolights evaluate` on the same checkpoint, split, annotation file and NMS threshold (CPU, in this process).
    mode 'model': our model (its raw outputs per batch are returned); 'replay': the official model's outputs
    (`raw_{split}.pt`) replayed through our whole evaluate path, so that only the forward is left out."""
    import videolights.runs as R
    from videolights.cli import main
    out_dir = run['ours_out'] if mode == 'model' else run['ours_out'] + '_replay'
    argv = ['evaluate', '--ckpt', run['resume'], '--data', run['data'], '--split', run['split'],
            '--records', run['eval_path'], '--out', out_dir, '--device', 'cpu']
    if run.get('nms_thd') is not None: argv += ['--nms-thd', str(run['nms_thd'])]
    raw, real_load = [], R.load_model

    def load_model(*a, **k):
        model, cfg = real_load(*a, **k)
        if mode == 'replay':
            return Replay(torch.load(Path(run['official_out']) / f"raw_{run['split']}.pt", weights_only=True)), cfg
        fwd = model.forward
        def forward(**inputs):
            o = fwd(**inputs)
            raw.append(dict({n: o[n].detach().cpu() for n in RAW if n in o}, src_vid_mask=inputs['src_vid_mask'].cpu()))
            return o
        model.forward = forward
        return model, cfg
    buf = io.StringIO()
    R.load_model = load_model
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = main(argv)
    finally:
        R.load_model = real_load
    if rc:
        raise RuntimeError(f"videolights evaluate ({mode}) failed on {run['name']} (status {rc}):\n"
                           f"{buf.getvalue()[-3000:]}")
    return raw


def compare_raw(o: list[dict], u: list[dict]) -> dict:
    "Largest differences of the raw outputs (foreground probability, spans, saliency on valid clips), batch by batch."
    res = dict(batches_official=len(o), batches_ours=len(u), prob=0., spans=0., saliency=0.)
    for a, b in zip(o, u):
        m = a['src_vid_mask'].bool()
        d = (a['saliency_scores'] - b['saliency_scores'].float())[m]
        res['saliency'] = max(res['saliency'], float(d.abs().max()))
        if 'pred_logits' in a and 'pred_logits' in b:
            pa, pb = a['pred_logits'].softmax(-1)[..., 0], b['pred_logits'].float().softmax(-1)[..., 0]
            res['prob'] = max(res['prob'], float((pa - pb).abs().max()))
            res['spans'] = max(res['spans'], float((a['pred_spans'] - b['pred_spans'].float()).abs().max()))
    return res


# ---------------------------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------------------------
def _read_jsonl(p: Path) -> list[dict]:
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]


def _half_step(a: float, b: float, half: bool = True) -> bool:
    """Whether two saliency scores differ by no more than float32 noise does: RAW_TOL, plus one half-float step for
    scores stored as half floats (near 0 a step is tiny, so a 1e-6 difference can span many)."""
    if not half: return abs(a - b) <= RAW_TOL
    x, y = np.float16(a), np.float16(b)
    step = float(np.spacing(max(abs(x), abs(y))))
    return abs(float(x) - float(y)) <= RAW_TOL + step


def _windows_within_rounding(wa: list, wb: list, clip_len: float) -> bool:
    """Two window lists that differ only as float32 noise can make them: at most one clip per time (a raw time on a
    half-clip boundary) and 1e-4 per score (one 4th-decimal step), row by row or, for rows whose scores tie, in
    another order."""
    if len(wa) != len(wb): return False
    near = lambda r, q: all(abs(r[i] - q[i]) <= clip_len + 1e-6 for i in (0, 1)) and abs(r[2] - q[2]) <= 1e-4 + 1e-9
    return all(near(r, q) for r, q in zip(wa, wb)) or all(near(r, q) for r, q in zip(sorted(wa), sorted(wb)))


def compare_submissions(o: list[dict], u: list[dict], clip_len: float, half: bool = True) -> dict:
    """Line by line: qid order, keys, query/vid, every window and every saliency score (exact); differences that
    float32 noise explains (`_half_step`, `_windows_within_rounding`) are counted apart."""
    res = dict(n_official=len(o), n_ours=len(u), order_equal=[d['qid'] for d in o] == [d['qid'] for d in u],
               keys_differ=0, meta_differ=0, windows_differ=0, windows_beyond_rounding=0, windows_max_abs=0.,
               n_windows=0, saliency_differ=0, saliency_values_differ=0, saliency_beyond_rounding=0,
               saliency_max_abs=0., n_saliency=0, examples=[])
    by_qid = {d['qid']: d for d in u}
    for a in o:
        b = by_qid.get(a['qid'])
        if b is None:
            res['keys_differ'] += 1
            res['examples'].append(f"qid {a['qid']}: missing from ours")
            continue
        if set(a) != set(b):
            res['keys_differ'] += 1
            res['examples'].append(f"qid {a['qid']}: keys {sorted(set(a) ^ set(b))} on one side only")
        if (a.get('query'), a.get('vid')) != (b.get('query'), b.get('vid')): res['meta_differ'] += 1
        wa, wb = a.get('pred_relevant_windows'), b.get('pred_relevant_windows')
        if wa is not None and wb is not None:
            res['n_windows'] += len(wa)
            if wa != wb:
                res['windows_differ'] += 1
                if len(wa) == len(wb):   # row by row, or sorted where rows swapped places
                    d = min(float(np.abs(np.array(x, float) - np.array(y, float)).max())
                            for x, y in ((wa, wb), (sorted(wa), sorted(wb))))
                else: d = float('inf')
                res['windows_max_abs'] = max(res['windows_max_abs'], d)
                if not _windows_within_rounding(wa, wb, clip_len):
                    res['windows_beyond_rounding'] += 1
                    if len(res['examples']) < 5:
                        res['examples'].append(f"qid {a['qid']}: windows {wa[:3]}... vs {wb[:3]}...")
        sa, sb = a.get('pred_saliency_scores'), b.get('pred_saliency_scores')
        if sa is not None and sb is not None:
            res['n_saliency'] += len(sa)
            if sa != sb:
                res['saliency_differ'] += 1
                if len(sa) != len(sb):
                    res['saliency_beyond_rounding'] += 1
                    res['saliency_max_abs'] = float('inf')
                    continue
                diff = [(x, y) for x, y in zip(sa, sb) if x != y]
                res['saliency_values_differ'] += len(diff)
                res['saliency_max_abs'] = max(res['saliency_max_abs'], max(abs(x - y) for x, y in diff))
                if not all(_half_step(x, y, half) for x, y in diff): res['saliency_beyond_rounding'] += 1
    return res


def _flat(d, prefix=''):
    "Nested metrics as {'a/b/c': number}."
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else []):
        key = f'{prefix}{k}'
        if isinstance(v, dict): out.update(_flat(v, key + '/'))
        else: out[key] = v
    return out


def compare_metrics(o: dict, u: dict) -> dict:
    "Every metric key by key (whole JSON): keys on one side only, values that differ, largest difference."
    fo, fu = _flat(o), _flat(u)
    diff = {k: (fo[k], fu[k]) for k in fo.keys() & fu.keys() if fo[k] != fu[k]}
    num = [abs(a - b) for a, b in diff.values() if isinstance(a, (int, float)) and isinstance(b, (int, float))]
    return dict(n=len(fo.keys() & fu.keys()), only_official=sorted(fo.keys() - fu.keys()),
                only_ours=sorted(fu.keys() - fo.keys()), differ=sorted(diff), max_abs=max(num, default=0.),
                examples={k: diff[k] for k in sorted(diff)[:5]})


def compare_outputs(run: dict, ours: Path) -> dict:
    "The files the official inference wrote for `run` against ours in `ours`: submissions and metrics."
    od, clip_len = Path(run['official_out']), run['clip_len']
    fo = sorted(p.name for p in od.iterdir() if not p.name.startswith(('saliency_', 'raw_')))
    fu = sorted(p.name for p in ours.iterdir())
    res = dict(files_official=fo, files_ours=fu, submissions={}, metrics={})
    if run['dset'] == 'tvsum':   # officially no submission: the raw saliency scores and latest_metric.jsonl
        sal_o = json.loads((od / f"saliency_{run['split']}.json").read_text())
        sub = _read_jsonl(ours / f"hl_{run['split']}_submission.jsonl")
        qid = {str(d['qid']): d['qid'] for d in sub}   # the saliency file's keys are strings; TVSum's qids are too
        raw = [dict(qid=qid.get(q, q), pred_saliency_scores=s) for q, s in sal_o.items()]
        res['submissions']['saliency (official raw float32 scores)'] = compare_submissions(
            raw, [dict(qid=d['qid'], pred_saliency_scores=d['pred_saliency_scores']) for d in sub], clip_len,
            half=False)
        m_o = _read_jsonl(od / 'latest_metric.jsonl')[0]
        m_u = json.loads((ours / f"hl_{run['split']}_submission_metrics.json").read_text())
        res['metrics']['mAP'] = compare_metrics(m_o, {'brief': {'mAP': m_u['brief']['mAP']}})
        res['files_official'], res['files_ours'] = ['latest_metric.jsonl'], ['latest_metric.jsonl'] if \
            fu == [f"hl_{run['split']}_submission.jsonl", f"hl_{run['split']}_submission_metrics.json"] else fu
        return res
    sub_o = od / f"hl_{run['split']}_submission.jsonl"
    if sub_o.is_file():   # where the clamp put the windows (Charades: 150 s, or 360 s for a VGG run without TEF)
        res['max_window_end'] = max((w[1] for d in _read_jsonl(sub_o) for w in d.get('pred_relevant_windows', [])),
                                    default=None)
    for f in fo:
        if not (ours / f).is_file(): continue
        if f.endswith('_metrics.json'):
            res['metrics'][f] = compare_metrics(json.loads((od / f).read_text()), json.loads((ours / f).read_text()))
        elif f.endswith('.jsonl'):
            res['submissions'][f] = compare_submissions(_read_jsonl(od / f), _read_jsonl(ours / f), clip_len)
    return res


def problems(r: dict, exact: bool) -> list[str]:
    """What disagrees. `exact` (the replay): any difference at all. Otherwise (our forward): a difference that float32
    rounding does not explain, raw outputs further apart than RAW_TOL, or metrics that differ where the
    submissions agree exactly."""
    p = []
    if r['files_official'] != r['files_ours']:
        p.append(f"files: official {r['files_official']} vs ours {r['files_ours']}")
    identical = True
    for f, s in r['submissions'].items():
        if s['n_official'] != s['n_ours']: p.append(f"{f}: {s['n_official']} vs {s['n_ours']} lines")
        if not s['order_equal']: p.append(f"{f}: lines in another order")
        for k in ('keys_differ', 'meta_differ'):
            if s[k]: p.append(f"{f}: {s[k]} queries with {k.replace('_differ', '')} different")
        for k in ('windows', 'saliency'):
            n = s[f'{k}_differ'] if exact else s[f'{k}_beyond_rounding']
            if n:
                p.append(f"{f}: {n} queries with {k} different{'' if exact else ' beyond rounding'} "
                         f"{s['examples'][:2]}")
        identical &= not s['windows_differ'] and not s['saliency_differ']
    for f, m in r['metrics'].items():
        if m['only_official'] or m['only_ours']:
            p.append(f"{f}: keys only official {m['only_official'][:6]}, only ours {m['only_ours'][:6]}")
        if m['differ'] and (exact or identical):
            p.append(f"{f}: {len(m['differ'])} metrics differ (largest {m['max_abs']:.3g}): {m['examples']}")
    raw = r.get('raw')
    if raw:
        if raw['batches_official'] != raw['batches_ours']:
            p.append(f"batches: official {raw['batches_official']} vs ours {raw['batches_ours']}")
        worst = max(raw['prob'], raw['spans'], raw['saliency'])
        if worst > RAW_TOL: p.append(f"raw outputs differ by {worst:.3g} > {RAW_TOL:g}: {raw}")
    return p


# ---------------------------------------------------------------------------------------------------------------
def plan_runs(cases, work: Path, n: int, nms_thd: float, seed: int) -> list[dict]:
    "Data, checkpoints and the list of inference runs of the chosen cases."
    runs = []
    def add(name, dset, ckpt, split, eval_path, root, nms=None, clip_len=None, **extra):
        runs.append(dict(name=name, dset=dset, clip_len=clip_len or (1. if dset == 'charadesSTA' else 2.),
                         resume=str(ckpt), split=split, eval_path=str(eval_path), nms_thd=nms, data=str(root),
                         official_out=str(work / 'official' / name), ours_out=str(work / 'ours' / name), **extra))
    if {'qvh_val', 'qvh_test'} & set(cases):
        root = work / 'data' / 'qvh'
        paths = write_qvh(root, n, seed)
        ck = write_checkpoint('qvhighlights', work / 'ckpt' / 'qvh', root / 'features', seed)
        if 'qvh_val' in cases: add('qvh_val', 'hl', ck, 'val', paths['val'], root, nms_thd)
        if 'qvh_test' in cases: add('qvh_test', 'hl', ck, 'test', paths['test'], root, nms_thd)
    if 'charades' in cases:
        root = work / 'data' / 'charades'
        paths = write_charades(root, n, seed)
        ck = write_checkpoint('charades', work / 'ckpt' / 'charades', root / 'features', seed)
        add('charades', 'charadesSTA', ck, 'val', paths['val'], root)
    if 'charades_vgg' in cases:
        root = work / 'data' / 'charades_vgg'
        paths = write_charades_vgg(root, min(n, 8), seed)
        feats = root / 'features'
        for name, tef in (('charades_vgg', True), ('charades_vgg_notef', False)):
            ck = write_checkpoint('charades', work / 'ckpt' / name, feats, seed, use_tef=tef, v_feat_types=('vgg',),
                                  v_feat_dims=(4096,), t_feat_types=('text',), t_feat_dims=(300,), clip_len=VGG_CLIP,
                                  max_v_l=-1, blip_features=False, normalize_t=False,
                                  opt=dict(v_feat_dirs=[str(feats / 'vgg_features' / 'rgb_features')],
                                           t_feat_dirs=[str(feats / 'clip_text_features')]))
            add(name, 'charadesSTA', ck, 'val', paths['val'], paths['ours'], glove=str(paths['glove']),
                clip_len=VGG_CLIP)
    if 'tvsum' in cases:
        root = work / 'data' / 'tvsum'
        paths = write_tvsum(root, seed)
        for dom in TVSUM_DOMAINS:
            ck = write_checkpoint('tvsum', work / 'ckpt' / f'tvsum_{dom}', root / 'features', seed, dset_domain=dom)
            for split_file in ('val', 'train'):
                add(f'tvsum_{dom}_{split_file}', 'tvsum', ck, 'val', paths[split_file], root)
    return runs


def summarize(results: list[dict]) -> dict:
    "Per case: queries, windows and saliency scores compared; differences of the replay and of the whole run."
    out = {}
    for r in results:
        case = 'tvsum' if r['name'].startswith('tvsum') else 'charades_vgg' if r['name'].startswith('charades_vgg') \
            else r['name']
        c = out.setdefault(case, dict(runs=0, queries=0, windows=0, saliency=0, metrics=0, replay_differ=0,
                                      replay_metrics_differ=0, differ=0, beyond_rounding=0, saliency_values_differ=0,
                                      window_max_abs=0., saliency_max_abs=0., metrics_differ=0, metric_max_abs=0.,
                                      raw_max_abs=0., ok=True))
        c['runs'] += 1
        for side, key in (('replay', 'replay_differ'), ('model', 'differ')):
            for f, s in r[side]['submissions'].items():
                n = max(s['windows_differ'], s['saliency_differ'], s['keys_differ'], s['meta_differ'])
                c[key] += n
                if side == 'replay':
                    if '_nms_' not in f: c['queries'] += s['n_official']
                    c['windows'] += s['n_windows']
                    c['saliency'] += s['n_saliency']
                    continue
                c['beyond_rounding'] += max(s['windows_beyond_rounding'], s['saliency_beyond_rounding'])
                c['saliency_values_differ'] += s['saliency_values_differ']
                c['window_max_abs'] = max(c['window_max_abs'], s['windows_max_abs'])
                c['saliency_max_abs'] = max(c['saliency_max_abs'], s['saliency_max_abs'])
        for m in r['replay']['metrics'].values():
            c['metrics'] += m['n']
            c['replay_metrics_differ'] += len(m['differ']) + len(m['only_official']) + len(m['only_ours'])
        for m in r['model']['metrics'].values():
            c['metrics_differ'] += len(m['differ']) + len(m['only_official']) + len(m['only_ours'])
            c['metric_max_abs'] = max(c['metric_max_abs'], m['max_abs'])
        c['raw_max_abs'] = max(c['raw_max_abs'], r['raw']['prob'], r['raw']['spans'], r['raw']['saliency'])
        c['ok'] &= not r['problems']
    return out


def print_table(summary: dict):
    print('\n                               official forward -> our pipeline    our forward (videolights evaluate)')
    print('case      runs queries windows saliency metrics | differing metrics | max raw   differing (beyond '
          'rounding) max|window| max|saliency| metrics max|metric| | result')
    for case, c in summary.items():
        print(f"{case:9s} {c['runs']:4d} {c['queries']:7d} {c['windows']:7d} {c['saliency']:8d} {c['metrics']:7d} | "
              f"{c['replay_differ']:9d} {c['replay_metrics_differ']:7d} | {c['raw_max_abs']:8.2g}  "
              f"{c['differ']:9d} ({c['beyond_rounding']:d}){'':10s} {c['window_max_abs']:10.3g} "
              f"{c['saliency_max_abs']:13.3g} "
              f"{c['metrics_differ']:7d} {c['metric_max_abs']:10.3g} | {'ok' if c['ok'] else 'FAIL'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog='example: OMP_NUM_THREADS=1 python tools/check_official_infer.py --json x.json')
    ap.add_argument('--official', default=None, help='official checkout (default: $VIDEOLIGHTS_OFFICIAL)')
    ap.add_argument('--official-python', default=None, help='its interpreter (default: $VIDEOLIGHTS_OFFICIAL_PY)')
    ap.add_argument('--cases', nargs='+', default=list(CASES), choices=CASES)
    ap.add_argument('--n', type=int, default=60, help='queries per QVHighlights split and for Charades-STA')
    ap.add_argument('--nms-thd', type=float, default=0.7, help='NMS threshold of the QVHighlights runs')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--json', default=None, help='write the full report here')
    ap.add_argument('--workdir', default=None, help='keep data, checkpoints and outputs here (default: a temporary '
                    'folder, removed)')
    a = ap.parse_args(argv)
    try:
        official, py = H.require_environment(a.official, a.official_python)
    except FileNotFoundError as e:
        print(f"check_official_infer: {e}", file=sys.stderr)
        return 2
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix='vl_infer_parity_'))
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())))
    try:
        runs = plan_runs(a.cases, work, a.n, a.nms_thd, a.seed)
        run_official(runs, work / 'probe', official, py)
        results = []
        for run in runs:
            run_ours(run, 'replay')
            raw_u = run_ours(run, 'model')
            raw_o = torch.load(Path(run['official_out']) / f"raw_{run['split']}.pt", weights_only=True)
            r = dict(name=run['name'], replay=compare_outputs(run, Path(run['ours_out'] + '_replay')),
                     model=compare_outputs(run, Path(run['ours_out'])), raw=compare_raw(raw_o, raw_u))
            r['problems'] = [f'replay: {p}' for p in problems(dict(r['replay']), exact=True)] + \
                            [f'our forward: {p}' for p in problems(dict(r['model'], raw=r['raw']), exact=False)]
            results.append(r)
            end = r['replay'].get('max_window_end')
            print(f"{run['name']:18s} {'ok' if not r['problems'] else 'DIFFERENT'}"
                  + (f"  (latest window end {end:g} s)" if end is not None else ''))
            for p in r['problems']: print(f"  ! {p}")
    finally:
        if not a.workdir: shutil.rmtree(work, ignore_errors=True)
    summary = summarize(results)
    print_table(summary)
    if a.json: Path(a.json).write_text(json.dumps(dict(summary=summary, runs=results), indent=1, default=str))
    ok = all(c['ok'] for c in summary.values())
    print('ALL EQUAL' if ok else 'DIFFERENT')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
