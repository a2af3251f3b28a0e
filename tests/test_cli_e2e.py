"""End to end through the command line: synth → train → resume → evaluate, on the `tiny` synthetic dataset.

The slow tests (run with `pytest --runslow`) are the demo's learning check and a few epochs of the `qvhighlights`
preset on the full-size synthetic proxy.
"""
import json, os, subprocess, sys, time
from pathlib import Path

import pytest

from videolights.synth import synth

ENV = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')


def vl(*args, timeout=600):
    return subprocess.run([sys.executable, '-m', 'videolights', *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp('synth_tiny')
    synth(d, seed=0, size='tiny', progress=False)
    return d


@pytest.mark.parametrize('cmd', ['train', 'evaluate', 'pretrain-data', 'demo'])
def test_help_has_examples(cmd):
    r = vl(cmd, '--help', timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'examples:' in r.stdout and f'videolights {cmd}' in r.stdout


def test_train_resume_evaluate(tiny_data, tmp_path):
    run = tmp_path/'run'
    r = vl('train', '--preset', 'tiny', '--data', tiny_data, '--out', run, '--epochs', 2, '--eval_every', 1, '--bsz', 4,
           '--num_workers', 0, '--lr', '1e-3', '--max_v_l', 75, '--no-progress')
    assert r.returncode == 0, r.stderr
    assert 'done: 2 epochs' in r.stdout
    assert {'config.json', 'log.jsonl', 'model_latest.ckpt', 'model_best.ckpt', 'best_val_preds.jsonl',
            'best_val_metrics.json'} <= {p.name for p in run.iterdir()}
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['config']['n_epoch'] == 2 and cfg['config']['bsz'] == 4 and cfg['data'] == str(tiny_data)

    r = vl('train', '--resume', run, '--epochs', 3, '--num_workers', 2, '--no-progress')   # one more epoch, 2 workers
    assert r.returncode == 0, r.stderr
    log = [json.loads(l) for l in open(run/'log.jsonl')]
    assert [l['epoch'] for l in log if l['kind'] == 'train'] == [0, 1, 2]

    ft = tmp_path/'finetune'                                                    # two-stage recipe: weights only
    r = vl('train', '--preset', 'tiny', '--data', tiny_data, '--out', ft, '--init-from', run/'model_best.ckpt',
           '--epochs', 1, '--bsz', 4, '--num_workers', 0, '--max_v_l', 75, '--pretrain', '--no-progress')
    assert r.returncode == 0, r.stderr
    assert json.loads((ft/'config.json').read_text())['init_from'] == str(run/'model_best.ckpt')

    out = tmp_path/'eval'
    r = vl('evaluate', '--ckpt', run, '--data', tiny_data, '--split', 'val', '--out', out)
    assert r.returncode == 0, r.stderr
    sub = [json.loads(l) for l in open(out/'hl_val_submission.jsonl')]
    gt = [json.loads(l) for l in open(tiny_data/'highlight_val_release.jsonl')]
    assert [s['qid'] for s in sub] == [g['qid'] for g in gt]
    for s, g in zip(sub, gt):
        w = s['pred_relevant_windows']
        assert [x[2] for x in w] == sorted((x[2] for x in w), reverse=True)          # sorted by score
        assert all(0 <= a <= b <= 150 and a % 2 == 0 and b % 2 == 0 for a, b, _ in w)  # clamped, rounded to 2 s
        assert len(s['pred_saliency_scores']) == min(75, round(g['duration'] / 2))
    m = json.loads((out/'hl_val_submission_metrics.json').read_text())
    assert 'MR-full-mAP' in m['brief'] and 'HL-min-VeryGood-Hit1' in m['brief']

    test = tmp_path/'highlight_test_release.jsonl'                          # an unlabelled split: submission only
    test.write_text(''.join(json.dumps({k: g[k] for k in ('qid', 'query', 'vid', 'duration')}) + '\n' for g in gt))
    r = vl('evaluate', '--ckpt', run/'model_latest.ckpt', '--data', tiny_data, '--records', test, '--split', 'test',
           '--out', out)
    assert r.returncode == 0, r.stderr
    assert len(open(out/'hl_test_submission.jsonl').readlines()) == len(gt)
    assert not (out/'hl_test_submission_metrics.json').exists()


def test_bad_override_is_a_clear_error(tiny_data, tmp_path):
    r = vl('train', '--preset', 'tiny', '--data', tiny_data, '--out', tmp_path/'r', '--lrr', '1e-3', timeout=120)
    assert r.returncode == 2 and 'did you mean --lr' in r.stderr
    r = vl('train', '--preset', 'tiny', '--data', tmp_path/'nowhere', '--out', tmp_path/'r', timeout=120)
    assert r.returncode == 2 and f"{tmp_path/'nowhere'}: no such file or folder" in r.stderr
    (tmp_path/'nowhere').mkdir()
    (tmp_path/'nowhere'/'notes.txt').write_text('not a dataset')
    r = vl('train', '--preset', 'tiny', '--data', tmp_path/'nowhere', '--out', tmp_path/'r', timeout=120)
    assert r.returncode == 2 and 'no val annotations' in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.slow
def test_demo_shows_learning(tmp_path):
    t0 = time.time()
    r = vl('demo', '--out', tmp_path/'demo', '--no-progress', timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((tmp_path/'demo'/'demo_summary.json').read_text())
    assert s['ratios']['MR-full-mAP'] >= 3 and s['ratios']['HL-min-VeryGood-Hit1'] >= 2, s['ratios']
    assert {p.name for p in (tmp_path/'demo'/'figures').iterdir()} == {'training_curves.png', 'windows.png',
                                                                       'saliency.png'}
    print(f"demo: {time.time() - t0:.0f} s, ratios {s['ratios']}")


@pytest.mark.slow
def test_qvh_proxy_few_epochs(tmp_path):
    "The `qvhighlights` preset on the full-size synthetic proxy (7218/1550 queries, reduced dims), 2 epochs."
    data = tmp_path/'qvh'
    synth(data, seed=0, size='qvh', dims='small', dtype='float16', blip=True, progress=False)  # the preset's SF+CLIP+BLIP
    r = vl('train', '--preset', 'qvhighlights', '--data', data, '--out', tmp_path/'run', '--epochs', 2, '--eval_every',
           1, '--num_workers', 2, '--no-progress', timeout=7200)
    assert r.returncode == 0, r.stderr
    log = [json.loads(l) for l in open(tmp_path/'run'/'log.jsonl')]
    print([{k: l[k] for k in ('kind', 'epoch', 'time_s', 'loss_overall', 'MR-full-mAP', 'HL-min-VeryGood-Hit1')
            if k in l} for l in log])


def _real_run(data, out, n_epoch=3, resume=False, on_step=None):
    from videolights.data import collate
    from videolights.train import RunOptions, fit
    from videolights.runs import build_run, synth_config
    cfg = synth_config(data, n_epoch=n_epoch, bsz=4, eval_every=2, num_workers=0, max_v_l=75, seed=3)
    cfg, model, crit, tr, ev = build_run(cfg, data, 'val', verbose=False)
    fit(model, crit, tr, cfg, out, RunOptions(device='cpu', progress=False, tensorboard=False), collate, ev, resume,
        on_step)
    return model


def test_real_model_resume_is_exact(tiny_data, tmp_path):
    "The real model, criterion and VLDataset (dropout, random saliency pairs): interrupted + resumed = straight."
    import torch
    straight = _real_run(tiny_data, tmp_path/'a')
    def ctrl_c(state):
        if state.global_step == 4: raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): _real_run(tiny_data, tmp_path/'b', on_step=ctrl_c)   # epoch 1, step 1 of 3
    _real_run(tiny_data, tmp_path/'b', n_epoch=2, resume=True)                            # resume, stop at an epoch end
    resumed = _real_run(tiny_data, tmp_path/'b', resume=True)                             # resume again to the end
    for (k, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), k


def test_pretrained_switch_needs_and_loads_a_checkpoint(tiny_data, tmp_path, monkeypatch):
    """Table V 'pt': --pretrained true without weights is a usage error; with --pretrain_ckpt / --init-from they are
    loaded."""
    import torch
    import videolights.runs as T
    from videolights.train import TrainState, load_checkpoint
    base = ['--preset', 'tiny', '--data', str(tiny_data), '--bsz', '4', '--num_workers', '0', '--max_v_l', '75',
            '--no-progress']
    r = vl('train', *base, '--out', tmp_path/'pt0', '--pretrained', 'true', timeout=120)
    assert r.returncode == 2 and '--pretrain_ckpt CKPT' in r.stderr, r.stderr
    assert not (tmp_path/'pt0'/'model_latest.ckpt').exists()
    r = vl('train', *base, '--out', tmp_path/'pt1', '--init-from', tmp_path/'missing.ckpt', timeout=120)
    assert r.returncode == 2 and 'missing.ckpt' in r.stderr, r.stderr
    assert T.train_main([*base, '--out', str(tmp_path/'src'), '--epochs', '1']) == 0
    src = load_checkpoint(tmp_path/'src'/'model_latest.ckpt')['model']
    seen = {}
    def fake_fit(model, *a, run_info=None, **kw):
        seen['w'], seen['info'] = {k: v.clone() for k, v in model.state_dict().items()}, run_info
        return TrainState()
    monkeypatch.setattr(T, 'fit', fake_fit)
    for flags in (['--pretrained', 'true', '--pretrain_ckpt', str(tmp_path/'src'/'model_latest.ckpt')],
                  ['--init-from', str(tmp_path/'src'/'model_latest.ckpt')]):
        assert T.train_main([*base, '--out', str(tmp_path/'pt2'), *flags]) == 0
        assert seen['info']['init_from'] == str(tmp_path/'src'/'model_latest.ckpt')
        for k, v in src.items(): assert torch.equal(seen['w'][k], v), k


def test_tiny_preset_on_synthetic_data_sees_whole_videos(tiny_data, tmp_path):
    "The synthetic videos are 150 s (75 clips): `train` lifts tiny's max_v_l=32 to 75 unless told otherwise, and warns."
    base = ['train', '--preset', 'tiny', '--data', tiny_data, '--epochs', 1, '--bsz', 4, '--num_workers', 0,
            '--no-progress']
    r = vl(*base, '--out', tmp_path/'a')
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path/'a'/'config.json').read_text())['config']['max_v_l'] == 75
    assert 'warning: videos of up to' not in r.stderr
    r = vl(*base, '--out', tmp_path/'b', '--max_v_l', 32)                # explicit: honoured, with a warning
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path/'b'/'config.json').read_text())['config']['max_v_l'] == 32
    assert 'videos of up to 75 clips but max_v_l=32' in r.stderr and '--max_v_l 75' in r.stderr


