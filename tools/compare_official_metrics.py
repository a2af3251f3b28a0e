"""Fuzz `videolights.metrics` against the official evaluators (imported at run time, never copied here).

    python tools/compare_official_metrics.py [--videolights CHECKOUT] [--official MOMENT_DETR_CHECKOUT] --n 2000

`--videolights` is a folder holding the VideoLights repository's `standalone_eval/` (default: $VIDEOLIGHTS_OFFICIAL),
the evaluator its inference calls: QVHighlights with MR-mIoU and R1 from 0.3 in every bucket, and Charades (dummy
empty buckets). `--official` is a folder holding Moment-DETR's `standalone_eval/`: our `moment_detr` layout must
equal it byte for byte, and our default QVHighlights output must equal it on every key both have. At least one of
the two is needed; both need numpy and scikit-learn in the running interpreter. Random *awkward* submissions are
generated (more than 10 windows, unsorted windows, tied scores, windows past the video end, negative or reversed
windows, reversed copies of GT windows, IoU exactly on a threshold, saliency lists shorter or longer than the video,
duplicate qids, first line without saliency), scored by both, and every key compared to 1e-6; for QVHighlights the
JSON text must also be byte-identical. Prints a JSON summary; exit status 1 on any mismatch.
"""
from __future__ import annotations
import argparse, contextlib, copy, io, json, os, sys, importlib, tempfile, warnings
from pathlib import Path
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from videolights.metrics import eval_submission, _diff, _restrict  # noqa: E402


def load_official(root):
    "Import `standalone_eval.eval` from `root`, single-process (results do not depend on the pool)."
    root = str(Path(root).resolve())
    for k in [k for k in sys.modules if k.split('.')[0] == 'standalone_eval']: del sys.modules[k]
    sys.path.insert(0, root)
    try: ev = importlib.import_module('standalone_eval.eval')
    finally: sys.path.remove(root)
    for name in ('compute_mr_ap', 'compute_hl_ap'):
        orig = getattr(ev, name)
        def one_worker(*a, _f=orig, **k):
            k['num_workers'] = 1
            return _f(*a, **k)
        setattr(ev, name, one_worker)
    return ev


def _num(rng, x):
    "Sometimes an int (the official code then computes with int arrays)."
    return int(round(x)) if rng.random() < 0.15 else float(x)


