"""videolights.metrics: official numbers (fixtures computed with the official evaluators), brute-force
cross-checks, bad input, the `eval` CLI and what it imports. The live comparison with the official code runs only when
VIDEOLIGHTS_OFFICIAL_EVAL points to a folder holding Moment-DETR's `standalone_eval/` (and scikit-learn is
installed)."""
import json, os, subprocess, sys, warnings
from pathlib import Path
import numpy as np
import pytest

from videolights.metrics import (EvalInputError, read_jsonl, eval_submission, make_noisy_submission,
                                 eval_main, charades_postprocess, detection_ap, greedy_match, iou_cross, saliency_ap,
                                 _diff, _restrict)

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT/'tests'/'fixtures'
VAL = ROOT/'data/qvhighlights/highlight_val_release.jsonl'


def _same(ours, official):
    "Equal to 1e-6 on every key, same key order (the official JSON layout)."
    ours = json.loads(json.dumps(ours))
    assert _diff(ours, official) == []
    assert json.dumps(ours, indent=4) == json.dumps(official, indent=4)


@pytest.fixture(scope='module')
def val(): return read_jsonl(VAL)


# ---------------------------------------------------------------- official numbers (regression fixtures)
def _qvh_case(case, val, qids):
    gt = list(val) if case['qids'] == 'all' else [d for d in val if d['qid'] in set(qids)]
    s = case['submission']
    if s.endswith('.jsonl'):
        by = {d['qid']: d for d in read_jsonl(ROOT/s)}
        sub = [by[d['qid']] for d in gt]
    elif s == 'perfect':
        sub = []
        for d in gt:
            sal = np.zeros(int(d['duration'] / 2))
            for c, sc in zip(d['relevant_clip_ids'], d['saliency_scores']): sal[c] = np.mean(sc)
            sub.append(dict(qid=d['qid'], pred_relevant_windows=[list(w) + [1.0] for w in d['relevant_windows']][:10],
                            pred_saliency_scores=sal.tolist()))
    else:
        sub = make_noisy_submission(gt, int(s.split('seed=')[1].rstrip(')')))
    return sub, gt


@pytest.mark.parametrize('name', ['sample_val_preds_subset', 'noisy_seed0_subset', 'sample_val_preds_full',
                                  'perfect_full', 'noisy_seed1_full'])
def test_qvh_regression(name, val):
    "Moment-DETR's evaluator: its layout byte for byte (`moment_detr`), and the default equal on the shared keys."
    fx = json.loads((FIX/'metrics_qvh_regression.json').read_text())
    case = fx['cases'][name]
    sub, gt = _qvh_case(case, val, fx['qids'])
    _same(eval_submission(sub, gt, 'moment_detr'), case['metrics'])
    ours = json.loads(json.dumps(eval_submission(sub, gt)))
    assert _diff(_restrict(ours, case['metrics']), case['metrics']) == []
    assert set(ours['brief']) - set(case['metrics']['brief']) == {'MR-full-mIoU', 'MR-full-R1@0.3'}


@pytest.mark.parametrize('name', ['sample_val_preds_subset', 'noisy_seed0_subset', 'sample_val_preds_full',
                                  'perfect_full', 'noisy_seed1_full'])
def test_qvh_videolights_evaluator(name, val):
    "The VideoLights evaluator (what its inference reports): byte for byte, MR-mIoU and R1@0.3-0.45 in every bucket."
    fx = json.loads((FIX/'metrics_qvh_videolights.json').read_text())
    case = fx['cases'][name]
    sub, gt = _qvh_case(case, val, fx['qids'])
    ours = eval_submission(sub, gt)
    _same(ours, case['metrics'])
    for b in ('full', 'short', 'middle', 'long'):
        assert 'MR-mIoU' in ours[b] and list(ours[b]['MR-R1'])[:4] == ['0.3', '0.35', '0.4', '0.45']


