"""Scaling out (03a_shards): extraction, evaluation and prediction split over processes give exactly the one-process
outputs. Shares run as separate processes (`--shard K/N`, as a job array's tasks) and under `torchrun` (CPU, gloo,
2-3 processes, started with `python -m torch.distributed.run` as a user would); the merged stores and submissions
are compared bit for bit with a one-process run. Offline: tiny random encoders, synthetic videos."""
import json, os, signal, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import pytest
import torch

pytest.importorskip('av')
pytest.importorskip('transformers')
import h5py
from videolights import video as V
from videolights.cli import main as cli_main
from videolights.shards import shard_path

DURATIONS = {'a_long': 14, 'b_mid': 9, 'c_short': 4, 'd_mid': 8, 'e_tiny': 3}
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "Videos, queries, tiny encoders, and the store one process extracts from them."
    d = tmp_path_factory.mktemp('scale')
    (d / 'vids').mkdir()
    for name, dur in DURATIONS.items(): V.make_test_video(d / 'vids' / f'{name}.mp4', dur, fps=3, size=(32, 24))
    (d / 'q.jsonl').write_text(''.join(json.dumps(dict(qid=i, query=q)) + '\n' for i, q in
                                       enumerate(['the dog runs', 'a cat', 'and then the thing', 'in the ring', 'x'])))
    clip, blip = V.make_tiny_clip(d / 'clip', image_size=64), V.make_tiny_blip2(d / 'blip', image_size=64)
    args = [str(d / 'vids'), '--encoders', 'clip,blip', '--clip-model', str(clip), '--blip-model', str(blip),
            '--queries', str(d / 'q.jsonl'), '--batch-size', '4', '--device', 'cpu']
    n = torch.get_num_threads()
    torch.set_num_threads(1)                      # as in the worker processes (OMP_NUM_THREADS=1)
    try: assert cli_main(['extract', *args, '--out', str(d / 'single.h5')]) == 0
    finally: torch.set_num_threads(n)
    return dict(dir=d, args=args, single=d / 'single.h5')


def _run(argv, torchrun:int=0, check=True, **kw):
    pre = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] if torchrun \
          else [sys.executable]
    r = subprocess.run([*pre, '-m', 'videolights', *argv], env=ENV, capture_output=True, text=True, timeout=600, **kw)
    if check: assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _dump(path)->dict:
    "Everything in a store: each object's attributes, each dataset's dtype, shape and bytes; `/index` keys, sizes."
    out = {}
    with h5py.File(path, 'r') as f:
        out['/'] = dict(f.attrs)
        def visit(name, obj):
            attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                if name.endswith('/loc'): data = data[:, 1:]                   # file offsets differ; (rows, cols) not
                data = obj.asstr()[()].tolist() if obj.dtype.kind == 'O' else np.asarray(data).tobytes()
                out[name] = (attrs, obj.dtype.str, obj.shape, data)
            else: out[name] = attrs
        f.visititems(visit)
    return out


def _same_store(a, b):
    da, db = _dump(a), _dump(b)
    assert sorted(da) == sorted(db)
    for k in da: assert da[k] == db[k], k
    return da


def test_single_store_has_everything(world):
    d = _dump(world['single'])
    assert sorted(k.split('/')[-1] for k in d if k.startswith('video/clip_features/')) == sorted(DURATIONS)
    assert d['index/video/clip_features/keys'][2] == (len(DURATIONS),)
    assert sum(k.startswith('text/clip_text_features/') for k in d) == 5


def test_shards_in_separate_processes_merge_to_the_single_store(world, tmp_path, capsys):
    "Two job-array tasks (`--shard K/2`), then `merge-features`: the one-process store, bit for bit."
    out = tmp_path / 'f.h5'
    for k in range(2): _run(['extract', *world['args'], '--out', str(out), '--shard', f'{k}/2'])
    shards = [shard_path(out, k, 2) for k in range(2)]
    with h5py.File(shards[0]) as s0, h5py.File(shards[1]) as s1:
        ids = [json.loads(s.attrs['shard_ids']) for s in (s0, s1)]
        assert 'text' in s0 and 'text' not in s1                          # share 0 encodes the queries
    assert ids == [['a_long', 'c_short'], ['b_mid', 'd_mid', 'e_tiny']]    # 18 s and 20 s of video
    assert cli_main(['merge-features', str(tmp_path / 'g.h5'), str(shards[0])]) == 2
    err = capsys.readouterr().err
    assert 'shard store 1/2 missing' in err and len(err.splitlines()) == 1
    assert cli_main(['merge-features', str(out), *map(str, shards[::-1])]) == 0
    _same_store(out, world['single'])