def test_pretrain_file_is_recognised_by_its_path_like_official(tiny_data, tmp_path):
    """An annotation path with 'pre_train' / 'subs_train' is pretraining data, with or without --pretrain (official
    rule)."""
    import shutil
    from videolights.runs import build_dataset, synth_config
    cfg = synth_config(tiny_data)
    for name, want in [('highlight_train_release.jsonl', False), ('pre_train.jsonl', True),
                       ('qvh_subs_train.jsonl', True)]:
        if not (tiny_data/name).exists(): shutil.copy(tiny_data/'highlight_train_release.jsonl', tmp_path/name)
        path = tiny_data/name if (tiny_data/name).exists() else tmp_path/name
        assert build_dataset(cfg, tiny_data, 'train', records=path).pretrain is want, name


def test_ctrl_c_saves_a_resumable_checkpoint(tiny_data, tmp_path):
    "A real SIGINT to `videolights train` leaves model_latest.ckpt, says how to resume, and --resume continues."
    import signal
    from videolights.train import load_checkpoint
    run = tmp_path/'run'
    p = subprocess.Popen([sys.executable, '-m', 'videolights', 'train', '--preset', 'tiny', '--data', str(tiny_data),
                          '--out', str(run), '--epochs', '500', '--eval_every', '1000', '--bsz', '4', '--no-progress'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    t0 = time.time()
    while not ((run/'log.jsonl').exists() and (run/'log.jsonl').read_text().count('"train"') >= 2):
        assert p.poll() is None and time.time() - t0 < 300, p.stderr.read() if p.poll() is not None else 'timeout'
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert f'continue with: videolights train --resume {run}' in err
    st = load_checkpoint(run/'model_latest.ckpt')['state']
    assert st['epoch'] >= 2
    r = vl('train', '--resume', run, '--epochs', st['epoch'] + 1, '--no-progress')
    assert r.returncode == 0, r.stderr
    assert f"done: {st['epoch'] + 1} epochs" in r.stdout