def test_qvh_videolights_awkward_and_empty_buckets():
    "Awkward submissions, some with an empty length bucket (the VideoLights evaluator's all-zero dummy)."
    cases = json.loads((FIX/'metrics_qvh_videolights.json').read_text())['awkward']
    n_empty = 0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for c in cases:
            _same(eval_submission(c['submission'], c['ground_truth']), c['metrics'])
            n_empty += any('0.525' in c['metrics'][b]['MR-mAP'] for b in ('short', 'middle', 'long')
                           if b in c['metrics'])
    assert len(cases) >= 20 and n_empty >= 3


def test_perfect_ceiling_is_not_100(val):
    "The GT fed back scores the official ceiling: MR-mAP 99.76 (queries with > 10 GT windows), buckets lower."
    fx = json.loads((FIX/'metrics_qvh_regression.json').read_text())['cases']['perfect_full']['metrics']['brief']
    assert fx['MR-full-mAP'] == 99.76 and fx['MR-full-R1@0.7'] == 100.0 and fx['HL-min-VeryGood-mAP'] < 70.3


def test_official_sample_metrics_file(tmp_path):
    """Byte-identical to the metrics file Moment-DETR ships for its sample predictions
    (sample_val_preds_metrics_raw.json)."""
    assert eval_main(['--submission', str(ROOT/'data/qvhighlights/official_examples/sample_val_preds.jsonl'),
                      '--gt', str(VAL), '--out', str(tmp_path/'m.json'), '--dataset', 'moment_detr']) == 0
    assert (tmp_path/'m.json').read_bytes() == (FIX/'metrics_official_sample_val_preds_metrics_raw.json').read_bytes()


def test_qvh_awkward_fixture():
    cases = json.loads((FIX/'metrics_qvh_awkward.json').read_text())['cases']
    assert len(cases) >= 20
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for c in cases: _same(eval_submission(c['submission'], c['ground_truth'], 'moment_detr'), c['metrics'])


def test_charades_regression():
    fx = json.loads((FIX/'metrics_charades_regression.json').read_text())
    gt = read_jsonl(ROOT/fx['gt'])
    gt = [d for d in gt if d['qid'] in set(fx['qids'])]
    ours = json.loads(json.dumps(eval_submission(charades_postprocess(make_noisy_submission(gt, 0)), gt, 'charades')))
    for k in [k for k in ours['brief'] if 'R5' in k]: del ours['brief'][k]
    for b in ours.values(): b.pop('MR-R5', None)
    assert _diff(ours, fx['metrics']) == [] and list(ours['brief']) == list(fx['metrics']['brief'])


def test_charades_r5():
    gt = [dict(qid=1, duration=30, relevant_windows=[[10, 20]]), dict(qid=2, duration=30, relevant_windows=[[0, 4]])]
    sub = [dict(qid=1, pred_relevant_windows=[[0, 5, .9]] * 4 + [[10, 20, .1], [10, 20, .05]]),   # exact at rank 5
           dict(qid=2, pred_relevant_windows=[[20, 30, .9]] * 5 + [[0, 4, .1]])]                 # exact at rank 6
    b = eval_submission(sub, gt, 'charades')['brief']
    assert (b['MR-full-R5@0.7'], b['MR-full-R1@0.3']) == (50.0, 0.0)


def test_tvsum_golden():
    "Official numbers (charades_tvsum_metrics.md §3): mean-score ranking 84.35 val / 79.86 train, constant 49.48 val."
    def score(path, f):
        gt = read_jsonl(ROOT/path)
        return eval_submission([dict(qid=d['qid'], pred_saliency_scores=f(np.array(d['label'])).tolist()) for d in gt],
                               gt, 'tvsum')['brief']['mAP']
    assert score('data/tvsum/tvsum_val.jsonl', lambda l: l.mean(1)) == 0.84347
    assert score('data/tvsum/tvsum_train.jsonl', lambda l: l.mean(1)) == 0.7986
    assert score('data/tvsum/tvsum_val.jsonl', lambda l: np.zeros(len(l))) == 0.49481