@pytest.mark.parametrize('procs', [2, pytest.param(3, marks=pytest.mark.slow)])
def test_torchrun_ranks_equal_one_process(world, tmp_path, procs):
    "`torchrun --nproc_per_node N -m videolights extract`: rank 0 merges at the end; shard stores removed."
    out = tmp_path / 'f.h5'
    r = _run(['extract', *world['args'], '--out', str(out)], torchrun=procs)
    assert f'merged {procs} shard stores' in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ['f.h5']
    _same_store(out, world['single'])


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from videolights import video as V
    calls, real = [0], V.write_feature
    def write_feature(*a, **k):
        calls[0] += 1
        if calls[0] == 3: os.kill(os.getpid(), signal.SIGKILL)  # the second video: its first source is written
        return real(*a, **k)
    V.write_feature = write_feature
    from videolights.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_killed_share_resumes(world, tmp_path, capsys):
    "A task killed while writing its second video: the store keeps the first, the rerun redoes only the second."
    out = tmp_path / 'f.h5'
    argv = ['extract', *world['args'], '--out', str(out), '--shard', '1/2']
    r = subprocess.run([sys.executable, '-c', _KILLER, *argv], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL
    s1 = shard_path(out, 1, 2)
    with h5py.File(s1) as f:                                               # readable after the kill
        assert not f.attrs['shard_done'] and sorted(f['video/clip_features']) == ['b_mid']
    _run(['extract', *world['args'], '--out', str(out), '--shard', '0/2'])
    assert cli_main(['merge-features', str(out), str(shard_path(out, 0, 2)), str(s1)]) == 2
    err = capsys.readouterr().err
    assert 'shard 1/2 is unfinished' in err and '--shard 1/2 again' in err
    r = _run(argv)
    assert '2 video(s) extracted, 1 already there' in r.stdout
    assert cli_main(['merge-features', str(out), str(shard_path(out, 0, 2)), str(s1), '--delete']) == 0
    assert not s1.exists()
    _same_store(out, world['single'])


def test_share_of_another_split_is_refused(world, tmp_path, capsys):
    out = tmp_path / 'f.h5'
    with h5py.File(shard_path(out, 1, 2), 'w') as f:
        f.attrs['shard'], f.attrs['shard_ids'], f.attrs['shard_done'] = '1/2', '["zz"]', False
    assert cli_main(['extract', *world['args'], '--out', str(out), '--shard', '1/2']) == 2
    assert 'another share of the videos' in capsys.readouterr().err
    assert cli_main(['extract', *world['args'], '--out', str(out), '--shard', '2/2']) == 2
    assert '0 <= K < N' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ evaluate
@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A synthetic dataset (6 val queries), a random tiny model's checkpoint, and its one-process evaluation."
    from videolights.synth import synth
    from videolights.runs import synth_config, evaluate
    from videolights.model import build_model
    from videolights.train import save_checkpoint, config_dict
    d = tmp_path_factory.mktemp('eval')
    synth(d / 'data', seed=0, size='tiny', progress=False)
    torch.manual_seed(0)
    cfg = synth_config(d / 'data')
    (d / 'run').mkdir()
    save_checkpoint(dict(model=build_model(cfg).state_dict(), config=config_dict(cfg)), d / 'run' / 'model_best.ckpt')
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try: m, sub, path = evaluate(d / 'run', d / 'data', 'val', d / 'single', 'cpu', batch_size=2, progress=False)
    finally: torch.set_num_threads(n)
    assert len(sub) == 6 and m is not None
    args = ['--ckpt', str(d / 'run'), '--data', str(d / 'data'), '--split', 'val', '--device', 'cpu',
            '--batch-size', '2']
    return dict(dir=d, args=args, sub=path, metrics=d / 'single' / 'hl_val_submission_metrics.json',
                gt=d / 'data' / 'highlight_val_release.jsonl')


def test_evaluate_shards_merge_to_the_single_submission(run, tmp_path):
    "Three job-array tasks (`evaluate --shard K/3`) + `merge-submissions --gt`: the same file and metrics, bit for bit."
    for k in range(3): _run(['evaluate', *run['args'], '--out', str(tmp_path), '--shard', f'{k}/3'])
    parts = sorted(tmp_path.glob('hl_val_submission.shard-*-of-3.jsonl'))
    assert [len(p.read_text().splitlines()) for p in parts] == [2, 2, 2]
    assert not (tmp_path / 'hl_val_submission_metrics.json').exists()     # a part is not scored
    out = tmp_path / 'merged' / 'hl_val_submission.jsonl'
    assert cli_main(['merge-submissions', str(out), *map(str, parts[::-1]), '--gt', str(run['gt'])]) == 0
    assert out.read_bytes() == run['sub'].read_bytes()
    metrics = json.loads(out.with_name('hl_val_submission_metrics.json').read_text())
    assert metrics == json.loads(run['metrics'].read_text())


def test_merge_submissions_names_a_missing_part_or_qid(run, tmp_path, capsys):
    lines = run['sub'].read_text().splitlines(keepends=True)
    for k, chunk in enumerate([lines[:3], lines[3:]]): (tmp_path / f's.shard-{k}-of-3.jsonl').write_text(''.join(chunk))
    assert cli_main(['merge-submissions', str(tmp_path / 'm.jsonl'), *map(str, tmp_path.glob('s.shard-*'))]) == 2
    err = capsys.readouterr().err
    assert 'part 2/3 missing' in err and len(err.strip().splitlines()) == 1
    (tmp_path / 'b.jsonl').write_text(''.join(lines[:4]))
    (tmp_path / 'c.jsonl').write_text(''.join(lines[3:5]))
    b, c = str(tmp_path / 'b.jsonl'), str(tmp_path / 'c.jsonl')
    assert cli_main(['merge-submissions', str(tmp_path / 'm.jsonl'), b, c]) == 2
    qid = json.loads(lines[3])['qid']
    assert f"qid {qid!r} appears twice: {b}:4 and {c}:1" in capsys.readouterr().err
    (tmp_path / 'c.jsonl').write_text(''.join(lines[4:5]))
    assert cli_main(['merge-submissions', str(tmp_path / 'm.jsonl'), b, c, '--gt', str(run['gt'])]) == 2
    assert f"qid {json.loads(lines[5])['qid']!r} is in no part" in capsys.readouterr().err
    assert not (tmp_path / 'm.jsonl').exists()


def test_evaluate_under_torchrun_equals_one_process(run, tmp_path):
    "`torchrun --nproc_per_node 2 -m videolights evaluate`: rank 0 writes the one submission and the metrics."
    r = _run(['evaluate', *run['args'], '--out', str(tmp_path)], torchrun=2)
    assert r.stdout.count('wrote 6 predictions') == 1
    assert (tmp_path / 'hl_val_submission.jsonl').read_bytes() == run['sub'].read_bytes()
    assert (tmp_path / 'hl_val_submission_metrics.json').read_bytes() == run['metrics'].read_bytes()


@pytest.mark.slow
def test_bench_extract_reports_one_and_two_processes():
    from videolights.bench import bench_extract
    r = bench_extract(n_videos=3, duration=6., image_size=64, procs=(1, 2))
    assert r['n_videos'] == 3 and r['procs_1']['same_store'] and r['procs_2']['same_store']
    assert r['procs_2']['speedup'] > 0 and r['procs_1']['videos_per_s'] > 0


# ------------------------------------------------------------------------------------------------ predict
@pytest.fixture(scope='module')
def preds(world):
    "A random tiny model for the tiny encoders, queries on the videos, and the one-process predictions."
    from videolights.config import get_preset
    from videolights.model import build_model
    from videolights.train import save_checkpoint, config_dict
    d = world['dir']
    cfg = get_preset('tiny', v_feat_types=('clip', 'blip'), v_feat_dims=(8, 24), t_feat_types=('clip', 'blip'),
                     t_feat_dims=(16, 24), blip_features=True, blip_dim=24, max_v_l=16, max_q_l=32)
    torch.manual_seed(0)
    (d / 'run').mkdir(exist_ok=True)
    save_checkpoint(dict(model=build_model(cfg).state_dict(), config=config_dict(cfg)), d / 'run' / 'model_best.ckpt')
    qs = [('the dog runs', 'b_mid'), ('a cat', 'a_long'), ('in the ring', 'b_mid'), ('and then', 'e_tiny'),
          ('the thing', 'c_short'), ('a man', 'd_mid'), ('x', 'a_long')]
    recs = [dict(qid=10 + i, query=q, vid=v) for i, (q, v) in enumerate(qs)]
    (d / 'pq.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    args = ['predict', str(d / 'vids'), '--queries', str(d / 'pq.jsonl'), '--ckpt', str(d / 'run'), '--device', 'cpu',
            *world['args'][3:7]]                                                      # --clip-model, --blip-model
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try: assert cli_main([*args, '--json', str(d / 'p1.jsonl')]) == 0
    finally: torch.set_num_threads(n)
    return dict(args=args, single=d / 'p1.jsonl', queries=d / 'pq.jsonl')


def test_predict_shards_merge_to_the_single_file(preds, tmp_path):
    lines = [json.loads(l) for l in preds['single'].read_text().splitlines()]
    assert [l['qid'] for l in lines] == list(range(10, 17)) and lines[1]['vid'] == 'a_long'
    for k in range(2): _run([*preds['args'], '--json', str(tmp_path / 'p.jsonl'), '--shard', f'{k}/2'])
    parts = [tmp_path / f'p.shard-{k}-of-2.jsonl' for k in range(2)]
    assert sorted(json.loads(l)['vid'] for l in parts[0].read_text().splitlines()) == ['a_long', 'a_long', 'c_short']
    out = tmp_path / 'merged.jsonl'
    assert cli_main(['merge-submissions', str(out), *map(str, parts), '--queries', str(preds['queries'])]) == 0
    assert out.read_bytes() == preds['single'].read_bytes()


@pytest.mark.slow
def test_predict_under_torchrun_equals_one_process(preds, tmp_path):
    r = _run([*preds['args'], '--json', str(tmp_path / 'p.jsonl')], torchrun=2)
    assert r.stdout.count('wrote 7 predictions') == 1
    assert (tmp_path / 'p.jsonl').read_bytes() == preds['single'].read_bytes()
