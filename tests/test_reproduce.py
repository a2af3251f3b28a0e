"""`videolights reproduce` and `videolights features`: the paper's claimed numbers, the plan, the checks of the
official feature archives (on stand-ins written in their layouts), the error paths; and, as slow tests, the whole
reproduction on the full-size stand-in (`--smoke`) and the GPU check script's logic on the CPU."""
import contextlib, io, json, os, shutil, subprocess, sys, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from videolights.archives import fake_archives, features_main, find_archives, check_data, runnable
from videolights.data import TVSUM_DOMAINS, load_jsonl
from videolights.metrics import eval_submission, make_noisy_submission
from videolights.reproduce import paper_results, reproduce_main, main_jobs, SEEDS

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')


def run(fn, *args):
    "Call a command's main in-process: (exit status, stdout, stderr); argparse errors exit with status 2."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = fn([str(a) for a in args])
        except SystemExit as e: rc = e.code
    return rc, out.getvalue(), err.getvalue()


def test_paper_results_golden_values_and_shape():
    df = paper_results(ROOT/'data/paper_results.csv')
    assert list(df.columns) == ['table', 'dataset', 'split', 'model', 'features', 'metric', 'value', 'note']
    assert df.groupby(['table', 'dataset', 'split']).size().to_dict() == {
        ('II', 'qvhighlights', 'test'): 28, ('III', 'tvsum', 'val'): 55, ('IV', 'charades', 'test'): 16}
    assert not df.duplicated(['table', 'model', 'metric']).any()
    v = df.set_index(['table', 'model', 'metric']).value
    golden = {('II', 'VideoLights', 'MR-full-R1@0.5'): 63.36, ('II', 'VideoLights-pt', 'MR-full-mAP'): 45.01,
              ('II', 'VideoLights-B', 'HL-min-VeryGood-mAP'): 42.43,
              ('II', 'VideoLights-B-pt', 'MR-full-R1@0.7'): 55.25,
              ('IV', 'VideoLights', 'MR-full-R1@0.3'): 70.67, ('IV', 'VideoLights-B-pt', 'MR-full-R1@0.7'): 41.05,
              ('III', 'VideoLights-I3D', 'GA'): 95.0, ('III', 'VideoLights-B-pt', 'MS'): 95.2,
              ('III', 'VideoLights-B', 'mAP'): 87.75}
    for k, x in golden.items(): assert v[k] == x, k
    tv = df[df.table == 'III'].pivot(index='model', columns='metric', values='value')
    assert (abs(tv[list(TVSUM_DOMAINS)].mean(1) - tv['mAP']) < 0.06).all()   # each average is its domains' mean
    assert (df.value.between(30, 100)).all()


def test_paper_metric_keys_are_our_evaluators_keys():
    "Every metric name in paper_results.csv is a key our evaluators report for that dataset."
    df = paper_results(ROOT/'data/paper_results.csv')
    qvh = load_jsonl(ROOT/'data/qvhighlights/highlight_val_release.jsonl')[:50]
    ch = load_jsonl(ROOT/'data/charades_sta/charades_sta_test_tvr_format.jsonl')[:50]
    tv = load_jsonl(ROOT/'data/tvsum/tvsum_val.jsonl')
    rng = np.random.default_rng(0)
    tv_sub = [dict(qid=r['qid'], pred_saliency_scores=rng.random(len(r['label'])).tolist()) for r in tv]
    keys = dict(qvhighlights=eval_submission(make_noisy_submission(qvh), qvh)['brief'],
                charades=eval_submission(make_noisy_submission(ch), ch, 'charades')['brief'],
                tvsum=eval_submission(tv_sub, tv, 'tvsum')['brief'])
    for d, g in df.groupby('dataset'): assert set(g.metric) <= set(keys[d]), (d, set(g.metric) - set(keys[d]))