# ---------------------------------------------------------------- brute force on tiny cases
def _brute_query_ap(preds, gts, t):
    "Transcription of the official definition for one query and one threshold (plain Python)."
    preds = sorted(preds[:10], key=lambda w: -w[2])
    taken, tp = set(), []
    for s, e, _ in preds:
        ious = []
        for j, (gs, ge) in enumerate(gts):
            inter = max(0., min(e, ge) - max(s, gs))
            union = (e - s) + (ge - gs) - inter
            ious.append(inter / union if union else float('nan') if inter == 0 else float('inf'))
        order = np.argsort(np.array(ious))[::-1]
        hit = False
        for j in order:
            if ious[j] < t: break
            if j in taken: continue
            taken.add(j)
            hit = True
            break
        tp.append(hit)
    c = np.cumsum(tp)
    k = np.arange(1, len(tp) + 1)
    rec, prec = [0.] + list(c / len(gts)) + [1.], [0.] + list(c / k) + [0.]
    for i in range(len(prec) - 2, -1, -1): prec[i] = max(prec[i], prec[i + 1])
    return sum((rec[i] - rec[i - 1]) * prec[i] for i in range(1, len(rec)) if rec[i] != rec[i - 1])


def test_mr_ap_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        G, P = rng.integers(1, 4), rng.integers(1, 13)
        gts = [sorted(rng.integers(0, 10, 2).astype(float).tolist()) for _ in range(G)]
        gts = [[a, b + 1] for a, b in gts]
        preds = [sorted(rng.integers(0, 11, 2).astype(float).tolist()) + [float(rng.integers(0, 3))] for _ in range(P)]
        t = float(rng.choice([0.5, 0.7, 0.95]))
        w = sorted(preds[:10], key=lambda x: -x[2])
        iou = iou_cross(np.array(w)[None, :, :2], np.array(gts)[None])
        ap = detection_ap(greedy_match(iou, np.array([len(w)]), np.array([G]), [t]), np.array([len(w)]), np.array([G]))
        assert abs(ap[0, 0] - _brute_query_ap(preds, gts, t)) < 1e-12


def test_saliency_ap_ties_differ_from_sklearn_definition():
    ap = saliency_ap(np.array([[2., 2., 1., 0.]]), np.array([[[1., 1., 0., 1.]]]), np.array([4]))
    assert ap[0, 0] == 0.875   # sklearn average_precision_score gives 0.9167


def test_more_than_10_windows_and_unsorted():
    gt = [dict(qid=1, duration=20, relevant_windows=[[0, 10]])]
    good = [10, 20, .1] 
    sub = [dict(qid=1, pred_relevant_windows=[good] * 10 + [[0, 10, 1.0]])]     # exact window at position 11: ignored
    r = eval_submission(sub, gt)
    assert r['full']['MR-mAP']['0.5'] == 0.0
    sub = [dict(qid=1, pred_relevant_windows=[[10, 20, .1], [0, 10, .9]])]       # unsorted: R1 takes the first listed
    r = eval_submission(sub, gt)
    assert r['full']['MR-R1']['0.5'] == 0.0 and r['full']['MR-mAP']['0.5'] == 100.0


# ---------------------------------------------------------------- bad input, strict mode
GT = [dict(qid=1, duration=20, relevant_windows=[[0, 10]], relevant_clip_ids=[0, 1],
           saliency_scores=[[4, 4, 4], [1, 2, 3]]),
      dict(qid=2, duration=20, relevant_windows=[[10, 16]], relevant_clip_ids=[5], saliency_scores=[[2, 2, 2]])]


def _sub(**kw):
    s = [dict(qid=1, pred_relevant_windows=[[0, 10, .9]], pred_saliency_scores=[1.] * 10),
         dict(qid=2, pred_relevant_windows=[[10, 16, .9]], pred_saliency_scores=[1.] * 10)]
    for k, v in kw.items(): s[1][k] = v
    return s


@pytest.mark.parametrize('sub,msg', [
    ([dict(qid=1, pred_relevant_windows=[[0, 1, 1]])], 'no prediction for qid 2'),
    (_sub() + [dict(qid=3, pred_relevant_windows=[[0, 1, 1]])], 'submission[2]: qid 3 is not in the ground truth'),
    (_sub(pred_relevant_windows=[[0, 'a', 1]]), "submission[1]: 'pred_relevant_windows'[0]: expected finite numbers"),
    (_sub(pred_relevant_windows=[[0, float('nan'), 1]]), "submission[1]"),
    (_sub(pred_relevant_windows=[[0, 1]]), "expected at least 3 numbers"),
    (_sub(pred_saliency_scores=[1, None]), "submission[1]: 'pred_saliency_scores'[1]"),
    (_sub(pred_relevant_windows=5), "must be a list"),
])
def test_bad_input_names_the_line(sub, msg):
    with pytest.raises(EvalInputError, match=msg.replace('[', r'\[').replace(']', r'\]')): eval_submission(sub, GT)


