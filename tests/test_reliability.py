"""A catalogue of broken inputs run through every command: each must end in one clear line, never in a traceback.

Every case builds one broken input (a truncated checkpoint, a JSON Lines file cut short, features of the wrong width,
a full disk, ...) and runs a `videolights` command on it. The case holds when

- the exit status is 2 (a user error, as `argparse` uses it);
- stderr has exactly one line with `error:`, the last one, `videolights CMD: error: ...`, naming the file at fault
  (and the line, key or dataset where there is one), and no `Traceback`;
- every existing output the case protects (a run folder, an earlier submission) is byte-for-byte unchanged.

By default the cases run in this process through `videolights.cli.main` (the same code path as the console
command, a few seconds for the whole catalogue); a handful also run as real `python -m videolights` processes.
With `--runslow` every case runs as a process too.

The stale-index cases at the end check that an HDF5 feature store whose datasets were rewritten after its index
was built is read correctly (the index is checked against each dataset) or refused naming the dataset.
"""
import errno, hashlib, io, json, os, pickle, shutil, subprocess, sys, zipfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from videolights.cli import COMMANDS
from videolights.synth import synth

sys.path.insert(0, str(Path(__file__).parent))
import _faults  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')
ENV.pop('VIDEOLIGHTS_DEBUG', None)
TRAIN = ['--preset', 'tiny', '--epochs', '1', '--bsz', '8', '--num_workers', '0', '--no-progress', '--no-tensorboard']


# ---------------------------------------------------------------- the world the cases break
@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "A tiny synthetic dataset, a one-epoch run on it and an earlier `evaluate` output; none of them may change."
    from videolights.cli import main
    root = tmp_path_factory.mktemp('reliability')
    synth(root/'data', seed=0, size='tiny', progress=False)
    with _quiet(): assert main(['train', *TRAIN, '--data', str(root/'data'), '--out', str(root/'run')]) == 0
    with _quiet():
        assert main(['evaluate', '--ckpt', str(root/'run'), '--data', str(root/'data'), '--out', str(root/'subs')]) == 0
    assert (root/'subs'/'hl_val_submission.jsonl').stat().st_size > 0
    return root


class _quiet:
    def __enter__(self):
        import contextlib
        self._cms = [contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())]
        for c in self._cms: c.__enter__()
    def __exit__(self, *a):
        for c in reversed(self._cms): c.__exit__(*a)


def digest(paths)->dict:
    "sha256 of every file under `paths` (files or folders); what a case must leave untouched."
    out = {}
    for p in map(Path, paths):
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob('*') if x.is_file()) if p.exists() else []):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def copy_data(w, tmp, h5=True, feats=True)->Path:
    "A private copy of the dataset folder (jsonl files; features.h5 and/or features/)."
    d = tmp/'data'
    d.mkdir()
    for f in (w/'data').glob('*.json*'): shutil.copy(f, d/f.name)
    if h5: shutil.copy(w/'data'/'features.h5', d/'features.h5')
    if feats: shutil.copytree(w/'data'/'features', d/'features')
    return d


def jsonl(path, recs):
    Path(path).write_text(''.join(json.dumps(r) + '\n' for r in recs))
    return path


def val_recs(w)->list:
    return [json.loads(l) for l in open(w/'data'/'highlight_val_release.jsonl')]


def train_recs(w)->list:
    return [json.loads(l) for l in open(w/'data'/'highlight_train_release.jsonl')]


# ---------------------------------------------------------------- broken files
def truncate(src, dst, frac=0.5)->Path:
    b = Path(src).read_bytes()
    Path(dst).write_bytes(b[:int(len(b) * frac)])
    return Path(dst)