def test_plan_counts_the_official_recipe(tmp_path):
    rc, out, err = run(reproduce_main, '--plan', '--out', tmp_path/'r', '--seeds', 2)
    assert rc == 0, err
    lines = {l.split()[0]: l.split() for l in out.splitlines() if l.strip() and '/' in l.split()[0]}
    assert len(lines) == len(main_jobs()) == 60
    assert lines['qvhighlights/VideoLights-B'][1:7] == ['2', '200', '32', '7218', '45200', '0.104']
    assert lines['pretrain/SF+CLIP+BLIP-2'][1:7] == ['1', '50', '256', '187682', '36700', '0.225']   # Table I count
    assert lines['charades/VideoLights'][1:6] == ['2', '100', '32', '12404', '38800']
    assert lines['tvsum/VideoLights-I3D/BK'][1:6] == ['2', '2000', '4', '4', '2000']
    assert 'total: 118 runs, about' in out and 'qvhighlights_features.tar.gz' in out and 'H200' in out


def test_plan_of_ablations_names_the_rows_it_cannot_run(tmp_path):
    rc, out, _ = run(reproduce_main, '--plan', '--out', tmp_path/'r', '--tables', 'ablations', '--rows', '5,VII:*')
    assert rc == 0
    assert 'ablation/fra1_bi0_bf1_hl1_tcl1_scsl1_al1_pt0' in out and '150' in out
    assert out.count('not reproducible here: Table VII') == 6


@pytest.fixture(scope='module')
def archives(tmp_path_factory):
    "The four archives in their official layouts, with real annotations, 3 records per split."
    root = tmp_path_factory.mktemp('archives')/'Datasets'
    fake_archives(root, n=3)
    return root


def test_features_check_on_good_archives(archives):
    rc, out, err = run(features_main, 'check', archives, '--any-width', '--no-progress')
    assert rc == 0, out + err
    assert out.splitlines()[-1] == f'run: videolights reproduce --data {archives} --out runs/reproduce'
    for name in ('qvhighlights', 'pretrain', 'charades', 'tvsum'): assert f'== {name}: ' in out
    assert 'ERROR' not in out
    rc, out, _ = run(features_main, 'check', archives, '--no-progress', '--sample', 2)   # official widths demanded
    assert rc == 1 and 'clip_features/: width 8, the official archive has 512' in out


def test_features_check_names_each_fault_and_fits_the_command(archives, tmp_path):
    data = tmp_path/'Datasets'
    shutil.copytree(archives, data)
    ch = data/'charades'
    vids = sorted(p.stem for p in (ch/'slowfast_features').iterdir())
    np.savez(ch/'slowfast_features'/f'{vids[0]}.npz', features=np.full((5, 36), np.inf, np.float32))
    (data/'qvhl/features/blip_aug_text_features_openai').rename(data/'qvhl/features/blip_aug_text')   # misnamed folder
    (data/'pretrain/pre_train_blip.jsonl').unlink()                                                   # no LFS pull
    q = sorted((data/'tvsum/query_features').iterdir())[0]
    np.savez(q, token=np.ones((4, 9), np.float32))                                                     # wrong width
    rc, out, _ = run(features_main, 'check', data, '--any-width', '--no-progress', '--json', tmp_path/'r.json')
    assert rc == 1
    assert f'ERROR slowfast_features/: 1 file(s) with NaN/Inf values: {ch}/slowfast_features/{vids[0]}.npz' in out
    assert 'ERROR missing folder blip_aug_text_features_openai/ (feature sets SF+CLIP+BLIP-2)' in out
    assert 'note: folder blip_aug_text/ is not read by any recipe' in out
    assert 'ERROR no train annotations (pre_train_blip.jsonl)' in out
    assert "ERROR query_features/: widths differ: [8, 9]; 1 file(s) not 8 wide" in out
    # what is left: QVHighlights without BLIP-2 and without pretraining (every TVSum row reads query_features/)
    assert out.splitlines()[-1] == (f'run: videolights reproduce --data {data} --out runs/reproduce '
                                    '--only qvhighlights/VideoLights')
    rep = json.loads((tmp_path/'r.json').read_text())
    ready = {k: rep[k]['ready'] for k in ('charades', 'qvhighlights', 'tvsum')}
    assert ready == dict(charades=[], qvhighlights=['SF+CLIP'], tvsum=[])