def test_empty_windows_is_a_miss_or_strict_error():
    with pytest.warns(UserWarning, match='scored as a miss'): r = eval_submission(_sub(pred_relevant_windows=[]), GT)
    assert r['full']['MR-R1']['0.5'] == 50.0 and r['full']['MR-mAP']['0.5'] == 50.0
    with pytest.raises(EvalInputError, match=r'submission\[1\]: empty'): eval_submission(_sub(pred_relevant_windows=[]),
            GT, strict=True)


def test_duplicates_official_by_default_error_when_strict():
    sub = _sub() + [dict(qid=2, pred_relevant_windows=[[0, 2, .5]], pred_saliency_scores=[0.] * 10)]
    with pytest.warns(UserWarning, match='duplicate qid 2'): r = eval_submission(sub, GT)
    assert r['full']['MR-R1']['0.5'] == 50.0            # R1 uses the last copy
    with pytest.raises(EvalInputError, match=r'submission\[2\]: duplicate qid 2'): eval_submission(sub, GT, strict=True)


@pytest.mark.parametrize('kw,msg', [
    (dict(pred_relevant_windows=[[10, 16, .9]] * 11), '11 windows'),
    (dict(pred_relevant_windows=[[10, 16, .1], [0, 2, .9]]), 'not sorted by score'),
    (dict(pred_relevant_windows=[[16, 10, .9]]), 'reversed or outside'),
    (dict(pred_relevant_windows=[[10, 26, .9]]), 'reversed or outside'),
    (dict(pred_saliency_scores=[1.] * 9), '9 saliency scores for 10 clips'),
])
def test_strict_rejects_quirks(kw, msg):
    sub = _sub(**kw)
    eval_submission(sub, GT)                                            # the default scores them (official rules)
    with pytest.raises(EvalInputError, match=msg): eval_submission(sub, GT, strict=True)


def test_strict_passes_clean_input_with_same_numbers():
    assert eval_submission(_sub(), GT, strict=True) == eval_submission(_sub(), GT)


def test_bad_ground_truth():
    gt = [dict(GT[0]), dict(GT[1], relevant_clip_ids=[10])]
    with pytest.raises(EvalInputError, match=r'ground_truth\[1\]: clip id 10'): eval_submission(_sub(), gt)
    with pytest.raises(EvalInputError, match='duplicate qid 1 in the ground truth'): eval_submission(_sub(),
            [GT[0], GT[0], GT[1]])


# ---------------------------------------------------------------- CLI and bench
def _write(path, recs): path.write_text('\n'.join(json.dumps(r) for r in recs) + '\n')


def test_cli_writes_official_json(tmp_path):
    _write(tmp_path/'gt.jsonl', GT)
    _write(tmp_path/'sub.jsonl', _sub())
    out = subprocess.run([sys.executable, '-m', 'videolights', 'eval', '--submission', str(tmp_path/'sub.jsonl'),
                          '--gt',
                          str(tmp_path/'gt.jsonl'), '--out', str(tmp_path/'m.json')], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert 'MR-full-mAP' in out.stdout and 'bucket' in out.stdout
    assert (tmp_path/'m.json').read_text() == json.dumps(eval_submission(_sub(), GT), indent=4)


def test_cli_error_names_file_and_line(tmp_path, capsys):
    _write(tmp_path/'gt.jsonl', GT)
    (tmp_path/'sub.jsonl').write_text(json.dumps(_sub()[0]) + '\n{"qid": 2, "pred_relevant_windows": [[0, 1, \n')
    from videolights.cli import main
    assert main(['eval', '--submission', str(tmp_path/'sub.jsonl'), '--gt', str(tmp_path/'gt.jsonl')]) == 2
    err = capsys.readouterr().err
    assert (err.startswith(f"videolights eval: error: {tmp_path/'sub.jsonl'}:2: not valid JSON")
            and len(err.splitlines()) == 1)
    with pytest.raises(EvalInputError, match='sub.jsonl:2: not valid JSON'):                   # the function raises
        eval_main(['--submission', str(tmp_path/'sub.jsonl'), '--gt', str(tmp_path/'gt.jsonl')])


def _imported(*args, **kw):
    "Top-level packages a `python -m videolights ARGS` process imports (from `-X importtime`), and its result."
    r = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'videolights', *args], capture_output=True, text=True,
                       cwd=ROOT, **kw)
    names = {l.split('|')[-1].strip().split('.')[0] for l in r.stderr.splitlines() if l.startswith('import time:')}
    return names, r


