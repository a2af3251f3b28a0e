"""Interrupted `videolights train` runs, resumed, end bit for bit as the uninterrupted run; one process per run
directory.

The kill matrix sends SIGINT, SIGTERM or SIGKILL at each phase of an epoch through the engine's test hook
VIDEOLIGHTS_KILL_AT='PHASE:EPOCH:SIGNAL' (`videolights.train._kill_point`): `batch` (an optimiser step), `eval` (an
evaluation just finished, nothing of it recorded), `best` (inside the write of model_best.ckpt), `ckpt` (inside the
write of model_latest.ckpt), `early_stop` (after the early-stop record, before the checkpoint). The run on the tiny
synthetic set with lr 1e-2 and training seed 6 improves at epochs 0 and 1, not at 2 and 3, and stops early after
epoch 3 (max_es_cnt 1), so every phase is reached (the `straight` fixture checks that schedule: a change of the
random streams, such as the dropout masks', can move it, and then another seed is needed). A few cases run by
default; the whole matrix with --runslow.
"""
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from videolights.synth import synth
from videolights.train import load_checkpoint

ENV = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')
ENV.pop('VIDEOLIGHTS_KILL_AT', None)
ARGS = ['--preset', 'tiny', '--epochs', '6', '--eval_every', '1', '--bsz', '4', '--num_workers', '0', '--lr', '1e-2',
        '--max_es_cnt', '1', '--save-every', '2', '--no-progress', '--no-tensorboard', '--seed', '6']
EXIT = dict(INT=130, TERM=143, KILL=-signal.SIGKILL)
PHASES = [('batch', 2), ('eval', 1), ('eval', 2), ('best', 1), ('ckpt', 1), ('ckpt', 2), ('early_stop', 3)]
DEFAULT = {('eval', 1, 'INT'), ('ckpt', 2, 'TERM'), ('best', 1, 'KILL')}


def train(*args, kill=None, timeout=600):
    env = dict(ENV, VIDEOLIGHTS_KILL_AT=kill) if kill else ENV
    return subprocess.run([sys.executable, '-m', 'videolights', 'train', *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('synth_tiny')
    synth(d, seed=0, size='tiny', progress=False)
    return d


@pytest.fixture(scope='module')
def straight(data, tmp_path_factory):
    "The uninterrupted run."
    out = tmp_path_factory.mktemp('straight')/'run'
    r = train(*ARGS, '--data', data, '--out', out)
    assert r.returncode == 0, r.stderr
    recs = records(out)
    assert [(l['kind'], l['epoch']) for l in recs if l['kind'] != 'train'] == \
        [('eval', 0), ('eval', 1), ('eval', 2), ('eval', 3), ('early_stop', 3)]
    assert (json.loads((out/'best_val_metrics.json').read_text())
            and load_checkpoint(out/'model_best.ckpt')['state']['best_epoch'] == 1)
    return out


def records(run):
    "log.jsonl without the times."
    return [{k: v for k, v in json.loads(l).items() if k != 'time_s'} for l in open(run/'log.jsonl')]


def same(a, b, where=''):
    "Deep equality of checkpoint contents: tensors bit for bit, everything else with ==."
    if isinstance(a, torch.Tensor): assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a: same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)): same(x, y, f'{where}[{i}]')
    else: assert a == b, (where, a, b)


def assert_same_run(a, b):
    assert records(b) == records(a)
    for n in ('model_best.ckpt', 'model_latest.ckpt', 'model_e0001.ckpt', 'model_e0003.ckpt'):
        same(load_checkpoint(a/n), load_checkpoint(b/n), n)
    for n in ('best_val_metrics.json', 'best_val_preds.jsonl', 'latest_val_metrics.json', 'latest_val_preds.jsonl'):
        assert (a/n).read_bytes() == (b/n).read_bytes(), n
    assert not list(b.glob('.*.tmp')), list(b.glob('.*.tmp'))        # temp files of killed writes are gone


CASES = [pytest.param(p, e, s, marks=() if (p, e, s) in DEFAULT else pytest.mark.slow, id=f'{s}-{p}-{e}')
         for p, e in PHASES for s in ('INT', 'TERM', 'KILL')]


