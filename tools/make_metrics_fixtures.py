"""Write tests/fixtures/metrics_*.json: numbers computed by the official evaluators (imported at run time).

    python tools/make_metrics_fixtures.py [--official MOMENT_DETR_CHECKOUT] [--videolights VIDEOLIGHTS_CHECKOUT]

Moment-DETR's evaluator writes metrics_qvh_regression.json and metrics_qvh_awkward.json; the VideoLights one (its
own copy of `standalone_eval`, the one its inference calls) writes metrics_charades_regression.json and
metrics_qvh_videolights.json (the same QVHighlights cases, and awkward ones with empty length buckets).

Run it with an interpreter that has numpy, scikit-learn and torch. The fixtures hold only qids, generator
settings, small synthetic cases and the official metrics, so the tests can check our numbers without the
official code.
"""
from __future__ import annotations
import argparse, contextlib, copy, io, json, os, sys, warnings
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT/'tools'))
from videolights.metrics import read_jsonl, make_noisy_submission, charades_postprocess  # noqa: E402
from compare_official_metrics import load_official, gen_case  # noqa: E402

QVH_VAL = 'data/qvhighlights/highlight_val_release.jsonl'
QVH_SAMPLE = 'data/qvhighlights/official_examples/sample_val_preds.jsonl'
CHA_TEST = 'data/charades_sta/charades_sta_test_tvr_format.jsonl'


def perfect_submission(gt):
    "The GT fed back: first 10 GT windows (score 1), saliency = the 3 annotators' mean (0 elsewhere)."
    out = []
    for d in gt:
        sal = np.zeros(int(d['duration'] / 2))
        for c, s in zip(d['relevant_clip_ids'], d['saliency_scores']): sal[c] = np.mean(s)
        out.append(dict(qid=d['qid'], pred_relevant_windows=[list(w) + [1.0] for w in d['relevant_windows']][:10],
                        pred_saliency_scores=sal.tolist()))
    return out


def official(ev, sub, gt):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return json.loads(json.dumps(ev.eval_submission(copy.deepcopy(sub), copy.deepcopy(gt), verbose=False)))


def qvh_cases(ev, val, sample, sub_val, qids):
    "The five QVHighlights cases on real val queries, scored by evaluator `ev`."
    return {
        'sample_val_preds_subset': dict(submission=QVH_SAMPLE, qids='qids',
                                        metrics=official(ev, [sample[q] for q in qids], sub_val)),
        'noisy_seed0_subset': dict(submission='make_noisy_submission(seed=0)', qids='qids',
                                   metrics=official(ev, make_noisy_submission(sub_val, 0), sub_val)),
        'sample_val_preds_full': dict(submission=QVH_SAMPLE, qids='all',
                                      metrics=official(ev, list(sample.values()), list(val))),
        'perfect_full': dict(submission='perfect', qids='all',
                             metrics=official(ev, perfect_submission(val), list(val))),
        'noisy_seed1_full': dict(submission='make_noisy_submission(seed=1)', qids='all',
                                 metrics=official(ev, make_noisy_submission(val, 1), list(val))),
    }


def awkward(ev, rng, n, empty_buckets=False):
    "`n` small awkward cases scored by `ev`; with `empty_buckets`, some lose every GT window of one bucket."
    fz = []
    while len(fz) < n:
        sub, gt = gen_case(rng)
        if len(sub) > 8: continue
        if empty_buckets and rng.random() < 0.5:
            lo, hi = [(0, 10), (10, 30), (30, 150)][rng.integers(3)]
            for g in gt:
                keep = [w for w in g['relevant_windows'] if not lo < w[1] - w[0] <= hi]
                g['relevant_windows'] = keep or [[0.0, 150.0 if hi <= 30 else 4.0]]
        try: m = official(ev, sub, gt)
        except Exception: continue
        fz.append(dict(submission=sub, ground_truth=gt, metrics=m))
    return fz


def main(a):
    val, sample = read_jsonl(ROOT/QVH_VAL), {d['qid']: d for d in read_jsonl(ROOT/QVH_SAMPLE)}
    sub_val = val[:a.n_real]
    qids = [d['qid'] for d in sub_val]
    if a.official: moment_detr(a, load_official(a.official), val, sample, sub_val, qids)
    if a.videolights: videolights(a, load_official(a.videolights), val, sample, sub_val, qids)


def moment_detr(a, ev, val, sample, sub_val, qids):
    cases = qvh_cases(ev, val, sample, sub_val, qids)
    out = dict(about='Official Moment-DETR standalone_eval metrics (commit b7e553ac) on real QVHighlights val queries; '
                     'written by tools/make_metrics_fixtures.py', gt=QVH_VAL, qids=qids, cases=cases)
    (ROOT/'tests/fixtures/metrics_qvh_regression.json').write_text(json.dumps(out))
    # awkward synthetic cases (small), with the official numbers
    fz = awkward(ev, np.random.default_rng(a.seed), a.n_fuzz)
    (ROOT/'tests/fixtures/metrics_qvh_awkward.json').write_text(json.dumps(dict(
        about='Awkward synthetic submissions (tools/compare_official_metrics.py generator) and the official '
              'Moment-DETR metrics',
        cases=fz)))


def videolights(a, vl, val, sample, sub_val, qids):
    test = read_jsonl(ROOT/CHA_TEST)[:a.n_real]
    raw = make_noisy_submission(test, 0)
    sub = charades_postprocess(raw)
    m = official(vl, sub, list(test))
    (ROOT/'tests/fixtures/metrics_charades_regression.json').write_text(json.dumps(dict(
        about='Official VideoLights standalone_eval metrics (commit 76308bb) on real Charades-STA test queries with '
              'make_noisy_submission(seed=0) predictions passed through charades_postprocess',
        gt=CHA_TEST, qids=[d['qid'] for d in test], metrics=m)))
    (ROOT/'tests/fixtures/metrics_qvh_videolights.json').write_text(json.dumps(dict(
        about='Official VideoLights standalone_eval metrics (commit 76308bb; MR-mIoU, R1 from 0.3, dummy empty '
              'buckets) on the QVHighlights cases of metrics_qvh_regression.json and on awkward synthetic cases '
              '(some with an empty length bucket); written by tools/make_metrics_fixtures.py',
        gt=QVH_VAL, qids=qids, cases=qvh_cases(vl, val, sample, sub_val, qids),
        awkward=awkward(vl, np.random.default_rng(a.seed + 1), a.n_fuzz, empty_buckets=True))))


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--official', default=None, help="Moment-DETR's checkout")
    p.add_argument('--videolights', default=os.environ.get('VIDEOLIGHTS_OFFICIAL'),
                   help='default: $VIDEOLIGHTS_OFFICIAL')
    p.add_argument('--n_real', type=int, default=40)
    p.add_argument('--n_fuzz', type=int, default=30)
    p.add_argument('--seed', type=int, default=123)
    main(p.parse_args())