@pytest.mark.parametrize('dataset', ['qvhighlights', 'charades'])
def test_eval_command_does_not_import_torch(tmp_path, dataset):
    "Scoring QVHighlights or Charades-STA needs numpy only: `videolights eval` starts without torch."
    gt = GT if dataset == 'qvhighlights' else [dict(qid=1, duration=30.0, relevant_windows=[[3.0, 9.0]])]
    sub = _sub() if dataset == 'qvhighlights' else [dict(qid=1, pred_relevant_windows=[[3.0, 8.0, 0.9]])]
    _write(tmp_path/'gt.jsonl', gt)
    _write(tmp_path/'sub.jsonl', sub)
    names, r = _imported('eval', '--submission', str(tmp_path/'sub.jsonl'), '--gt', str(tmp_path/'gt.jsonl'),
                         '--dataset', dataset)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'numpy' in names and 'videolights' in names   # the parsing works: these are imported
    assert 'torch' not in names, sorted(names)


def test_help_imports_nothing_heavy():
    "`videolights --help` lists the commands without importing any of them."
    names, r = _imported('--help')
    assert r.returncode == 0 and 'commands:' in r.stdout
    assert not names & {'torch', 'numpy', 'matplotlib', 'h5py', 'scipy', 'av', 'PIL'}, sorted(names)


# ---------------------------------------------------------------- live comparison with the official code
OFFICIAL = os.environ.get('VIDEOLIGHTS_OFFICIAL_EVAL')
OFFICIAL_VL = os.environ.get('VIDEOLIGHTS_OFFICIAL_EVAL_VL') or os.environ.get('VIDEOLIGHTS_OFFICIAL')


@pytest.mark.skipif(not (OFFICIAL or OFFICIAL_VL), reason='set VIDEOLIGHTS_OFFICIAL_EVAL (Moment-DETR) and/or '
                    'VIDEOLIGHTS_OFFICIAL (VideoLights) to a folder holding standalone_eval/')
def test_fuzz_against_official():
    pytest.importorskip('sklearn')
    sys.path.insert(0, str(ROOT/'tools'))
    from compare_official_metrics import run
    s = run(OFFICIAL, OFFICIAL_VL, n=int(os.environ.get('VIDEOLIGHTS_FUZZ_N', 40)), seed=7)
    assert s['n_mismatches'] == 0, s['mismatches'][:3]
    assert s['qvh_cases'] > 0 and sum(s['compared'].values()) > 0


def test_iou_on_threshold_r1_and_map_disagree():
    "Paper IoU exactly 0.7: the hull formula (R1) passes, the cross formula (mAP) falls 1 ulp short, as official."
    gt = [dict(qid=1, duration=40, relevant_windows=[[7.7, 28.7]])]
    r = eval_submission([dict(qid=1, pred_relevant_windows=[[7.7, 22.4, 1.0]])], gt)
    assert r['full']['MR-R1']['0.7'] == 100.0 and r['full']['MR-mAP']['0.7'] == 0.0


def test_reversed_copy_of_gt_is_a_hit_for_map():
    "Official NaN quirk: [ed, st] of a GT window has union 0, IoU NaN, and NaN < t is False: a TP at every threshold."
    gt = [dict(qid=1, duration=40, relevant_windows=[[10, 20]])]
    r = eval_submission([dict(qid=1, pred_relevant_windows=[[20, 10, 1.0]])], gt)
    assert r['full']['MR-mAP']['average'] == 100.0 and r['full']['MR-R1']['0.5'] == 0.0


