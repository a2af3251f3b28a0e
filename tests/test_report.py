"""Runs that report themselves: one log line per epoch (console and train.log), no progress bars off a terminal,
TensorBoard when installed, a figure of the curves at the end."""
import json, os, re, subprocess, sys
from pathlib import Path

import pytest

from videolights.synth import synth

ENV = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')
EPOCH_LINE = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d epoch (\d+) \[(\d+)/(\d+)\] \| loss ')


def vl(*args, timeout=600):
    return subprocess.run([sys.executable, '-m', 'videolights', *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp('synth_tiny')
    synth(d, seed=0, size='tiny', progress=False)
    return d


def test_non_tty_run_has_one_line_per_epoch_and_no_bars(tiny_data, tmp_path):
    "No --no-progress: off a terminal the bars stay off by themselves; each epoch is one line on stderr and in train.log."
    run = tmp_path/'run'
    r = vl('train', '--preset', 'tiny', '--data', tiny_data, '--out', run, '--epochs', 3, '--eval_every', 2, '--bsz', 4,
           '--num_workers', 0, '--max_v_l', 75)
    assert r.returncode == 0, r.stderr
    assert '\r' not in r.stdout + r.stderr                                   # no progress bar redraws
    console = [l for l in r.stderr.splitlines() if EPOCH_LINE.match(l)]
    assert [EPOCH_LINE.match(l).groups() for l in console] == [('0', '1', '3'), ('1', '2', '3'), ('2', '3', '3')]
    log = (run/'train.log').read_text().splitlines()
    assert [l for l in log if EPOCH_LINE.match(l)] == console                # the same lines in the run directory
    assert log[0].split()[2] == 'start' and log[-1].split()[2] == 'end' and len(log) == 5
    assert '\r' not in (run/'train.log').read_text()
    # evaluations after epochs 1 (eval_every 2) and 2 (the last): their metrics and the best score so far
    recs = [json.loads(l) for l in open(run/'log.jsonl')]
    evals = {e['epoch']: e for e in recs if e['kind'] == 'eval'}
    assert sorted(evals) == [1, 2]
    for l in console:
        e = int(EPOCH_LINE.match(l).group(1))
        assert (' | val R1@0.5 ' in l) == (e in evals), l
        if e in evals:
            assert f"R1@0.5 {evals[e]['MR-full-R1@0.5']:.2f} " in l and f"score {evals[e]['score']:.2f} " in l
        tr = next(x for x in recs if x['kind'] == 'train' and x['epoch'] == e)
        assert f"loss {tr['loss_overall']:.4f} " in l and f"lr {tr['lr']:.2e}" in l
    best = max(evals.values(), key=lambda x: x['score'])
    assert f"best {best['score']:.2f} @ epoch {best['epoch']}" in console[-1]
    assert (run/'training_curves.png').stat().st_size > 1000
    assert f"curves: {run/'training_curves.png'}" in log[-1]


def test_resume_appends_to_the_report(tiny_data, tmp_path):
    run = tmp_path/'run'
    base = ['--bsz', 4, '--num_workers', 0, '--no-progress']
    assert vl('train', '--preset', 'tiny', '--data', tiny_data, '--out', run, '--epochs', 1, '--max_v_l', 75, *base).returncode == 0
    r = vl('train', '--resume', run, '--epochs', 2, *base)
    assert r.returncode == 0, r.stderr
    log = (run/'train.log').read_text().splitlines()
    assert [l.split()[2] for l in log] == ['start', 'epoch', 'end', 'resume', 'epoch', 'end']
    assert [EPOCH_LINE.match(l).group(1) for l in log if EPOCH_LINE.match(l)] == ['0', '1']


def test_tensorboard_scalars_match_the_log(tiny_data, tmp_path):
    "With the [tb] extra installed, RUN_DIR/tensorboard holds the same numbers as log.jsonl."
    pytest.importorskip('tensorboard', reason='the [tb] extra is not installed')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path/'run'
    r = vl('train', '--preset', 'tiny', '--data', tiny_data, '--out', run, '--epochs', 2, '--eval_every', 1, '--bsz', 4,
           '--num_workers', 0, '--max_v_l', 75, '--no-progress')
    assert r.returncode == 0, r.stderr
    assert 'tensorboard/' in (run/'train.log').read_text().splitlines()[0]
    acc = EventAccumulator(str(run/'tensorboard')); acc.Reload()
    recs = [json.loads(l) for l in open(run/'log.jsonl')]
    for kind, key in (('train', 'loss_overall'), ('train', 'lr'), ('eval', 'MR-full-mAP'), ('eval', 'score')):
        want = [(x['epoch'], x[key]) for x in recs if x['kind'] == kind]
        got = [(s.step, s.value) for s in acc.Scalars(f'{kind}/{key}')]
        assert [g[0] for g in got] == [w[0] for w in want]
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], rel=1e-6), (kind, key)


def test_no_tensorboard_option_and_bars_on_request(tiny_data, tmp_path):
    "--no-tensorboard writes no tensorboard/; progress=True (e.g. in Jupyter) still draws bars off a terminal."
    import io, contextlib
    from videolights.data import collate
    from videolights.train import RunOptions, fit
    from videolights.runs import build_run, synth_config
    cfg = synth_config(tiny_data, n_epoch=1, bsz=4, eval_every=1, num_workers=0, max_v_l=75)
    cfg, model, crit, tr, ev = build_run(cfg, tiny_data, 'val', verbose=False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        fit(model, crit, tr, cfg, tmp_path/'r', RunOptions(device='cpu', progress=True, tensorboard=False, curves=False),
            collate, ev)
    assert '\r' in err.getvalue() and 'epoch 0' in err.getvalue()          # tqdm redraws: asked for
    assert not (tmp_path/'r'/'tensorboard').exists() and not (tmp_path/'r'/'training_curves.png').exists()
