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
    """No --no-progress: off a terminal the bars stay off by themselves; each epoch is one line on stderr and in
    train.log."""
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
    assert vl('train', '--preset', 'tiny', '--data', tiny_data, '--out', run, '--epochs', 1, '--max_v_l', 75,
              *base).returncode == 0
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
    acc = EventAccumulator(str(run/'tensorboard'))
    acc.Reload()
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
        fit(model, crit, tr, cfg, tmp_path/'r',
            RunOptions(device='cpu', progress=True, tensorboard=False, curves=False), collate, ev)
    assert '\r' in err.getvalue() and 'epoch 0' in err.getvalue()          # tqdm redraws: asked for
    assert not (tmp_path/'r'/'tensorboard').exists() and not (tmp_path/'r'/'training_curves.png').exists()


# ---------------------------------------------------------------- --config, --print-config, --help-config
FLAGS = ['--preset', 'tiny', '--lr', '2e-3', '--epochs', 2, '--bsz', 4, '--eval_every', 1, '--num_workers', 0,
         '--max_v_l', 75, '--hidden_dim', 16, '--v_feat_types', 'slowfast,clip', '--hard_pos_neg_loss', 'false']
YAML = """\
preset: tiny
lr: 2e-3              # YAML 1.1 reads this as a string: typed like a flag
epochs: 2             # an alias, as on the command line
bsz: 4
eval_every: 1
num_workers: 0
max_v_l: 75
hidden_dim: 16
v_feat_types: [slowfast, clip]
hard_pos_neg_loss: false
"""


def print_config(capsys, *args):
    from videolights.runs import train_main
    capsys.readouterr()
    assert train_main([*map(str, args), '--print-config']) == 0
    return capsys.readouterr().out


def test_config_file_equals_the_same_flags(tiny_data, tmp_path, capsys):
    "Same resolved config (--print-config) and the same run (bit-identical weights) from flags, YAML and JSON."
    import torch
    from videolights.train import load_checkpoint
    (tmp_path/'c.yaml').write_text(YAML)
    (tmp_path/'c.json').write_text(json.dumps(dict(preset='tiny', lr=2e-3, n_epoch=2, bsz=4, eval_every=1,
                                                   num_workers=0,
                                                   max_v_l=75, hidden_dim=16, v_feat_types=['slowfast', 'clip'],
                                                   hard_pos_neg_loss=False)))
    ways = dict(flags=FLAGS, yaml=['--config', tmp_path/'c.yaml'], json=['--config', tmp_path/'c.json'])
    printed = {k: print_config(capsys, '--data', tiny_data, *v) for k, v in ways.items()}
    assert printed['flags'] == printed['yaml'] == printed['json']
    assert 'lr: 0.002  #' in printed['flags'] and 'hidden_dim: 16  #' in printed['flags']
    (tmp_path/'printed.yaml').write_text(printed['flags'])                    # the printed config is a --config file
    assert print_config(capsys, '--data', tiny_data, '--config', tmp_path/'printed.yaml') == printed['flags']
    runs = {}
    for k in ('flags', 'yaml'):
        r = vl('train', '--data', tiny_data, *ways[k], '--out', tmp_path/k, '--no-progress')
        assert r.returncode == 0, r.stderr
        runs[k] = load_checkpoint(tmp_path/k/'model_latest.ckpt')
    assert runs['flags']['config'] == runs['yaml']['config']
    assert runs['flags']['config']['hidden_dim'] == 16 and runs['flags']['config']['lr'] == 2e-3
    for n, w in runs['flags']['model'].items(): assert torch.equal(w, runs['yaml']['model'][n]), n
    a, b = [json.loads((tmp_path/k/'best_val_metrics.json').read_text())['brief'] for k in ('flags', 'yaml')]
    assert a == b


def test_flags_override_the_config_file(tiny_data, tmp_path, capsys):
    (tmp_path/'c.yaml').write_text(YAML.replace('v_feat_types: [slowfast, clip]\n', ''))
    out = print_config(capsys, '--config', tmp_path/'c.yaml', '--lr', '5e-4', '--preset', 'qvhighlights')
    assert 'preset: qvhighlights' in out and 'lr: 0.0005  #' in out and 'hidden_dim: 16  #' in out
    assert 'enc_layers: 3  #' in out and 'max_v_l: 75  #' in out           # the rest from the flag's preset
    (tmp_path/'c.yaml').write_text(YAML)                                     # the file's sources vs the preset's widths
    r = vl('train', '--config', tmp_path/'c.yaml', '--preset', 'qvhighlights', '--print-config', timeout=120)
    assert r.returncode == 2 and 'differ in length' in r.stderr and 'Traceback' not in r.stderr, r.stderr