def garbage(dst, n=4096)->Path:
    Path(dst).write_bytes(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
    return Path(dst)


def latin1(dst, recs, at=1)->Path:
    "A jsonl file whose line `at + 1` holds a Latin-1 (not UTF-8) byte."
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    lines[at] = lines[at].replace('"query": "', '"query": "caf\u00e9 ', 1)
    Path(dst).write_bytes('\n'.join(lines[:at]).encode() + b'\n' + lines[at].encode('latin-1') + b'\n'
                          + '\n'.join(lines[at + 1:]).encode() + b'\n')
    return Path(dst)


def cut_jsonl(dst, recs)->Path:
    "A jsonl file cut in the middle of its last record (a copy interrupted)."
    text = ''.join(json.dumps(r) + '\n' for r in recs)
    Path(dst).write_text(text[:len(text) - len(json.dumps(recs[-1])) // 2 - 1])
    return Path(dst)


def foreign_ckpt(dst)->Path:
    torch.save({'state_dict': {'w': torch.zeros(3)}, 'epoch': 3}, dst)
    return Path(dst)


def wrong_shape_ckpt(w, dst)->Path:
    "A checkpoint whose weights do not fit its own config (hidden size changed in the config)."
    ck = torch.load(w/'run'/'model_best.ckpt', weights_only=True)
    ck['config'] = {**ck['config'], 'hidden_dim': ck['config']['hidden_dim'] * 2}
    torch.save(ck, dst)
    return Path(dst)


class _Evil:
    def __reduce__(self): return (os.system, ('echo pwned',))


def pickle_ckpt(dst)->Path:
    with open(dst, 'wb') as f: pickle.dump({'model': _Evil(), 'config': {}}, f)
    return Path(dst)


def set_npz(path, **arrays):
    np.savez(path, **arrays)   # np.savez appends .npz only when missing
    return Path(path)


def first_vid(d)->str:
    "The video of the first val record (what evaluate reads first)."
    return json.loads(open(Path(d)/'highlight_val_release.jsonl').readline())['vid']


def h5_rewrite(path, name, x):
    "Replace one dataset of a store in place (delete + create), as a tool that updates one video would."
    with h5py.File(path, 'a') as f:
        del f[name]
        f.create_dataset(name, data=x)


# ---------------------------------------------------------------- the catalogue
@dataclass
class Case:
    name: str
    cmd: str
    build: object                       # (world, tmp) -> dict(argv=, expect=[...], protect=[...], fault=(dir, errno))
    process: bool = False               # also run as a real process by default (else only with --runslow)


CASES = []
def case(cmd, process=False):
    def deco(fn):
        CASES.append(Case(fn.__name__, cmd, fn, process))
        return fn
    return deco


# --- checkpoints: evaluate --ckpt, train --init-from / --resume
def _eval_ckpt(w, tmp, ck, *expect):
    return dict(argv=['evaluate', '--ckpt', ck, '--data', w/'data', '--out', w/'subs'], expect=[str(ck), *expect],
                protect=[w/'subs', w/'run'])

@case('evaluate', process=True)
def ckpt_missing(w, tmp): return _eval_ckpt(w, tmp, tmp/'nope.ckpt', 'no such file')
@case('evaluate')
def ckpt_zero_bytes(w, tmp):
    (tmp/'z.ckpt').touch()
    return _eval_ckpt(w, tmp, tmp/'z.ckpt', 'empty')
@case('evaluate', process=True)
def ckpt_truncated(w, tmp): return _eval_ckpt(w, tmp, truncate(w/'run'/'model_best.ckpt', tmp/'t.ckpt'), 'truncated')
@case('evaluate')
def ckpt_garbage(w, tmp): return _eval_ckpt(w, tmp, garbage(tmp/'g.ckpt'), 'not a PyTorch checkpoint')
@case('evaluate')
def ckpt_foreign(w, tmp): return _eval_ckpt(w, tmp, foreign_ckpt(tmp/'f.ckpt'), "'model'")
@case('evaluate')
def ckpt_wrong_shapes(w, tmp): return _eval_ckpt(w, tmp, wrong_shape_ckpt(w, tmp/'s.ckpt'), 'shape')
@case('evaluate')
def ckpt_pickle_code(w, tmp): return _eval_ckpt(w, tmp, pickle_ckpt(tmp/'p.ckpt'), 'refus')
@case('evaluate')
def ckpt_empty_run_dir(w, tmp):
    (tmp/'empty_run').mkdir()
    return _eval_ckpt(w, tmp, tmp/'empty_run', 'model_best.ckpt')

@case('train')
def init_from_truncated(w, tmp):
    ck = truncate(w/'run'/'model_best.ckpt', tmp/'t.ckpt')
    return dict(argv=['train', *TRAIN, '--data', w/'data', '--out', tmp/'new', '--init-from', ck], expect=[str(ck)],
                protect=[w/'run'], absent=[tmp/'new'/'model_best.ckpt'])
@case('train')
def init_from_foreign(w, tmp):
    ck = foreign_ckpt(tmp/'f.ckpt')
    return dict(argv=['train', *TRAIN, '--data', w/'data', '--out', tmp/'new', '--init-from', ck],
                expect=[str(ck), "'model'"], absent=[tmp/'new'/'model_best.ckpt'])
@case('train')
def init_from_wrong_shapes(w, tmp):
    ck = torch.load(w/'run'/'model_best.ckpt', weights_only=True)
    ck['model'] = {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if v.ndim else v) for k, v in ck['model'].items()}
    torch.save(ck, tmp/'s.ckpt')
    return dict(argv=['train', *TRAIN, '--data', w/'data', '--out', tmp/'new', '--init-from', tmp/'s.ckpt'],
                expect=[str(tmp/'s.ckpt'), 'shape'], absent=[tmp/'new'/'model_best.ckpt'])
@case('train', process=True)
def resume_truncated_latest(w, tmp):
    run = tmp/'run'
    shutil.copytree(w/'run', run)
    truncate(w/'run'/'model_latest.ckpt', run/'model_latest.ckpt')
    return dict(argv=['train', '--resume', run, '--no-progress'], expect=[str(run/'model_latest.ckpt'), 'truncated'],
                protect=[run])
@case('train')
def resume_not_a_run(w, tmp):
    (tmp/'notrun').mkdir()
    return dict(argv=['train', '--resume', tmp/'notrun'], expect=[str(tmp/'notrun'), 'model_latest.ckpt'])


# --- annotation files: train --data (train split), evaluate --records, eval --gt / --submission, inspect
def _train_on(w, tmp, recs=None, write=None, expect=()):
    d = copy_data(w, tmp, feats=False)
    f = d/'highlight_train_release.jsonl'
    if write: write(f)
    else: jsonl(f, recs)
    return dict(argv=['train', *TRAIN, '--data', d, '--out', tmp/'new'], expect=[str(f), *expect],
                absent=[tmp/'new'/'model_best.ckpt'], protect=[w/'run'])

@case('train', process=True)
def train_jsonl_not_utf8(w, tmp): return _train_on(w, tmp, write=lambda f: latin1(f, train_recs(w)),
                                                   expect=[':2:', 'UTF-8'])
@case('train')
def train_jsonl_truncated(w, tmp):
    n = len(train_recs(w))
    return _train_on(w, tmp, write=lambda f: cut_jsonl(f, train_recs(w)), expect=[f':{n}:', 'truncated'])
@case('train')
def train_missing_key(w, tmp):
    r = train_recs(w)
    del r[3]['duration']
    return _train_on(w, tmp, r, expect=[':4:', "'duration'"])
@case('train')
def train_empty_query(w, tmp):
    r = train_recs(w)
    r[2]['query'] = '   '
    return _train_on(w, tmp, r, expect=[':3:', "'query'", 'empty'])
@case('train')
def train_zero_duration(w, tmp):
    r = train_recs(w)
    r[5]['duration'] = 0
    return _train_on(w, tmp, r, expect=[':6:', "'duration'"])
@case('train')
def train_duplicate_qid(w, tmp):
    r = train_recs(w)
    r[4]['qid'] = r[1]['qid']
    return _train_on(w, tmp, r, expect=[':5:', 'qid', 'line 2'])
@case('train')
def train_every_window_reversed(w, tmp):
    r = train_recs(w)
    for x in r: x['relevant_windows'] = [[b, a] for a, b in x['relevant_windows']]
    return _train_on(w, tmp, r, expect=['every record', 'dropped'])
@case('train')
def train_every_window_past_duration(w, tmp):
    r = train_recs(w)
    for x in r:
        x['relevant_windows'] = [[x['duration'] + 10, x['duration'] + 20]]
        x['relevant_clip_ids'], x['saliency_scores'] = [int(x['duration'])], [[1, 1, 1]]
    return _train_on(w, tmp, r, expect=['every record', 'dropped'])
@case('train')
def train_empty_file(w, tmp): return _train_on(w, tmp, write=lambda f: f.write_text(''), expect=['no records'])

def _records(w, tmp, path, *expect, protect_subs=True):
    return dict(argv=['evaluate', '--ckpt', w/'run', '--data', w/'data', '--records', path, '--out', w/'subs'],
                expect=[str(path), *expect], protect=[w/'subs'])

@case('evaluate')
def records_not_utf8(w, tmp): return _records(w, tmp, latin1(tmp/'v.jsonl', val_recs(w)), ':2:', 'UTF-8')
@case('evaluate')
def records_truncated(w, tmp): return _records(w, tmp, cut_jsonl(tmp/'v.jsonl', val_recs(w)), 'truncated')
@case('evaluate', process=True)
def records_empty_nothing_to_predict(w, tmp):
    (tmp/'v.jsonl').write_text('\n')
    return _records(w, tmp, tmp/'v.jsonl', 'no records')
@case('evaluate')
def records_every_record_dropped(w, tmp):
    r = val_recs(w)
    for x in r: x['relevant_windows'] = [[5, 5]]
    return _records(w, tmp, jsonl(tmp/'v.jsonl', r), 'every record', 'dropped')
@case('evaluate')
def records_missing_key(w, tmp):
    r = val_recs(w)
    del r[2]['vid']
    return _records(w, tmp, jsonl(tmp/'v.jsonl', r), ':3:', "'vid'")

@case('eval', process=True)
def eval_submission_missing(w, tmp):
    return dict(argv=['eval', '--submission', tmp/'no.jsonl', '--gt', w/'data'/'highlight_val_release.jsonl',
                      '--out', w/'subs'/'m.json'], expect=[str(tmp/'no.jsonl'), 'no such file'], protect=[w/'subs'])
@case('eval')
def eval_submission_not_utf8(w, tmp):
    sub = [json.loads(l) for l in open(w/'subs'/'hl_val_submission.jsonl')]
    p = latin1(tmp/'s.jsonl', sub)
    return dict(argv=['eval', '--submission', p, '--gt', w/'data'/'highlight_val_release.jsonl'],
                expect=[str(p), ':2:', 'UTF-8'])
@case('eval')
def eval_submission_truncated(w, tmp):
    sub = [json.loads(l) for l in open(w/'subs'/'hl_val_submission.jsonl')]
    p = cut_jsonl(tmp/'s.jsonl', sub)
    return dict(argv=['eval', '--submission', p, '--gt', w/'data'/'highlight_val_release.jsonl'],
                expect=[f'{p}:{len(sub)}:', 'truncated'])
@case('eval')
def eval_gt_duplicate_qid(w, tmp):
    r = val_recs(w)
    r[3]['qid'] = r[0]['qid']
    p = jsonl(tmp/'gt.jsonl', r)
    return dict(argv=['eval', '--submission', w/'subs'/'hl_val_submission.jsonl', '--gt', p],
                expect=[f'{p}:4:', 'duplicate qid'])
@case('eval')
def eval_gt_is_a_folder(w, tmp):
    return dict(argv=['eval', '--submission', w/'subs'/'hl_val_submission.jsonl', '--gt', tmp],
                expect=[str(tmp), 'folder'])

@case('inspect', process=True)
def inspect_missing(w, tmp): return dict(argv=['inspect', tmp/'nothing'], expect=[str(tmp/'nothing'), 'no such'])
@case('inspect')
def inspect_not_utf8(w, tmp):
    p = latin1(tmp/'v.jsonl', val_recs(w))
    return dict(argv=['inspect', p, '--no-plots'], expect=[f'{p}:2:', 'UTF-8'])
@case('inspect')
def inspect_empty_folder(w, tmp):
    (tmp/'e').mkdir()
    return dict(argv=['inspect', tmp/'e', '--no-plots'], expect=[str(tmp/'e'), 'empty'])


# --- --data itself
@case('train', process=True)
def data_missing(w, tmp):
    return dict(argv=['train', *TRAIN, '--data', tmp/'nowhere', '--out', tmp/'new'],
                expect=[str(tmp/'nowhere'), 'no such'], absent=[tmp/'new'])
@case('train')
def data_is_a_file(w, tmp):
    f = w/'data'/'highlight_val_release.jsonl'
    return dict(argv=['train', *TRAIN, '--data', f, '--out', tmp/'new'], expect=[str(f), 'folder'], absent=[tmp/'new'])
@case('train')
def data_empty_folder(w, tmp):
    (tmp/'e').mkdir()
    return dict(argv=['train', *TRAIN, '--data', tmp/'e', '--out', tmp/'new'], expect=[str(tmp/'e'), 'empty'],
                absent=[tmp/'new'])
@case('evaluate')
def evaluate_data_missing(w, tmp):
    return dict(argv=['evaluate', '--ckpt', w/'run', '--data', tmp/'nowhere', '--out', w/'subs'],
                expect=[str(tmp/'nowhere'), 'no such'], protect=[w/'subs'])
@case('evaluate')
def evaluate_data_empty_folder(w, tmp):
    (tmp/'e').mkdir()
    return dict(argv=['evaluate', '--ckpt', w/'run', '--data', tmp/'e', '--out', w/'subs'],
                expect=[str(tmp/'e'), 'empty'], protect=[w/'subs'])


# --- features: .npz folders, HDF5 stores, widths against the checkpoint
def _eval_feats(w, tmp, d, *expect):
    return dict(argv=['evaluate', '--ckpt', w/'run', '--data', d, '--out', w/'subs'], expect=list(expect),
                protect=[w/'subs'])

@case('evaluate', process=True)
def npz_nan(w, tmp):
    d = copy_data(w, tmp, h5=False)
    v = first_vid(d)
    p = d/'features'/'clip_features'/f'{v}.npz'
    x = np.load(p)['features']
    x[1, 2] = np.nan
    set_npz(p, features=x)
    return _eval_feats(w, tmp, d, str(p), 'NaN')
@case('evaluate')
def npz_inf(w, tmp):
    d = copy_data(w, tmp, h5=False)
    v = first_vid(d)
    p = d/'features'/'slowfast_features'/f'{v}.npz'
    x = np.load(p)['features']
    x[0, 0] = np.inf
    set_npz(p, features=x)
    return _eval_feats(w, tmp, d, str(p), 'inf')
@case('evaluate')
def npz_wrong_width(w, tmp):
    d = copy_data(w, tmp, h5=False)
    v = first_vid(d)
    p = d/'features'/'clip_features'/f'{v}.npz'
    set_npz(p, features=np.ones((20, 7), np.float32))
    return _eval_feats(w, tmp, d, str(p), 'dim mismatch')
@case('evaluate')
def npz_object_dtype(w, tmp):
    d = copy_data(w, tmp, h5=False)
    v = first_vid(d)
    p = d/'features'/'clip_features'/f'{v}.npz'
    np.savez(p, features=np.array([[1, 'a']], dtype=object))
    return _eval_feats(w, tmp, d, str(p), 'object')
@case('evaluate')
def npz_truncated(w, tmp):
    d = copy_data(w, tmp, h5=False)
    v = first_vid(d)
    p = d/'features'/'clip_features'/f'{v}.npz'
    truncate(p, p, 0.6)
    return _eval_feats(w, tmp, d, str(p), 'truncated')
@case('evaluate')
def npz_missing_file(w, tmp):
    d = copy_data(w, tmp, h5=False)
    v = first_vid(d)
    p = d/'features'/'clip_features'/f'{v}.npz'
    p.unlink()
    return _eval_feats(w, tmp, d, v, 'clip_features')
@case('evaluate', process=True)
def h5_truncated(w, tmp):
    d = copy_data(w, tmp, feats=False)
    truncate(d/'features.h5', d/'features.h5', 0.5)
    return _eval_feats(w, tmp, d, str(d/'features.h5'), 'truncated')
@case('evaluate')
def h5_garbage(w, tmp):
    d = copy_data(w, tmp, feats=False)
    garbage(d/'features.h5')
    return _eval_feats(w, tmp, d, str(d/'features.h5'), 'HDF5')
@case('evaluate')
def h5_wrong_width_dataset(w, tmp):
    d = copy_data(w, tmp, feats=False)
    v = first_vid(w/'data')
    h5_rewrite(d/'features.h5', f'video/clip_features/{v}', np.ones((75, 6), np.float32))
    return _eval_feats(w, tmp, d, f'{d/"features.h5"}:/video/clip_features/{v}', 'dim mismatch')
@case('evaluate')
def h5_nan_dataset(w, tmp):
    d = copy_data(w, tmp, feats=False)
    v = first_vid(w/'data')
    with h5py.File(d/'features.h5',
                   'a') as f: f[f'video/slowfast_features/{v}'][3, 1] = np.nan  # in place: index still right
    return _eval_feats(w, tmp, d, f'{d/"features.h5"}:/video/slowfast_features/{v}', 'NaN')
@case('evaluate', process=True)
def widths_do_not_match_checkpoint(w, tmp):
    d = tmp/'other'
    synth(d, seed=1, size='tiny', v_dims=(6, 4), progress=False)
    return _eval_feats(w, tmp, d, 'slowfast_features', '6', '8')
@case('train')
def train_npz_wrong_width(w, tmp):
    d = copy_data(w, tmp, h5=False)
    v = train_recs(w)[0]['vid']
    p = d/'features'/'slowfast_features'/f'{v}.npz'
    set_npz(p, features=np.ones((75, 5), np.float32))
    return dict(argv=['train', *TRAIN, '--data', d, '--out', tmp/'new'], expect=[str(p), 'dim mismatch'],
                absent=[tmp/'new'/'model_best.ckpt'])
@case('train')
def train_npz_nan_workers(w, tmp):
    d = copy_data(w, tmp, h5=False)
    v = train_recs(w)[0]['vid']
    p = d/'features'/'clip_features'/f'{v}.npz'
    x = np.load(p)['features']
    x[0, 0] = np.nan
    set_npz(p, features=x)
    argv = ['train', *TRAIN, '--data', d, '--out', tmp/'new']
    argv[argv.index('--num_workers') + 1] = '2'                     # the error crosses a DataLoader worker
    return dict(argv=argv, expect=[str(p), 'NaN'], absent=[tmp/'new'/'model_best.ckpt'])

@case('convert-features')
def convert_src_missing(w, tmp):
    return dict(argv=['convert-features', tmp/'none', tmp/'x.h5'], expect=[str(tmp/'none'), 'no such'],
                absent=[tmp/'x.h5'])
@case('convert-features')
def convert_npz_truncated(w, tmp):
    d = copy_data(w, tmp, h5=False)
    v = first_vid(d)
    p = d/'features'/'clip_features'/f'{v}.npz'
    truncate(p, p, 0.6)
    return dict(argv=['convert-features', d/'features', tmp/'x.h5', '--quiet'], expect=[str(p), 'truncated'],
                absent=[tmp/'x.h5'])
@case('convert-features')
def convert_npz_object(w, tmp):
    d = copy_data(w, tmp, h5=False)
    v = first_vid(d)
    p = d/'features'/'clip_features'/f'{v}.npz'
    np.savez(p, features=np.array([[1, 'a']], dtype=object))
    return dict(argv=['convert-features', d/'features', tmp/'x.h5', '--quiet'], expect=[str(p), 'object'],
                absent=[tmp/'x.h5'])


# --- predict and extract (their own readers: checkpoints, video folders)
@case('predict')
def predict_ckpt_truncated(w, tmp):
    ck = truncate(w/'run'/'model_best.ckpt', tmp/'t.ckpt')
    return dict(argv=['predict', tmp/'clip.mp4', '-q', 'a dog', '--ckpt', ck], expect=[str(ck), 'truncated'])
@case('predict')
def predict_ckpt_missing(w, tmp):
    return dict(argv=['predict', tmp/'clip.mp4', '-q', 'a dog', '--ckpt', tmp/'no.ckpt'], expect=[str(tmp/'no.ckpt')])
@case('extract')
def extract_src_missing(w, tmp):
    return dict(argv=['extract', tmp/'no_videos', '--out', tmp/'f.h5'], expect=[str(tmp/'no_videos')],
                absent=[tmp/'f.h5'])


# --- writes refused by the system: a full disk, no permission
@case('evaluate', process=True)
def evaluate_disk_full(w, tmp):
    out = tmp/'subs'
    shutil.copytree(w/'subs', out)
    return dict(argv=['evaluate', '--ckpt', w/'run', '--data', w/'data', '--out', out],
                expect=[str(out/'hl_val_submission.jsonl'), 'no space left'], protect=[out], fault=(out, errno.ENOSPC))
@case('evaluate')
def evaluate_permission_denied(w, tmp):
    out = tmp/'subs'
    shutil.copytree(w/'subs', out)
    return dict(argv=['evaluate', '--ckpt', w/'run', '--data', w/'data', '--out', out],
                expect=[str(out/'hl_val_submission.jsonl'), 'permission denied'], protect=[out],
                fault=(out, errno.EACCES))
@case('eval')
def eval_out_disk_full(w, tmp):
    return dict(argv=['eval', '--submission', w/'subs'/'hl_val_submission.jsonl', '--gt',
                      w/'data'/'highlight_val_release.jsonl',
                      '--out', tmp/'m.json'], expect=[str(tmp/'m.json'), 'no space left'], fault=(tmp, errno.ENOSPC),
                absent=[tmp/'m.json'])
@case('train')
def train_disk_full(w, tmp):
    return dict(argv=['train', *TRAIN, '--data', w/'data', '--out', tmp/'new'],
                expect=[str(tmp/'new'), 'no space left'],
                fault=(tmp/'new', errno.ENOSPC), absent=[tmp/'new'/'model_best.ckpt'])
@case('train')
def train_permission_denied(w, tmp):
    return dict(argv=['train', *TRAIN, '--data', w/'data', '--out', tmp/'new'],
                expect=[str(tmp/'new'), 'permission denied'],
                fault=(tmp/'new', errno.EACCES), absent=[tmp/'new'/'model_best.ckpt'])
@case('convert-features')
def convert_disk_full(w, tmp):
    return dict(argv=['convert-features', w/'data'/'features', tmp/'o'/'x.h5', '--quiet'],
                expect=[str(tmp/'o'), 'no space left'], fault=(tmp/'o', errno.ENOSPC), absent=[tmp/'o'/'x.h5'])


# --- bad command lines: argparse's own errors are one line too, ending with where to look
def _usage(cmd, argv, *expect, prog=None):
    prog = prog or cmd
    return dict(argv=[*cmd.split(), *argv], expect=[*expect, f'(see videolights {prog} --help)'], only_line=True)

@case('train', process=True)
def usage_train_bad_int(w, tmp): return _usage('train', ['--epochs', 'x', '--data', w/'data'], "'x'", 'int')
@case('train')
def usage_train_no_out(w, tmp): return _usage('train', ['--data', w/'data'], '--out RUN_DIR is required')
@case('train')
def usage_train_out_holds_a_run(w, tmp):
    return {**_usage('train', [*TRAIN, '--data', w/'data', '--out', w/'run'], str(w/'run'), 'already holds a run'),
            'protect': [w/'run'], 'only_line': False}    # a note on the data's widths comes first
@case('evaluate')
def usage_evaluate_no_ckpt(w, tmp): return _usage('evaluate', ['--data', w/'data'], 'required: --ckpt')
@case('eval')
def usage_eval_bad_dataset(w, tmp):
    return _usage('eval', ['--submission', w/'subs'/'hl_val_submission.jsonl', '--gt',
                           w/'data'/'highlight_val_release.jsonl',
                           '--dataset', 'nope'], "--dataset: invalid choice: 'nope'")
@case('predict')
def usage_predict_no_query(w, tmp): return _usage('predict', [tmp/'clip.mp4', '--ckpt', w/'run'], '-q/--query')
@case('merge-submissions')
def usage_merge_gt_and_queries(w, tmp):
    s = w/'subs'/'hl_val_submission.jsonl'
    return _usage('merge-submissions', [tmp/'m.jsonl', s, '--gt', s, '--queries', s], 'not both')
@case('synth')
def usage_synth_bad_dims(w, tmp): return _usage('synth', ['--out', tmp/'y', '--v-dims', '8,x'], '--v-dims')
@case('features check')
def usage_features_sub_command(w, tmp): return _usage('features check', [], 'required: data')
@case('reproduce')
def usage_reproduce_no_data(w, tmp): return _usage('reproduce', ['--out', tmp/'r'], '--data DIR is required')
@case('ablate')
def usage_ablate_no_data(w, tmp): return _usage('ablate', ['--out', tmp/'a'], '--data is required')


# --- outputs written whole: a disk that fills up in the middle of a write leaves the earlier output as it was
#     (and no temporary file: `protect` digests hidden files too)
def _midway(out, argv):
    return dict(argv=argv, expect=[str(out), 'no space left'], protect=[out.parent],
                fault=(out.parent, errno.ENOSPC, 64))

def _old(path, text='OLD\n')->Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return Path(path)

@case('eval', process=True)
def midway_eval_out(w, tmp):
    out = _old(tmp/'o'/'m.json')
    return _midway(out, ['eval', '--submission', w/'subs'/'hl_val_submission.jsonl', '--gt',
                         w/'data'/'highlight_val_release.jsonl', '--out', out])
@case('evaluate')
def midway_evaluate_submission(w, tmp):
    shutil.copytree(w/'subs', tmp/'o')
    return _midway(tmp/'o'/'hl_val_submission.jsonl',
                   ['evaluate', '--ckpt', w/'run', '--data', w/'data', '--out', tmp/'o'])
@case('merge-submissions')
def midway_merge_submissions(w, tmp):
    out = _old(tmp/'o'/'m.jsonl')
    return _midway(out, ['merge-submissions', out, w/'subs'/'hl_val_submission.jsonl'])
@case('inspect')
def midway_inspect_json(w, tmp):
    out = _old(tmp/'o'/'i.json')
    return _midway(out, ['inspect', w/'data'/'highlight_val_release.jsonl', '--no-plots', '--json', out])
@case('convert-features', process=True)
def midway_convert_features(w, tmp):
    (tmp/'o').mkdir()
    out = Path(shutil.copy(w/'data'/'features.h5', tmp/'o'/'x.h5'))
    return _midway(out, ['convert-features', w/'data'/'features', out, '--quiet', '--overwrite'])
@case('ablate')
def midway_ablate_figure(w, tmp):
    out = _old(tmp/'o'/'ablation_table_V.png', 'OLD PNG')
    return _midway(out, ['ablate', '--plot-only', _ablation_csv(tmp), '--figdir', tmp/'o'])
@case('predict')
def midway_predict_json(w, tmp):
    out = _old(tmp/'o'/'p.jsonl')
    return _midway(out, [*_predict_argv(w), '--json', out])


def _ablation_csv(tmp)->Path:
    import pandas as pd
    from videolights.visualize import METRICS
    pd.DataFrame([dict(table='V', row=r, switches='', metric=m, value=v + s, seed=s, data='synthetic', note='')
                  for r, v in (('1', 20.), ('13', 30.)) for m in METRICS for s in (0, 1)]).to_csv(tmp/'results.csv',
                          index=False)
    return tmp/'results.csv'


def _predict_argv(w)->list:
    "predict on a 35 s test video with tiny random CLIP and BLIP-2 encoders and an untrained model (built once)."
    from videolights.video import make_tiny_clip, make_tiny_blip2, make_test_video
    from videolights.config import get_preset
    from videolights.model import build_model
    from videolights.train import save_checkpoint, config_dict
    d = w/'predict'
    if not (d/'model.ckpt').exists():
        make_tiny_clip(d/'clip')
        make_tiny_blip2(d/'blip')
        make_test_video(d/'v.mp4', 70, 1, size=(32, 24))
        torch.manual_seed(0)
        cfg = get_preset('tiny', v_feat_types=('clip', 'blip'), v_feat_dims=(8, 24), t_feat_types=('clip', 'blip'),
                         t_feat_dims=(16, 24), blip_features=True, blip_dim=24, max_v_l=16, max_q_l=32)
        save_checkpoint(dict(model=build_model(cfg).state_dict(), config=config_dict(cfg)), d/'model.ckpt')
    return ['predict', d/'v.mp4', '-q', 'a dog runs', '--ckpt', d/'model.ckpt', '--clip-model', d/'clip',
            '--blip-model', d/'blip', '--device', 'cpu']


# ---------------------------------------------------------------- running a case
def run_inproc(argv, fault, capfd):
    from videolights.cli import main
    real = _faults.install(*fault) if fault else None
    try: rc = main([str(a) for a in argv])
    except SystemExit as e: rc = e.code      # argparse exits by itself
    finally:
        if real: _faults.uninstall(real)
    return rc, capfd.readouterr().err


def run_process(argv, fault):
    pre = [str(Path(__file__).parent/'_faults.py'), *map(str, fault), '--'] if fault else ['-m', 'videolights']
    r = subprocess.run([sys.executable, *pre, *map(str, argv)], capture_output=True, text=True, env=ENV, timeout=600)
    return r.returncode, r.stderr


def check(c:Case, spec:dict, rc:int, err:str):
    "The catalogue's rule: status 2, one `videolights CMD: error:` line naming the file (line, key), no traceback."
    assert 'Traceback' not in err, err
    errs = [l for l in err.splitlines() if 'error:' in l]
    assert len(errs) == 1, err
    line = errs[0]
    assert err.rstrip('\n').splitlines()[-1] == line, f'the error line is not the last line:\n{err}'
    assert line.startswith(f'videolights {c.cmd}: error: '), line
    for s in spec['expect']: assert s in line, f'{s!r} not in: {line}'
    if spec.get('only_line'): assert err.count('\n') == 1, f'more than the error line:\n{err}'
    assert rc == 2, (rc, err)


@pytest.mark.parametrize('c', CASES, ids=[c.name for c in CASES])
def test_broken_input_one_clear_line(c, world, tmp_path, capfd):
    spec = c.build(world, tmp_path)
    before = digest(spec.get('protect', []))
    rc, err = run_inproc(spec['argv'], spec.get('fault'), capfd)
    check(c, spec, rc, err)
    assert digest(spec.get('protect', [])) == before, 'an existing output changed'
    for p in spec.get('absent', []): assert not Path(p).exists(), f'{p} was written'


@pytest.mark.parametrize('c', [pytest.param(c, marks=() if c.process else pytest.mark.slow) for c in CASES],
                         ids=[c.name for c in CASES])
def test_broken_input_as_a_process(c, world, tmp_path):
    spec = c.build(world, tmp_path)
    before = digest(spec.get('protect', []))
    rc, err = run_process(spec['argv'], spec.get('fault'))
    check(c, spec, rc, err)
    assert digest(spec.get('protect', [])) == before, 'an existing output changed'
    for p in spec.get('absent', []): assert not Path(p).exists(), f'{p} was written'


@pytest.mark.parametrize('cmd', sorted(COMMANDS))
def test_every_command_bad_option_one_line(cmd, capfd):
    "Every sub-command's parser: a bad command line (here an unknown option) is one line with where to look, status 2."
    from videolights.cli import main
    with pytest.raises(SystemExit) as e: main([cmd, '--no-such-option', '1'])
    err = capfd.readouterr().err
    assert e.value.code == 2
    assert err.count('\n') == 1 and err.startswith(f'videolights {cmd}: error: '), err
    assert err.endswith(f'(see videolights {cmd} --help)\n'), err


def test_a_bug_keeps_its_traceback_and_debug_shows_every_one(world, tmp_path):
    "The other side of the rule: an error that is not the user's is not hidden; --debug shows user errors' tracebacks."
    bad = [sys.executable, '-c', 'import sys; from videolights.cli import main; import videolights.metrics as m; '
           'm.eval_submission = lambda *a, **k: {}["bug"]; sys.exit(main(sys.argv[1:]))',
           'eval', '--submission', str(world/'subs'/'hl_val_submission.jsonl'), '--gt',
           str(world/'data'/'highlight_val_release.jsonl')]
    r = subprocess.run(bad, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 1 and 'Traceback' in r.stderr and "KeyError: 'bug'" in r.stderr
    for how in (['--debug'], []):
        env = ENV if how else dict(ENV, VIDEOLIGHTS_DEBUG='1')
        r = subprocess.run([sys.executable, '-m', 'videolights', 'eval', *how, '--submission', str(tmp_path/'no.jsonl'),
                            '--gt', str(tmp_path/'no.jsonl')], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 2 and 'Traceback' in r.stderr
        assert r.stderr.splitlines()[-1].startswith(f"videolights eval: error: {tmp_path/'no.jsonl'}: no such file")


# ---------------------------------------------------------------- temporary files of killed writes
def _pids():
    "The PID of a process that has ended (a killed writer) and of one that runs (a writer still at work)."
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    return dead.pid, subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])


WRITERS = {   # a command that writes `out`: (world, tmp) -> (argv, out)
    'convert-features': lambda w, t: (['convert-features', w/'data'/'features', t/'o'/'x.h5', '--quiet'], t/'o'/'x.h5'),
    'eval': lambda w, t: (['eval', '--submission', w/'subs'/'hl_val_submission.jsonl', '--gt',
                           w/'data'/'highlight_val_release.jsonl', '--out', t/'o'/'m.json'], t/'o'/'m.json'),
    'evaluate': lambda w, t: (['evaluate', '--ckpt', w/'run', '--data', w/'data', '--out', t/'o'],
                              t/'o'/'hl_val_submission.jsonl'),
    'merge-submissions': lambda w, t: (['merge-submissions', t/'o'/'m.jsonl', w/'subs'/'hl_val_submission.jsonl'],
                                       t/'o'/'m.jsonl'),
    'inspect': lambda w, t: (['inspect', w/'data'/'highlight_val_release.jsonl', '--figdir', t/'o'],
                             t/'o'/'inspect_highlight_val_release.png'),
    'synth': lambda w, t: (['synth', '--out', t/'o', '--size', 'tiny', '--no-h5', '--n-train', '2', '--n-val', '1'],
                           t/'o'/'synth_info.json'),
    'ablate': lambda w, t: (['ablate', '--plot-only', _ablation_csv(t), '--figdir', t/'o'],
                            t/'o'/'ablation_table_V.png'),
    'predict': lambda w, t: ([*_predict_argv(w), '--json', t/'o'/'p.jsonl'], t/'o'/'p.jsonl'),
}


@pytest.mark.parametrize('cmd', list(WRITERS))
def test_next_run_removes_stale_temps(cmd, world, tmp_path, capfd):
    "A killed write leaves `.NAME.PID.tmp`; the next run of the command removes it, and never a live writer's."
    from videolights.cli import main
    argv, out = WRITERS[cmd](world, tmp_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    dead, live = _pids()
    try:
        stale, busy = out.with_name(f'.{out.name}.{dead}.tmp'), out.with_name(f'.{out.name}.{live.pid}.tmp')
        for p in (stale, busy): p.write_bytes(b'half a file')
        assert main([str(a) for a in argv]) == 0, capfd.readouterr().err
        assert out.stat().st_size > 0
        assert not stale.exists() and busy.read_bytes() == b'half a file'
        assert sorted(p.name for p in out.parent.glob('.*.tmp')) == [busy.name]
    finally:
        live.kill()
        live.wait()


def test_killed_convert_features_leaves_old_store_and_next_run_cleans(world, tmp_path):
    "SIGKILL in the middle of writing a store: the old store is intact, its temp file is left, the next run removes it."
    out = Path(shutil.copy(world/'data'/'features.h5', tmp_path/'x.h5'))
    before = digest([out])
    argv = ['convert-features', world/'data'/'features', out, '--quiet', '--overwrite']
    rc, _ = run_process(argv, (tmp_path, 0, 0))                  # killed at its second dataset
    assert rc == -9
    left = list(tmp_path.glob('.x.h5.*.tmp'))
    assert len(left) == 1 and digest([out]) == before
    rc, err = run_process(argv, None)
    assert rc == 0, err
    assert not list(tmp_path.glob(".*.tmp"))
    from videolights.data import open_features
    v = first_vid(world/'data')
    np.testing.assert_array_equal(open_features(out).video('clip_features', v),
                                  open_features(world/'data'/'features.h5').video('clip_features', v))


# ---------------------------------------------------------------- stale HDF5 index
def _store(w, tmp)->Path:
    p = tmp/'features.h5'
    shutil.copy(w/'data'/'features.h5', p)
    return p


def test_stale_index_rewritten_dataset_is_read_as_it_is_now(world, tmp_path):
    "Replaced (moved in the file), changed in place, or resized: every read returns the dataset's current values."
    from videolights.data import open_features, feature_stamp
    p, v = _store(world, tmp_path), first_vid(world/'data')
    old = open_features(p).video('clip_features', v)
    moved, resized = np.full_like(old, 0.25), np.full((7, old.shape[1]), 0.5, np.float32)
    h5_rewrite(p, f'video/clip_features/{v}', moved)   # a foreign tool: no stamp (HDF5 may even reuse the offset)
    with pytest.warns(UserWarning, match=f'/video/clip_features/{v}: rewritten after'):
        np.testing.assert_array_equal(open_features(p).video('clip_features', v), moved)
    with h5py.File(p, 'a') as f: f[f'video/clip_features/{v}'][0] = 2.0     # in place: same offset, same stamp
    got = open_features(p).video('clip_features', v)
    assert (got[0] == 2.0).all() and (got[1:] == 0.25).all()
    with h5py.File(p, 'a') as f:                                            # our writer: stamped
        del f[f'video/clip_features/{v}']
        f.create_dataset(f'video/clip_features/{v}', data=resized).attrs['stamp'] = feature_stamp(resized)
    with pytest.warns(UserWarning, match='rewritten after'):
        np.testing.assert_array_equal(open_features(p).video('clip_features', v), resized)
    other = json.loads(open(world/'data'/'highlight_val_release.jsonl').readlines()[1])['vid']
    np.testing.assert_array_equal(open_features(p).video('clip_features', other),
                                  open_features(world/'data'/'features.h5').video('clip_features', other))


def test_stale_index_same_offset_new_stamp_and_swapped_keys(world, tmp_path):
    "A dataset whose stamp no longer matches the index, and a store whose keys changed at an unchanged count."
    from videolights.data import open_features, FeatureNotFoundError
    p, v = _store(world, tmp_path), first_vid(world/'data')
    with h5py.File(p, 'a') as f:
        ds = f[f'video/slowfast_features/{v}']
        ds[...] = 1.5
        ds.attrs['stamp'] = 12345                                           # rewritten by a stamping writer
    with pytest.warns(UserWarning, match='rewritten after'):
        assert (open_features(p).video('slowfast_features', v) == 1.5).all()
    with h5py.File(p, 'a') as f:                                            # one key removed, another added
        f.move(f'video/clip_features/{v}', 'video/clip_features/brand_new_0.0_10.0')
    src = open_features(p)
    assert src.video('clip_features', 'brand_new_0.0_10.0').shape[1] == 4
    with pytest.raises(FeatureNotFoundError, match=f"vid '{v}'"): src.video('clip_features', v)


def test_stale_index_wrong_width_is_refused_naming_the_dataset(world, tmp_path):
    from videolights.data import open_features, DataFormatError
    p, v = _store(world, tmp_path), first_vid(world/'data')
    h5_rewrite(p, f'video/clip_features/{v}', np.ones((10, 6), np.float32))
    with pytest.warns(UserWarning), pytest.raises(DataFormatError,
                                                  match=f'{p}:/video/clip_features/{v}: feature dim mismatch'):
        open_features(p).video('clip_features', v)


def test_stale_index_evaluate_equals_a_fresh_store(world, tmp_path):
    """evaluate on a store with a rewritten dataset gives the submission of a store converted afresh from the same
    values."""
    from videolights.cli import main
    from videolights.data import convert_features
    v = first_vid(world/'data')
    d = copy_data(world, tmp_path)
    x = np.load(d/'features'/'clip_features'/f'{v}.npz')['features']
    new = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    set_npz(d/'features'/'clip_features'/f'{v}.npz', features=new)
    (d/'features.h5').unlink()
    convert_features(d/'features', tmp_path/'fresh.h5', progress=False)
    stale = _store(world, tmp_path)
    h5_rewrite(stale, f'video/clip_features/{v}', new)
    subs = {}
    for name, store in (('fresh', tmp_path/'fresh.h5'), ('stale', stale)):
        shutil.copy(store, d/'features.h5')
        with _quiet(): assert main(['evaluate', '--ckpt', str(world/'run'), '--data', str(d), '--out',
                                    str(tmp_path/name)]) == 0
        subs[name] = (tmp_path/name/'hl_val_submission.jsonl').read_text()
    assert subs['fresh'] == subs['stale']
    assert subs['fresh'] != (world/'subs'/'hl_val_submission.jsonl').read_text()    # the change is visible