@pytest.mark.parametrize('phase,epoch,sig', CASES)
def test_interrupted_then_resumed_equals_uninterrupted(data, straight, tmp_path, phase, epoch, sig):
    out = tmp_path/'run'
    r = train(*ARGS, '--data', data, '--out', out, kill=f'{phase}:{epoch}:{sig}')
    assert r.returncode == EXIT[sig], r.stderr
    if sig != 'KILL':
        assert f'continue with: videolights train --resume {out}' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    r = train('--resume', out, '--no-progress', '--no-tensorboard')
    assert r.returncode == 0, r.stderr
    assert_same_run(straight, out)


def test_a_run_directory_has_one_process(data, tmp_path):
    "A second `train` or a `train --resume` on a running run is refused in one line naming the holder; after the holder"
    "is killed the lock is taken over with a warning, and the resumed run ends normally."
    out = tmp_path/'run'
    p = subprocess.Popen([sys.executable, '-m', 'videolights', 'train', *ARGS[:2], '--data', str(data), '--out',
                          str(out),
                          '--epochs', '500', '--eval_every', '1000', '--bsz', '4', '--num_workers', '0',
                          '--no-progress',
                          '--no-tensorboard'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        t0 = time.time()
        while not ((out/'log.jsonl').exists() and (out/'log.jsonl').read_text().count('"train"') >= 1):
            assert p.poll() is None and time.time() - t0 < 300, p.stderr.read() if p.poll() is not None else 'timeout'
            time.sleep(0.2)
        want = f'{out}: in use by process {p.pid} on {socket.gethostname()}'
        for args in ([*ARGS, '--data', data, '--out', out, '--overwrite'], ['--resume', out, '--no-progress']):
            r = train(*args, timeout=120)
            assert r.returncode == 2, r.stderr
            assert r.stderr.strip().splitlines() == [r.stderr.strip()] and want in r.stderr, r.stderr   # one line
            assert r.stderr.startswith('videolights train: error: ')
        # the refused overwrite moved nothing
        assert (out/'model_latest.ckpt').exists() and not (out/'previous').exists()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    ep = load_checkpoint(out/'model_latest.ckpt')['state']['epoch']
    r = train('--resume', out, '--epochs', ep + 1, '--no-progress', '--no-tensorboard')
    assert r.returncode == 0, r.stderr
    assert (f'took over the lock of {out} from process {p.pid} on {socket.gethostname()}, '
            'which is no longer running') in r.stderr
    log = records(out)
    assert [l['epoch'] for l in log if l['kind'] == 'train'] == list(range(ep + 1))   # no duplicate (kind, epoch)


def test_overwrite_sets_the_old_run_aside_before_writing(data, tmp_path):
    """--overwrite moves every file of the old run into OUT/previous/ first; a new run killed at once leaves no old best
    model."""
    out = tmp_path/'run'
    r = train(*ARGS, '--data', data, '--out', out, '--epochs', 2)
    assert r.returncode == 0, r.stderr
    (out/'hl_val_submission.jsonl').write_text('{}\n')                     # as `evaluate` writes next to the checkpoint
    old = sorted(p.name for p in out.iterdir() if p.name != '.train.lock')
    best = (out/'model_best.ckpt').read_bytes()
    r = train(*ARGS, '--data', data, '--out', out, '--overwrite', kill='batch:0:KILL')   # dies in its first step
    assert r.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out/'previous').iterdir()) == old
    assert (out/'previous'/'model_best.ckpt').read_bytes() == best
    left = {p.name for p in out.iterdir()}
    assert not left & {'model_best.ckpt', 'model_latest.ckpt', 'best_val_metrics.json', 'log.jsonl',
                       'hl_val_submission.jsonl'}, left
    r = train(*ARGS, '--data', data, '--out', out, timeout=120)  # a config.json alone is no run to refuse...
    assert r.returncode == 0, r.stderr
    r = train(*ARGS, '--data', data, '--out', out, timeout=120)              # ...a finished one is
    assert r.returncode == 2 and '--overwrite' in r.stderr