def test_config_file_mistakes_name_file_line_and_key(tiny_data, tmp_path, capsys):
    from videolights.runs import train_main
    bad = tmp_path/'bad.yaml'
    for text, msg in [('lr: 1e-3\nhiden_dim: 16\n',
                       'bad.yaml:2: hiden_dim: unknown option or VLConfig field hiden_dim; '
                                                     'did you mean hidden_dim'),
                      ('bsz: 4\n\nuse_tef: maybe\n',
                       "bad.yaml:3: use_tef: --use_tef: expected true/false, got 'maybe'"),
                      ('bsz: 2.5\n', 'bad.yaml:1: bsz: expected an integer, got 2.5'),
                      ('preset: qvh\n', "bad.yaml:1: preset: unknown preset 'qvh'"),
                      ('- lr\n', 'bad.yaml: expected a mapping of VLConfig fields, got list'),
                      ('lr: [1e-3\n', 'bad.yaml:2: not valid YAML')]:
        bad.write_text(text)
        with pytest.raises(SystemExit) as e: train_main(['--data', str(tiny_data), '--config', str(bad),
                                                         '--print-config'])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err, err
    bad.write_text('v_feat_dims: 20,10\n')  # a string is read as the flag's value would be
    assert 'v_feat_dims: [20, 10]  #' in print_config(capsys, '--data', tiny_data, '--config', bad)


def test_help_config_lists_every_field_with_type_default_and_meaning():
    import dataclasses
    from videolights.config import VLConfig, get_preset
    from videolights.runs import config_docs
    r = vl('train', '--help-config', '--preset', 'qvhighlights', timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {l.split()[0]: l for l in r.stdout.splitlines() if l.startswith('  ')}
    q, docs = get_preset('qvhighlights'), {d['name']: d for d in config_docs()}
    for f in dataclasses.fields(VLConfig):
        row = rows[f.name]
        assert row.split()[1] == str(f.type).replace(' ', ''), row
        assert docs[f.name]['doc'] and row.rstrip().endswith(docs[f.name]['doc']), row
    assert rows['hidden_dim'].split()[2] == '256' and rows['enc_layers'].split()[2] == '3'   # the preset's values
    heads = [l for l in r.stdout.splitlines() if l and not l.startswith(' ') and l.endswith(':')]
    assert heads[:2] == ['data:', 'model:'] and 'losses:' in heads and 'training:' in heads and len(heads) == 6


# ---------------------------------------------------------------- the tiny preset carries the CPU recipe
def test_tiny_preset_is_the_demo_recipe(tiny_data, tmp_path, capsys):
    "`train --preset tiny --data SYNTH` with no other flag resolves to the config `demo` trains."
    import dataclasses
    from videolights.runs import synth_config, read_config, feature_dirs
    from videolights.config import get_preset
    (tmp_path/'cli.yaml').write_text(print_config(capsys, '--preset', 'tiny', '--data', tiny_data))
    preset, over = read_config(tmp_path/'cli.yaml')
    demo_cfg = synth_config(tiny_data, 'tiny')                            # what experiments.demo builds
    cli = get_preset(preset, **over)
    src = ('v_feat_types', 'v_feat_dims', 't_feat_types', 't_feat_dims')  # the data's widths replace these in build_run
    assert dataclasses.replace(cli, **{k: getattr(demo_cfg, k) for k in src}) == demo_cfg
    assert feature_dirs(cli) == feature_dirs(demo_cfg)                     # the same feature folders
    assert (demo_cfg.n_epoch, demo_cfg.lr, demo_cfg.bsz, demo_cfg.max_v_l, demo_cfg.hard_pos_neg_loss) == (25, 1e-3, 16,
            75, False)
    q = get_preset('qvhighlights')                                        # paper presets keep the official recipe
    assert (q.n_epoch, q.lr, q.bsz, q.input_dropout, q.hard_pos_neg_loss) == (200, 1e-4, 32, 0.5, True)


@pytest.mark.slow
def test_tiny_preset_defaults_learn_on_the_cpu(tmp_path):
    "`videolights train --preset tiny --data SYNTH --out RUN` and nothing else: well above random windows."
    from videolights.experiments import random_submission
    from videolights.runs import official_metrics
    data = tmp_path/'data'
    synth(data, seed=0, size='small', progress=False)
    r = vl('train', '--preset', 'tiny', '--data', data, '--out', tmp_path/'run', timeout=1800)
    assert r.returncode == 0, r.stderr
    assert 'done: 25 epochs' in r.stdout
    best = json.loads((tmp_path/'run'/'best_val_metrics.json').read_text())['brief']
    gt = [json.loads(l) for l in open(data/'highlight_val_release.jsonl')]
    rand = [official_metrics(random_submission(gt, s), gt)['brief'] for s in range(3)]
    for k, need in (('MR-full-mAP', 3), ('HL-min-VeryGood-Hit1', 2)):
        ratio = best[k] / (sum(x[k] for x in rand) / 3)
        print(f"{k}: {best[k]:.2f}, {ratio:.1f}x random")
        assert ratio >= need, (k, best[k], ratio)