def test_features_convert_and_read_back(archives, tmp_path):
    rc, out, err = run(features_main, 'convert', archives, tmp_path/'stores', '--any-width', '--no-progress')
    assert rc == 0, err
    stores = sorted(p.name for p in (tmp_path/'stores').glob('*.h5'))
    assert stores == ['charades.h5', 'pretrain.h5', 'qvhighlights.h5', 'tvsum.h5']
    found = find_archives(tmp_path/'stores')
    assert sorted(found) == ['charades', 'pretrain', 'qvhighlights', 'tvsum']
    assert (tmp_path/'stores/pretrain/pre_train_blip.jsonl').is_file()   # annotations kept with the archive come along
    checks = check_data(tmp_path/'stores', any_width=True, progress=False)
    assert {k: c.errors for k, c in checks.items()} == dict.fromkeys(checks, [])
    assert len(runnable(checks)) == 4 + 4 + 5
    rc, _, err = run(features_main, 'convert', archives, tmp_path/'one.h5', '--any-width', '--no-progress')
    assert rc == 2 and 'holds 4 archives: OUT must be a folder' in err


def test_reproduce_errors_are_one_line_and_exit_2(archives, tmp_path):
    rc, _, err = run(reproduce_main, '--out', tmp_path/'r')
    assert rc == 2 and 'videolights reproduce: error: --data DIR is required' in err
    rc, _, err = run(reproduce_main, '--data', tmp_path/'nowhere', '--out', tmp_path/'r')
    assert rc == 2 and 'does not exist' in err
    rc, _, err = run(reproduce_main, '--data', archives, '--only', 'imagenet/*', '--out', tmp_path/'r')
    assert rc == 2 and "--only 'imagenet/*' selects no row" in err
    rc, _, err = run(reproduce_main, '--data', archives, '--tables', 'ablations', '--rows', '99', '--out', tmp_path/'r')
    assert rc == 2 and 'unknown ablation rows' in err
    rc, _, err = run(reproduce_main, '--data', archives, '--lrr', '1', '--out', tmp_path/'r')
    assert rc == 2 and 'did you mean --lr' in err
    half = tmp_path/'half'
    half.mkdir()
    shutil.copytree(archives/'tvsum', half/'tvsum')
    rc, _, err = run(reproduce_main, '--data', half, '--out', tmp_path/'r', '--only', 'qvhighlights/*,tvsum/*')
    assert rc == 2 and '6 run(s) lack data: pretrain/SF+CLIP: the qvhighlights archive' in err
    assert 'qvhighlights/VideoLights: the qvhighlights archive (qvhighlights_features.tar.gz)' in err
    assert f'what the data supports: videolights reproduce --data {half}' in err        # no pretraining: no -pt rows
    assert err.rstrip().endswith('--only tvsum/VideoLights-I3D,tvsum/VideoLights,tvsum/VideoLights-B')
    assert not (tmp_path/'r'/'runs').exists()                       # nothing started