def gen_gt(rng, n, with_saliency=True):
    gts = []
    for i in range(n):
        dur = float(rng.choice([10, 20, 30, 31.5, 76, 150, 150, 150]))
        ng = int(rng.choice([1, 1, 2, 3, 5, 12])) if rng.random() < 0.9 else int(rng.integers(1, 15))
        ws = []
        for _ in range(ng):
            kind = rng.random()
            if kind < 0.5:    # on the 2-s grid
                a = 2 * rng.integers(0, int(dur // 2))
                b = min(dur, a + 2 * rng.integers(1, 40))
            elif kind < 0.8:  # arbitrary floats
                a = rng.uniform(0, dur)
                b = min(dur, a + rng.uniform(0.1, 60))
            else:             # duplicate or overlapping another GT window (IoU ties)
                a, b = ws[rng.integers(len(ws))] if ws else (0., dur)
                if rng.random() < 0.5: a, b = a + 0.0, b
            ws.append([_num(rng, a), _num(rng, b)])
        g = dict(qid=int(1000 + i), query='q', duration=dur, vid=f'v{i}', relevant_windows=ws)
        if with_saliency:
            nc = int(dur / 2)
            ids = sorted(rng.choice(nc, size=rng.integers(1, nc + 1), replace=False).tolist())
            g['relevant_clip_ids'] = ids
            g['saliency_scores'] = rng.integers(0, 5, (len(ids), 3)).tolist()
        gts.append(g)
    # every length bucket non-empty (the Moment-DETR evaluator crashes on an empty bucket)
    for lo, hi, w in ((0, 10, [0, 4]), (10, 30, [2, 22]), (30, 150, [10, 100])):
        if not any(lo < b - a <= hi for g in gts for a, b in g['relevant_windows']):
            g = gts[rng.integers(len(gts))]
            g['duration'] = 150.
            g['relevant_windows'].append([float(w[0]), float(w[1])])
    for g in gts:  # keep clip ids inside a possibly changed duration
        if 'relevant_clip_ids' in g:
            nc = int(g['duration'] / 2)
            keep = [k for k, c in enumerate(g['relevant_clip_ids']) if c < nc]
            g['relevant_clip_ids'] = [g['relevant_clip_ids'][k] for k in keep] or [0]
            g['saliency_scores'] = [g['saliency_scores'][k] for k in keep] or [[4, 0, 2]]
    return gts


def exact_threshold_window(rng, a, b):
    "A prediction whose IoU with [a, b] is exactly a threshold on paper (inside, sharing the start)."
    t = float(rng.choice([0.3, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]))
    return [a, a + t * (b - a)] if rng.random() < 0.5 else [a, a + (b - a) / t]


def gen_pred_windows(rng, g):
    dur, ws = g['duration'], g['relevant_windows']
    n = int(rng.choice([1, 2, 5, 10, 10, 12, 15]))
    score_pool = rng.choice([2, 3, 50]) 
    out = []
    for _ in range(n):
        a, b = ws[rng.integers(len(ws))]
        k = rng.random()
        if k < 0.25: w = [a, b]                                         # exact copy (duplicates are FPs)
        elif k < 0.35: w = [b, a]                                       # reversed copy of a GT window (NaN IoU)
        elif k < 0.5: w = exact_threshold_window(rng, a, b)
        elif k < 0.65: w = [a + rng.normal(0, 3), b + rng.normal(0, 3)]  # jitter, maybe reversed/negative
        elif k < 0.75: w = [dur - rng.uniform(0, 10), dur + rng.uniform(0, 30)]  # past the video end
        elif k < 0.8: w = [a, a]                                        # zero length
        else: w = sorted(rng.uniform(-5, dur + 5, 2).tolist())
        s = float(rng.integers(score_pool)) / score_pool if rng.random() < 0.7 else float(np.round(rng.random(), 4))
        out.append([_num(rng, w[0]), _num(rng, w[1]), s])
    if rng.random() < 0.5: out.sort(key=lambda x: -x[2])                # sorted half of the time
    return out


def gen_saliency(rng, g):
    nc = int(g['duration'] / 2)
    L = max(1, nc + int(rng.choice([0, 0, 0, -1, -5, 1, 7])))
    k = rng.random()
    if k < 0.4: v = rng.integers(-2, 3, L).astype(float)               # many ties, negatives (zero padding matters)
    elif k < 0.7: v = np.round(rng.normal(0, 1, L), 2)
    else: v = np.float16(rng.normal(0, 1, L)).astype(float)
    return v.tolist()


def gen_case(rng, charades=False):
    n = int(rng.choice([1, 2, 3, 5, 8, 20, 60]))
    gts = gen_gt(rng, n, with_saliency=not charades)
    if charades:
        for g in gts: g['relevant_windows'] = g['relevant_windows'][:1]
    subs = []
    for g in gts:
        d = dict(qid=g['qid'], query='q', vid=g['vid'], pred_relevant_windows=gen_pred_windows(rng, g))
        if not charades: d['pred_saliency_scores'] = gen_saliency(rng, g)
        subs.append(d)
    order = rng.permutation(len(subs))
    subs = [subs[i] for i in order]
    if rng.random() < 0.1:  # duplicate qid lines (the official pools MR-mAP windows, keeps the last for R1/HD)
        d = copy.deepcopy(subs[rng.integers(len(subs))])
        d['pred_relevant_windows'] = gen_pred_windows(
            rng, gts[0] if d['qid'] == gts[0]['qid'] else next(g for g in gts if g['qid'] == d['qid']))
        subs.insert(rng.integers(len(subs) + 1), d)
    if not charades and rng.random() < 0.05: subs[0].pop('pred_saliency_scores')   # first line decides: no HD
    if not charades and 'pred_saliency_scores' in subs[0] and rng.random() < 0.05:
        for s in subs: s.pop('pred_relevant_windows')                               # HD only
    return subs, gts


def _score(mod, sub, gt):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return mod.eval_submission(copy.deepcopy(sub), copy.deepcopy(gt), verbose=False)


def _ours(sub, gt, dataset):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return json.loads(json.dumps(eval_submission(copy.deepcopy(sub), copy.deepcopy(gt), dataset)))


def _compare(ours, theirs, exact=True):
    "Differences (keys, values, key order of `brief`, JSON text when `exact`)."
    theirs = json.loads(json.dumps(theirs))
    bad = _diff(ours, theirs)
    if not bad and list(ours['brief']) != list(theirs['brief']): bad = ['brief key order']
    if not bad and exact and json.dumps(ours, indent=4) != json.dumps(theirs, indent=4): bad = ['JSON text differs']
    return bad


def run(official=None, videolights=None, n=1000, seed=0, verbose=False):
    """Score `n` random cases with ours and the official evaluators. QVHighlights cases: ours (default) vs the
    VideoLights evaluator (byte-identical); ours (`moment_detr`) vs Moment-DETR's (byte-identical) and ours (default)
    vs Moment-DETR's on the shared keys. Every fourth case is a Charades case (VideoLights evaluator; our R5
    removed)."""
    if not (official or videolights): raise ValueError('give the VideoLights checkout, the Moment-DETR one, or both')
    rng = np.random.default_rng(seed)
    md = load_official(official) if official else None
    vl = load_official(videolights) if videolights else None
    stats = dict(qvh_cases=0, qvh_official_crashed=0, charades_cases=0, charades_official_crashed=0,
                 compared=dict(qvh_videolights=0, qvh_moment_detr=0, qvh_shared_keys=0, charades=0),
                 official_errors={}, mismatches=[])
    for c in range(n):
        charades = vl is not None and c % 4 == 3
        sub, gt = gen_case(rng, charades)
        refs = [('charades', vl)] if charades else [(k, m) for k, m in (('videolights', vl), ('moment_detr', md)) if m]
        theirs = {}
        for name, mod in refs:
            try: theirs[name] = _score(mod, sub, gt)
            except Exception as e:
                k = f"{name}: {type(e).__name__}: {str(e)[:60]}"
                stats['official_errors'][k] = stats['official_errors'].get(k, 0) + 1
        stats['charades_cases' if charades else 'qvh_cases'] += 1
        if not theirs:
            stats['charades_official_crashed' if charades else 'qvh_official_crashed'] += 1
            continue
        bad = []
        try:
            if charades:
                ours = _ours(sub, gt, 'charades')
                for k in list(ours['brief']):
                    if 'R5' in k: del ours['brief'][k]
                for b in ours.values(): b.pop('MR-R5', None)
                bad += _compare(ours, theirs['charades'], exact=False)
                stats['compared']['charades'] += 1
            else:
                ours = _ours(sub, gt, 'qvhighlights')
                if 'videolights' in theirs:
                    bad += [f'videolights: {d}' for d in _compare(ours, theirs['videolights'])]
                    stats['compared']['qvh_videolights'] += 1
                if 'moment_detr' in theirs:
                    t = json.loads(json.dumps(theirs['moment_detr']))
                    bad += [f'moment_detr: {d}' for d in _compare(_ours(sub, gt, 'moment_detr'), t)]
                    shared = _restrict(ours, t)
                    bad += [f'shared keys: {d}' for d in _diff(shared, _restrict(t, shared))]
                    stats['compared']['qvh_moment_detr'] += 1
                    stats['compared']['qvh_shared_keys'] += 1
        except Exception as e: bad.append(f'ours raised {e!r}')
        if bad:
            stats['mismatches'].append(dict(case=c, charades=charades, diffs=bad[:5]))
            if verbose: print(c, bad[:5], file=sys.stderr)
            if len(stats['mismatches']) == 1:
                fail = Path(tempfile.gettempdir()) / 'metrics_fuzz_fail.json'
                fail.write_text(json.dumps(dict(sub=sub, gt=gt)))
                if verbose: print(f"first mismatching case written to {fail}", file=sys.stderr)
    stats['n_mismatches'] = len(stats['mismatches'])
    return stats


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--official', default=None, help="folder holding Moment-DETR's standalone_eval/")
    p.add_argument('--videolights', default=os.environ.get('VIDEOLIGHTS_OFFICIAL'),
                   help="folder holding VideoLights' standalone_eval/ (default: $VIDEOLIGHTS_OFFICIAL)")
    p.add_argument('--n', type=int, default=500)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--verbose', action='store_true')
    a = p.parse_args()
    s = run(a.official, a.videolights, a.n, a.seed, a.verbose)
    s['mismatches'] = s['mismatches'][:10]
    print(json.dumps(s, indent=2))
    sys.exit(1 if s['n_mismatches'] else 0)