def test_youtube_style_labels():
    "One binary label column: AP over the full ranking; a video without positives is left out (official quirk)."
    gt = [dict(qid='a', domain='dog', label=[[1], [0], [0], [1]]), dict(qid='b', domain='dog', label=[[0], [0]])]
    sub = [dict(qid='a', pred_saliency_scores=[.9, .8, .1, .7]), dict(qid='b', pred_saliency_scores=[1, 0])]
    r = eval_submission(sub, gt, 'tvsum')
    # ranked labels [1, 0, 1, 0]: AP = 0.5*(1+1)/2 + 0.5*(1/2+2/3)/2
    assert r['brief']['dog'] == round(0.5 + 0.5 * (0.5 + 2 / 3) / 2, 5) and r['domains']['dog']['n_videos'] == 1


def test_tvsum_bad_input():
    gt = [dict(qid='a', domain='x', label=[[1, 2], [3, 4]])]
    with pytest.raises(EvalInputError, match=r"submission\[0\]: 0 saliency scores"):
        eval_submission([dict(qid='a', pred_saliency_scores=[])], gt, 'tvsum')
    with pytest.raises(EvalInputError, match=r"ground_truth\[0\]: 'label'"):
        eval_submission([dict(qid='a', pred_saliency_scores=[1, 2])], [dict(qid='a', label='x')], 'tvsum')


def test_first_line_decides_what_is_evaluated():
    sub = _sub()
    sub[0] = {k: v for k, v in sub[0].items() if k != 'pred_saliency_scores'}
    r = eval_submission(sub, GT)
    assert 'HL-min-Fair' not in r and not any(k.startswith('HL') for k in r['brief'])     # official: HD skipped
    with pytest.raises(EvalInputError,
                       match=r"submission\[1\]: has 'pred_saliency_scores' but the first line does not"):
        eval_submission(sub, GT, strict=True)


# ---------------------------------------------------------------- memory: packed reading and chunked scoring
@pytest.mark.parametrize('dataset', ['qvhighlights', 'charades'])
def test_packed_chunked_identical(tmp_path, val, monkeypatch, dataset):
    "The `eval` path (packed number lists, queries scored in chunks) gives exactly the plain numbers."
    import videolights.metrics as M
    gt = list(val)[:600]
    sub = make_noisy_submission(gt, seed=3)
    sub[5]['pred_relevant_windows'] = []                                   # an empty list inside a packed block
    (tmp_path/'s.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in sub))
    (tmp_path/'g.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in gt))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        plain = eval_submission(read_jsonl(tmp_path/'s.jsonl'), read_jsonl(tmp_path/'g.jsonl'), dataset)
        monkeypatch.setattr(M, 'EVAL_CHUNK', 7)
        packed_s, packed_g = (read_jsonl(tmp_path/'s.jsonl', pack=True, block=50),
                              read_jsonl(tmp_path/'g.jsonl', pack=True, block=64))
        assert (type(packed_s[0]['pred_relevant_windows']) is M.Packed
                and type(packed_g[0]['saliency_scores']) is M.Packed)
        chunked = eval_submission(packed_s, packed_g, dataset)
    assert json.dumps(chunked, indent=4) == json.dumps(plain, indent=4)


def test_packed_keeps_errors(tmp_path):
    "A block with a bad entry stays plain, so the error names the same line as without packing."
    lines = [{'qid': i, 'pred_relevant_windows': [[0, 2, .5]]} for i in range(10)]
    lines[7]['pred_relevant_windows'] = [[0, 'x', .5]]
    (tmp_path/'s.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in lines))
    gt = [{'qid': i, 'duration': 10, 'relevant_windows': [[0, 2]]} for i in range(10)]
    for pack in (False, True):
        with pytest.raises(EvalInputError, match=r"s.jsonl:8: 'pred_relevant_windows'\[0\]"):
            eval_submission(read_jsonl(tmp_path/'s.jsonl', pack=pack, block=4), gt)