@pytest.mark.slow
def test_smoke_reproduction_end_to_end(tmp_path):
    """The whole path on the full-size stand-in (7218/1550/1542 QVHighlights records): the 60 runs of the main tables
    (2 pretraining, 4 QVHighlights, 4 Charades-STA, 50 TVSum), an ablation row shared by two tables, the report; then a
    rerun that trains nothing (29 min and 24 s on a busy 2-core machine)."""
    out = tmp_path/'smoke'
    cmd = [sys.executable, '-m', 'videolights', 'reproduce', '--smoke', '--out', str(out), '--tables', 'all',
           '--rows', '5,VI:Uni-CMF', '--no-progress']
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=7200)
    first = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cmp = pd.read_csv(out/'reproduction.csv')
    assert len(cmp) == 99 + 4 * 7 and set(cmp.status) == {'proxy'} and (cmp.n == 1).all(), cmp[cmp.n != 1]
    assert len(load_jsonl(out/'proxy/qvhl/highlight_train_release.jsonl')) == 7218
    for m in ('VideoLights', 'VideoLights-pt', 'VideoLights-B', 'VideoLights-B-pt'):
        d = out/'runs/qvhighlights'/m/'seed0'
        res = json.loads((d/'result.json').read_text())
        assert res['reload_max_diff'] == 0 and res['seed'] == SEEDS[0] and sorted(res['metrics']) == ['test', 'val']
        assert len(load_jsonl(d/'hl_test_submission.jsonl')) == 1542
    cfg = json.loads((out/'runs/charades/VideoLights-B-pt/seed0/config.json').read_text())
    assert cfg['init_from'] == str(out/'runs/pretrain/SF+CLIP+BLIP-2/seed0/model_best.ckpt')
    md = (out/'reproduction.md').read_text()
    assert '### TVSum top-5 mAP, % (Table III)' in md and '| VideoLights-I3D | mAP | 87.90 |' in md
    assert '| V | 5 | MR-full-R1@0.5 | 69.55 |' in md and '| VI | Uni-CMF |' in md
    assert (out/'reproduction.png').is_file() and (out/'reproduction_ablation_VI.png').is_file()
    t0 = time.time()                                                   # resumable: a rerun only reads result.json
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0 and '\nrun ' not in '\n' + r.stdout, r.stdout[-2000:]
    assert pd.read_csv(out/'reproduction.csv').equals(cmp)
    print(f"smoke: first run {first:.0f} s, rerun {time.time() - t0:.0f} s")


@pytest.mark.slow
def test_seeds_give_mean_and_std(archives, tmp_path):
    "Two seeds of one Charades-STA row and of TVSum's ten I3D domain runs: mean ± std, and the ten-domain average."
    from videolights.reproduce import Setup, reproduce, SMOKE_MODEL, SMOKE_RUN
    from videolights.train import RunOptions
    opts = RunOptions(device='cpu', save_every=0, tensorboard=False, console=False)
    setup = Setup(archives, tmp_path/'r', 2, dict(SMOKE_MODEL, **SMOKE_RUN), opts, proxy=True)
    r = reproduce(setup, only='charades/VideoLights,tvsum/VideoLights-I3D', log=lambda *_: None)
    cmp = r['comparison'].set_index(['model', 'metric'])
    assert (r['comparison'].n == 2).all() and not r['failed']
    runs = [json.loads((setup.run_dir(j, i)/'result.json').read_text())['metrics']['val']
            for j in main_jobs() if j.row == 'tvsum/VideoLights-I3D' for i in (0, 1)]
    per_seed = [np.mean([100 * b[d] for b in runs[i::2] for d in TVSUM_DOMAINS if d in b]) for i in (0, 1)]
    assert abs(cmp.loc[('VideoLights-I3D', 'mAP'), 'ours'] - np.mean(per_seed)) < 1e-9
    assert abs(cmp.loc[('VideoLights-I3D', 'mAP'), 'std'] - np.std(per_seed, ddof=1)) < 1e-9


@pytest.mark.slow
def test_gpu_check_script_logic_on_cpu(tmp_path):
    r = subprocess.run(['bash', str(ROOT/'tools/gpu_reproduce_check.sh'), str(tmp_path/'g'), '--cpu'],
                       capture_output=True, text=True, env=ENV, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (tmp_path/'g'/'summary.txt').read_text()
    assert [l.split(':')[0] for l in summary.splitlines()] == ['plan_measure', 'reproduce', 'check', 'done']
    assert 'all passed' in summary and "'reload_max_diff': 0.0" in (tmp_path/'g'/'check.log').read_text()
