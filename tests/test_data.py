"""Tests of videolights.data that read every real annotation file, touch many files, run CLIs or the official code.

The comparison with the official `StartEndDataset` runs only where the official checkout and its environment exist
($VIDEOLIGHTS_OFFICIAL and $VIDEOLIGHTS_OFFICIAL_PY, made by tools/official/setup.sh); otherwise it is skipped.
"""
import json, os, random, subprocess, sys, textwrap, warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from videolights.data import (DATASET_DEFAULTS, DataFormatError, FeatureNotFoundError, VLDataset, collate,
                              convert_features, convert_features_main, inspect_main, load_jsonl, make_loader,
                              move_batch, open_features, read_charades, read_qvhighlights, read_records, read_tvsum,
                              summarize, write_fake_features, H5Features, index_store)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / 'data'
OFFICIAL_TOOLS = ROOT / 'tools' / 'official'
sys.path.insert(0, str(OFFICIAL_TOOLS))
import official_harness  # noqa: E402  (finds the official checkout through $VIDEOLIGHTS_OFFICIAL)
OFFICIAL_MISSING = official_harness.missing(need_python=True)
HAVE_OFFICIAL = OFFICIAL_MISSING is None
OFFICIAL = official_harness.checkout()
OFFICIAL_PY = official_harness.python()

# ---------------------------------------------------------------------------------------------------------------
# readers: every line of every real file
# ---------------------------------------------------------------------------------------------------------------
COUNTS = [('qvhighlights/highlight_train_release.jsonl', read_qvhighlights, 7218, True),
          ('qvhighlights/highlight_val_release.jsonl', read_qvhighlights, 1550, True),
          ('qvhighlights/highlight_test_release.jsonl', read_qvhighlights, 1542, False),
          ('qvhighlights/highlight_test_with_gt.jsonl', read_qvhighlights, 1542, True),
          ('charades_sta/charades_sta_train_tvr_format.jsonl', read_charades, 12404, True),
          ('charades_sta/charades_sta_test_tvr_format.jsonl', read_charades, 3720, True),
          ('tvsum/tvsum_train.jsonl', read_tvsum, 40, True),
          ('tvsum/tvsum_val.jsonl', read_tvsum, 10, True)]


@pytest.mark.parametrize('rel,reader,n,labelled', COUNTS, ids=[c[0].split('/')[1] for c in COUNTS])
def test_real_files_exact_counts(rel, reader, n, labelled):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the real files are clean: no repair warning
        recs = reader(DATA / rel)
    assert len(recs) == n
    assert not recs.report and recs.report.n_records == n
    assert len(load_jsonl(DATA / rel)) == n
    assert len(read_records(DATA / rel)) == n  # auto-detected reader agrees
    if reader is not read_tvsum: assert ('relevant_windows' in recs[0]) == labelled


def test_test_with_gt_matches_test_release():
    a = read_qvhighlights(DATA / 'qvhighlights/highlight_test_release.jsonl')
    b = read_qvhighlights(DATA / 'qvhighlights/highlight_test_with_gt.jsonl')
    assert [r['qid'] for r in a] == [r['qid'] for r in b]


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text(''.join((l if isinstance(l, str) else json.dumps(l)) + '\n' for l in lines))
    return p


GOOD = dict(qid=1, query='a man talks', vid='v_0.0_150.0', duration=150, relevant_windows=[[10, 20]],
            relevant_clip_ids=[5, 6, 7, 8, 9], saliency_scores=[[1, 2, 3]] * 5)


@pytest.mark.parametrize('bad,msg', [
    ({**GOOD, 'query': ''}, "bad.jsonl:2: key 'query' is empty"),
    ({k: v for k, v in GOOD.items() if k != 'vid'}, "bad.jsonl:2: missing key 'vid'"),
    ({**GOOD, 'duration': -3}, "bad.jsonl:2: key 'duration'"),
    ({**GOOD, 'saliency_scores': [[1, 2, 3]]}, "bad.jsonl:2: keys 'relevant_clip_ids'/'saliency_scores'"),
    ({**GOOD, 'relevant_windows': [[1, 'x']]}, "bad.jsonl:2: key 'relevant_windows': bad window"),
])
def test_structural_errors_name_file_line_key(tmp_path, bad, msg):
    p = _write(tmp_path, 'bad.jsonl', [GOOD, bad])
    with pytest.raises(DataFormatError, match=msg.replace('(', r'\(').replace('[', r'\[')):
        read_qvhighlights(p)


def test_malformed_json_line(tmp_path):
    p = _write(tmp_path, 'm.jsonl', [GOOD, '{"qid": 2,', GOOD])
    with pytest.raises(DataFormatError, match='m.jsonl:2: not valid JSON'):
        load_jsonl(p)


def test_window_repairs_counted_and_strict(tmp_path):
    recs = [GOOD, {**GOOD, 'qid': 2, 'relevant_windows': [[30, 20]]},             # only window reversed: record dropped
            {**GOOD, 'qid': 3, 'relevant_windows': [[140, 160], [0, 4]]},          # clipped
            {**GOOD, 'qid': 4, 'relevant_clip_ids': [80], 'saliency_scores': [[1, 1, 1]]}]  # no clip left: dropped
    p = _write(tmp_path, 'fix.jsonl', recs)
    with pytest.warns(UserWarning, match=f'fix.jsonl.*{p}:2: .*{p}:4: ') as w:               # dropped lines named
        out = read_qvhighlights(p)
    assert [r['qid'] for r in out] == [1, 3]
    assert out[1]['relevant_windows'] == [[140, 150], [0, 4]]
    assert out.report.counts() == {'reversed_window': 1, 'record_dropped': 2, 'clipped_window': 1, 'bad_clip_id': 1}
    assert out.report.issues['record_dropped'][0].startswith(f'{p}:2:')
    dup = _write(tmp_path, 'dup.jsonl', [GOOD, {**GOOD, 'qid': 3}, {**GOOD, 'qid': 1}])     # a qid twice: refused
    with pytest.raises(DataFormatError, match=r"dup.jsonl:3:qid: duplicate qid 1 \(also at line 1\)"):
        read_qvhighlights(dup)
    gone = _write(tmp_path, 'gone.jsonl', [{**GOOD, 'relevant_windows': [[30, 20]]}])      # nothing left: refused
    with pytest.raises(DataFormatError, match=r'gone.jsonl: every record dropped \(1 read; first: line 1: '):
        read_qvhighlights(gone)
    (tmp_path/'empty.jsonl').write_text('\n')
    with pytest.raises(DataFormatError, match='empty.jsonl: no records'):
        read_qvhighlights(tmp_path/'empty.jsonl')
    with pytest.raises(DataFormatError, match='fix.jsonl:2:.*reversed window'):
        read_qvhighlights(p, strict=True)


def test_charades_and_tvsum_errors(tmp_path):
    p = _write(tmp_path, 'c.jsonl', [dict(qid=0, query='x', vid='A', duration=30.0)])
    with pytest.raises(DataFormatError, match="c.jsonl:1: missing key 'relevant_windows'"):
        read_charades(p)
    p = _write(tmp_path, 't.jsonl', [dict(qid='a', query='t', vid='a', duration=2, domain='BK', label=[[1, 2], [3]])])
    with pytest.raises(DataFormatError, match="t.jsonl:1: key 'label'"):
        read_tvsum(p)


# ---------------------------------------------------------------------------------------------------------------
# VLDataset / collate against the official StartEndDataset (same fake features, same seeds)
# ---------------------------------------------------------------------------------------------------------------
OFFICIAL_RUNNER = textwrap.dedent('''
    import json, random, sys
    import numpy as np, torch
    cfg = json.loads(sys.argv[1])
    sys.path.insert(0, cfg["tools"])
    import official_harness as H
    off = H.load(cfg["official"])
    ds = off.dataset.StartEndDataset(cfg["dset_name"], cfg["data_path"], cfg["v_dirs"], cfg["q_dirs"],
                                     q_feat_type="last_hidden_state", max_q_l=32, max_v_l=cfg["max_v_l"],
                                     ctx_mode="video_tef", clip_len=cfg["clip_len"], max_windows=5,
                                     dset_domain=cfg.get("domain"))
    items = []
    for i in cfg["indices"]:
        random.seed(cfg["seed"] + i)
        items.append(ds[i])
    batch_meta, batched = off.dataset.start_end_collate(items)
    mi, tg = off.dataset.prepare_batch_inputs(batched, torch.device("cpu"))
    torch.save(dict(model_inputs=mi, targets=tg, qids=[m["qid"] for m in batch_meta]), cfg["out"])
''')


def _run_official(tmp_path, **cfg):
    cfg = dict(cfg, tools=str(OFFICIAL_TOOLS), official=str(OFFICIAL), out=str(tmp_path / 'official.pt'))
    r = subprocess.run([str(OFFICIAL_PY), '-c', OFFICIAL_RUNNER, json.dumps(cfg)], capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(cfg['out'], weights_only=False)


def _ours(ds, indices, seed):
    items = []
    for i in indices:
        ds.rng.seed(seed + i)
        items.append(ds[i])
    return collate(items)


def _compare(off, ours):
    mi, tg, metas = ours
    assert [m['qid'] for m in metas] == off['qids']
    for k in ('src_txt', 'src_txt_mask', 'src_vid', 'src_vid_mask'):
        assert mi[k].shape == off['model_inputs'][k].shape, k
        # bit for bit: the same float32 normalisation (np.linalg.norm), TEF and masks as the official loader
        assert torch.equal(mi[k], off['model_inputs'][k].float()), k
    for a, b in zip(tg['span_labels'], off['targets']['span_labels']):
        assert torch.equal(a['spans'], b['spans'].float())
    for k in ('saliency_pos_labels', 'saliency_neg_labels'):
        assert tg[k].tolist() == off['targets'][k].tolist(), k
    for k in ('saliency_all_labels', 'saliency_pos_index'):
        # compared on real clips only: where features are shorter than the annotation, the official array grows
        # past the video (a relevant clip id == L lands in a padded position); ours stops at L (documented)
        m = mi['src_vid_mask']
        torch.testing.assert_close(tg[k] * m, off['targets'][k].float() * m, rtol=0, atol=1e-6, msg=k)
    return (tg['saliency_all_labels'] * (1 - mi['src_vid_mask'])).abs().sum().item()


QVH_V = {'slowfast_features': 16, 'clip_features': 8, 'blip_video_features': 12}
QVH_T = {'clip_text_features': 8, 'blip_aug_text_features_openai': 12}


def _subset_file(tmp_path, name, recs):
    p = tmp_path / name
    p.write_text(''.join(json.dumps(r) + '\n' for r in recs))
    return p


@pytest.mark.skipif(not HAVE_OFFICIAL, reason=str(OFFICIAL_MISSING))
@pytest.mark.parametrize('pretrain', [False, True], ids=['qvh', 'pretrain'])
def test_vldataset_matches_official_qvh(tmp_path, pretrain):
    val = read_qvhighlights(DATA / 'qvhighlights/highlight_val_release.jsonl')
    many = [r for r in val[22:] if len(r['relevant_windows']) > 5][:6]   # random window subsets
    short = [r for r in val[22:] if r['duration'] < 150][:4]             # fewer than 75 clips
    recs = list(val[:22]) + many + short
    # pretraining data: the official loader switches on 'pre_train' in the file name
    p = _subset_file(tmp_path, 'pre_train_subset.jsonl' if pretrain else 'hl_subset.jsonl', recs)
    feats = write_fake_features(tmp_path / 'feats', recs, QVH_V, QVH_T, clip_len=2., seed=1)
    # a video whose sources disagree by one clip: all are cut to the shortest
    r0 = recs[0]
    np.savez_compressed(feats / 'clip_features' / f"{r0['vid']}.npz",
                        features=np.random.default_rng(5).standard_normal((74, 8), dtype=np.float32))
    idx = list(range(len(recs)))
    off = _run_official(tmp_path, dset_name='hl', data_path=str(p), v_dirs=[str(feats / t) for t in QVH_V],
                        q_dirs=[str(feats / t) for t in QVH_T], max_v_l=75, clip_len=2, indices=idx, seed=100)
    ds = VLDataset(str(p), feats, 'hl', list(QVH_V), list(QVH_T), pretrain=None)
    assert ds.pretrain == pretrain
    ours = _ours(ds, idx, 100)
    _compare(off, ours)
    convert_features(feats, tmp_path / 'f.h5', progress=False)  # the same from the store
    _compare(off, _ours(VLDataset(str(p), tmp_path / 'f.h5', 'hl', list(QVH_V), list(QVH_T), pretrain=None), idx, 100))
    assert ours[0]['src_vid_mask'][0].sum() == 74
    # the invariants the random pairs must satisfy
    tg = ours[1]
    sal = tg['saliency_all_labels']
    pos, neg = tg['saliency_pos_labels'], tg['saliency_neg_labels']
    if not pretrain:
        hard_pos, hard_neg = sal.gather(1, pos[:, :1]), sal.gather(1, neg[:, :1])
        assert (hard_pos >= hard_neg).all()
        assert (sal.gather(1, pos[:, 1:]) > 0).all()
    assert all(len(s['spans']) <= 5 for s in tg['span_labels'])


@pytest.mark.skipif(not HAVE_OFFICIAL, reason=str(OFFICIAL_MISSING))
def test_vldataset_matches_official_charades(tmp_path):
    tr = read_charades(DATA / 'charades_sta/charades_sta_train_tvr_format.jsonl')
    recs = list(tr[:24]) + [r for r in tr if r['duration'] > 80][:4]   # > 75 clips: truncated
    p = _subset_file(tmp_path, 'charades_subset.jsonl', recs)
    feats = write_fake_features(tmp_path / 'feats', recs, QVH_V, {'clip_text_features': 8, 'blip_text_features': 12},
                                clip_len=1., seed=2)
    idx = list(range(len(recs)))
    off = _run_official(tmp_path, dset_name='charadesSTA', data_path=str(p), v_dirs=[str(feats / t) for t in QVH_V],
                        q_dirs=[str(feats / t) for t in ('clip_text_features', 'blip_text_features')],
                        max_v_l=75, clip_len=1, indices=idx, seed=7)
    ds = VLDataset(recs, feats, 'charadesSTA', list(QVH_V))
    ours = _ours(ds, idx, 7)
    _compare(off, ours)
    assert ours[0]['src_vid'].shape[1] == 75


@pytest.mark.skipif(not HAVE_OFFICIAL, reason=str(OFFICIAL_MISSING))
def test_vldataset_matches_official_tvsum(tmp_path):
    tr = read_tvsum(DATA / 'tvsum/tvsum_train.jsonl')
    p = DATA / 'tvsum/tvsum_train.jsonl'
    rng = np.random.default_rng(3)
    (tmp_path / 'video_features').mkdir()
    (tmp_path / 'query_features').mkdir()
    for r in tr:  # I3D rgb + flow pairs and 'token' text features, as the TVSum release
        L = len(r['label'])
        for part in ('rgb', 'opt'):
            np.save(tmp_path / 'video_features' / f"{r['vid']}_{part}.npy",
                    rng.standard_normal((L, 6), dtype=np.float32))
        np.savez(tmp_path / 'query_features' / f"{r['qid']}.npz", token=rng.standard_normal((7, 8), dtype=np.float32))
    idx = [0, 1, 2, 3]
    off = _run_official(tmp_path, dset_name='tvsum', data_path=str(p), v_dirs=[str(tmp_path / 'video_features')],
                        q_dirs=[str(tmp_path / 'query_features')], max_v_l=1000, clip_len=2, indices=idx, seed=0,
                        domain='BK')
    ds = VLDataset(p, tmp_path, 'tvsum', domain='BK')
    assert len(ds) == 4
    _compare(off, _ours(ds, idx, 0))
    # the same from the HDF5 store (I3D pairs packed as one dataset)
    convert_features(tmp_path, tmp_path / 'tv.h5', progress=False)
    _compare(off, _ours(VLDataset(p, tmp_path / 'tv.h5', 'tvsum', domain='BK'), idx, 0))


# ---------------------------------------------------------------------------------------------------------------
# summaries of the real files (golden numbers computed once from the files and checked by hand against SOURCES.md)
# ---------------------------------------------------------------------------------------------------------------
def test_summarize_real_files():
    s = summarize(read_qvhighlights(DATA / 'qvhighlights/highlight_val_release.jsonl'))
    assert (s['n_queries'], s['n_videos'], s['n_windows'], s['n_queries_over_max_windows']) == (1550, 1519, 2803, 63)
    assert (s['duration_min'], s['duration_max'], s['window_len_min'], s['window_len_max']) == (120, 150, 2, 150)
    assert s['windows_per_query_mean'] == pytest.approx(2803 / 1550, abs=1e-4)
    assert s['windows_per_query_max'] == 25 and s['relevant_clips_max'] == 75
    assert sum(s['saliency_sum_hist']) == sum(len(r['relevant_clip_ids']) for r in
                                              load_jsonl(DATA / 'qvhighlights/highlight_val_release.jsonl'))
    assert s['saliency_sum_hist'][12] == 1722 and s['saliency_sum_mean'] == pytest.approx(8.7935, abs=1e-4)
    c = summarize(read_charades(DATA / 'charades_sta/charades_sta_train_tvr_format.jsonl'))
    assert (c['n_queries'], c['n_videos'], c['n_windows'], c['windows_per_query_max']) == (12404, 5336, 12404, 1)
    assert c['duration_max'] == pytest.approx(194.33)
    t = summarize(read_tvsum(DATA / 'tvsum/tvsum_train.jsonl'))
    assert t['n_annotators'] == 20 and t['domains'] == {d: 4
                                                        for d in ('BK', 'BT', 'DS', 'FM', 'GA', 'MS', 'PK', 'PR', 'VT',
                                                                  'VU')}
    assert 'n_windows' not in t


# ---------------------------------------------------------------------------------------------------------------
# feature sources: official folder vs HDF5 store, errors
# ---------------------------------------------------------------------------------------------------------------
SMALL_V = {'slowfast_features': 10, 'clip_features': 6}
SMALL_T = {'clip_text_features': 5}


@pytest.fixture(scope='module')
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp('small')
    recs = list(read_qvhighlights(DATA / 'qvhighlights/highlight_val_release.jsonl')[:12])
    feats = write_fake_features(root / 'features', recs, SMALL_V, SMALL_T, seed=4)
    convert_features(feats, root / 'features.h5', progress=False)
    convert_features(feats, root / 'features16.h5', dtype='float16', progress=False)
    (root / 'val.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    return root, recs


def _ds(src, recs, **kw):
    return VLDataset(recs, src, 'hl', list(SMALL_V), list(SMALL_T), **kw)


def test_dir_h5_and_h5_without_index_agree(small_set):
    root, recs = small_set
    a, b = (collate([_ds(root / 'features', recs)[i] for i in range(12)]),
            collate([_ds(root / 'features.h5', recs)[i] for i in range(12)]))
    c = collate([_ds(H5Features(root / 'features.h5', use_index=False), recs)[i] for i in range(12)])
    d = collate([_ds(root / 'features16.h5', recs)[i] for i in range(12)])
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]) and torch.equal(a[0][k], c[0][k]), k
        torch.testing.assert_close(a[0][k], d[0][k], atol=2e-3, rtol=0)
    assert a[0]['src_vid'].shape == (12, 75, 10 + 6 + 2)


def test_store_layout_and_public_reads(small_set):
    import h5py
    root, recs = small_set
    with h5py.File(root / 'features.h5', 'r') as f:
        ds = f[f"video/slowfast_features/{recs[0]['vid']}"]
        assert ds.shape == (75, 10) and ds.chunks is None and ds.compression is None and ds.dtype == np.float32
        assert f['text/clip_text_features'].attrs['dim'] == 5 and f['text/clip_text_features'].attrs['n'] == 12
        assert str(recs[0]['qid']) in f['text/clip_text_features']
    src, ref = open_features(root / 'features.h5'), open_features(root / 'features')
    x = src.video('clip_features', recs[3]['vid'], max_len=10)
    assert x.shape == (10, 6) and np.array_equal(x, ref.video('clip_features', recs[3]['vid'])[:10])
    x2 = src.video('clip_features', recs[4]['vid'])  # the public read returns a fresh array each time
    assert not np.shares_memory(x, x2)


def test_feature_errors(tmp_path, small_set):
    root, recs = small_set
    for src in (open_features(root / 'features'), open_features(root / 'features.h5')):
        with pytest.raises(FeatureNotFoundError, match="vid 'missing_vid'"):
            src.video('clip_features', 'missing_vid')
        with pytest.raises(FeatureNotFoundError, match='qid 999999'):
            src.text('clip_text_features', 999999)
        with pytest.raises(FeatureNotFoundError, match='nope_features'):
            src.video('nope_features', recs[0]['vid'])
    bad = tmp_path / 'bad'
    write_fake_features(bad, recs[:3], SMALL_V, SMALL_T)
    vid = recs[2]['vid']
    np.savez(bad / 'clip_features' / f'{vid}.npz', features=np.ones((75, 7), np.float32))
    with pytest.raises(DataFormatError, match=f'{vid}.npz: feature dim mismatch.*expected 6.*got 7'):
        VLDataset(recs[:3], bad, 'hl', list(SMALL_V), list(SMALL_T))[2]
    with pytest.raises(DataFormatError, match=f'{vid}.npz: feature dim mismatch.*expected 6, got 7'):
        convert_features(bad, tmp_path / 'bad.h5', progress=False)
    x = np.ones((75, 6), np.float32)
    x[3, 2] = np.inf
    np.savez(bad / 'clip_features' / f'{vid}.npz', features=x)
    with pytest.raises(DataFormatError, match=f'{vid}.npz: 1 NaN/inf'):
        VLDataset(recs[:3], bad, 'hl', list(SMALL_V), list(SMALL_T))[2]
    with pytest.raises(DataFormatError, match=f'{vid}.npz: 1 NaN/inf'):
        convert_features(bad, tmp_path / 'bad.h5', progress=False)
    assert not (tmp_path / 'bad.h5').exists()
    (bad / 'clip_features' / f'{vid}.npz').unlink()
    np.save(bad / 'clip_features' / f'{vid}.npy', np.ones((75, 6), np.float32))  # the official .npy fallback
    assert VLDataset(recs[:3], bad, 'hl', list(SMALL_V), list(SMALL_T))[2]['model_inputs']['video_feat'].shape == (75,
            18)


def test_appended_store_falls_back_then_reindexes(tmp_path, small_set):
    import h5py, shutil
    root, recs = small_set
    p = tmp_path / 'store.h5'
    shutil.copy(root / 'features.h5', p)
    new = np.random.default_rng(0).standard_normal((9, 10)).astype(np.float32)
    with h5py.File(p, 'a') as f:  # what an extraction tool appending to the store does
        f.create_dataset('video/slowfast_features/new_vid', data=new)
    src = H5Features(p)
    assert np.array_equal(src.video('slowfast_features', 'new_vid'), new)          # stale index: h5py path
    assert ('video', 'slowfast_features') not in src._idx and ('video', 'clip_features') in src._idx
    src.close()
    assert index_store(p)['video/slowfast_features'] == 13
    src = H5Features(p)
    assert np.array_equal(src.video('slowfast_features', 'new_vid'), new)          # indexed again
    assert ('video', 'slowfast_features') in src._idx
    assert np.array_equal(src.video('slowfast_features', recs[1]['vid']),
                          open_features(root / 'features').video('slowfast_features', recs[1]['vid']))
    src.close()


def test_h5_reader_pickles_and_reopens(small_set):
    import pickle
    root, recs = small_set
    src = open_features(root / 'features.h5')
    x = src.video('slowfast_features', recs[0]['vid'])
    src2 = pickle.loads(pickle.dumps(src))
    assert np.array_equal(src2.video('slowfast_features', recs[0]['vid']), x)
    src.close()
    src2.close()


# ---------------------------------------------------------------------------------------------------------------
# dataset, collate, loaders
# ---------------------------------------------------------------------------------------------------------------
def test_unlabelled_split_and_move_batch(tmp_path):
    test = read_qvhighlights(DATA / 'qvhighlights/highlight_test_release.jsonl')[:5]
    feats = write_fake_features(tmp_path, test, SMALL_V, SMALL_T)
    with pytest.raises(DataFormatError, match='load_labels=False'):
        VLDataset(test, feats, 'hl', list(SMALL_V), list(SMALL_T))
    ds = VLDataset(test, feats, 'hl', list(SMALL_V), list(SMALL_T), load_labels=False)
    mi, tg, metas = move_batch(collate([ds[i] for i in range(5)]), 'cpu')
    assert tg == {} and [m['qid'] for m in metas] == [r['qid'] for r in test]
    assert all(m['n_clips'] == int(r['duration'] // 2) for m, r in zip(metas, test))
    assert mi['src_vid_mask'].dtype == torch.float32 and set(mi) == {'src_txt', 'src_txt_mask', 'src_vid',
                                                                     'src_vid_mask'}


def test_max_windows_random_subset(small_set):
    root, recs = small_set
    val = read_qvhighlights(DATA / 'qvhighlights/highlight_val_release.jsonl')
    r = max(val, key=lambda r: len(r['relevant_windows']))  # 25 windows
    rr = dict(r, vid=recs[0]['vid'], qid=recs[0]['qid'], duration=150)
    ds = _ds(root / 'features.h5', [rr])
    seen = set()
    for _ in range(20):
        spans = ds[0]['model_inputs']['span_labels']['spans']
        assert spans.shape == (5, 2)
        seen |= {tuple(np.round(s, 5)) for s in spans.tolist()}
    allw = {tuple(np.round(s, 5)) for s in
            __import__('videolights.spans',
                       fromlist=['x']).span_xx_to_cxw(torch.tensor(r['relevant_windows'],
                                                                   dtype=torch.float32) / 150).tolist()}
    assert seen <= allw and len(seen) > 5
    assert rr['relevant_windows'] == r['relevant_windows']  # the record itself is never shuffled


@pytest.mark.parametrize('workers', [0, 2])
def test_make_loader_deterministic(small_set, workers):
    root, recs = small_set
    def epoch(seed):
        ds = _ds(root / 'features.h5', recs)
        ds[0]  # the parent process opens the store first: forked workers must reopen it, not share the handle
        ds.rng.seed(0)
        dl = make_loader(ds, batch_size=4, shuffle=True, num_workers=workers, seed=seed)
        return [([m['qid'] for m in b[2]], b[1]['saliency_neg_labels'].tolist(), b[0]['src_vid'].sum().item())
                for b in dl]
    a, b, c = epoch(1), epoch(1), epoch(2)
    assert a == b and a != c
    assert sorted(q for batch in a for q in batch[0]) == sorted(r['qid'] for r in recs)


def _collected(batch):
    "A collated batch's tensors and metas in comparable form, and whether its video tensor is in shared memory."
    mi, tg, metas = batch
    spans = [s['spans'] for s in tg['span_labels']]
    return ({k: v for k, v in mi.items()}, {k: v for k, v in tg.items() if k != 'span_labels'}, spans,
            [m['qid'] for m in metas]), mi['src_vid'].is_shared()


@pytest.mark.parametrize('workers', [0, 2])
def test_batched_fetch_equals_item_by_item(tmp_path, workers):
    "Videos written straight into the padded batch (indexed store) give the batches of the item-by-item path."
    val = read_qvhighlights(DATA / 'qvhighlights/highlight_val_release.jsonl')
    recs = [val[i] for i in (0, 8, 81, 93, 1, 130, 2)]  # 75, 63, 72, 64, 75, 67, 75 clips
    feats = write_fake_features(tmp_path / 'features', recs, SMALL_V, SMALL_T, seed=2)
    convert_features(feats, tmp_path / 'features.h5', progress=False)
    batches = {}
    for name, src in (('store', tmp_path / 'features.h5'), ('folder', feats)):
        ds = _ds(src, recs, seed=3)
        assert (ds.__getitems__([1, 0]).padded is not None) == (name == 'store')
        dl = make_loader(ds, batch_size=3, shuffle=True, num_workers=workers, seed=5)
        batches[name] = [_collected(b) for b in dl]
    assert len(batches['store']) == 3
    for (a, shared_a), (b, shared_b) in zip(batches['store'], batches['folder']):
        assert shared_a == shared_b == (workers > 0)
        for da, db in zip(a[:2], b[:2]):
            assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
        assert all(torch.equal(x, y) for x, y in zip(a[2], b[2])) and a[3] == b[3]
    lengths = sorted(int(n) for batch, _ in batches['store'] for n in batch[0]['src_vid_mask'].sum(1))
    assert lengths == [63, 64, 67, 72, 75, 75, 75]


def test_batched_fetch_keeps_a_subclass_getitem(small_set):
    "A subclass that makes its items with its own __getitem__ gets every item from it, from an indexed store too."
    root, recs = small_set

    class Marked(VLDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item['meta']['marked'] = i
            return item
    ds = Marked(recs, root / 'features.h5', 'hl', list(SMALL_V), list(SMALL_T))
    assert ds.__getitems__([2, 0]).padded is None
    metas = [m for b in make_loader(ds, batch_size=5) for m in b[2]]
    assert [m['marked'] for m in metas] == list(range(len(recs)))


def test_batched_fetch_names_a_video_of_the_wrong_width(tmp_path):
    "An indexed store whose index lists a video of another width: the batch fails with the item path's message."
    import h5py
    from videolights.data import index_store
    recs = list(read_qvhighlights(DATA / 'qvhighlights/highlight_val_release.jsonl')[:3])
    feats = write_fake_features(tmp_path / 'features', recs, SMALL_V, SMALL_T, seed=2)
    store = tmp_path / 'features.h5'
    convert_features(feats, store, progress=False)
    t, vid = next(iter(SMALL_V)), recs[1]['vid']
    with h5py.File(store, 'a') as f:
        del f[f'video/{t}/{vid}']
        f.create_dataset(f'video/{t}/{vid}', data=np.ones((75, SMALL_V[t] + 1), np.float32))
    index_store(store)
    ds = _ds(store, recs)
    with pytest.raises(DataFormatError, match=f"{vid}: feature dim mismatch in '{t}'"):
        ds.__getitems__([0, 1, 2])


def test_make_loader_rejects_shuffle_with_sampler(small_set):
    root, recs = small_set
    with pytest.raises(ValueError, match='sampler'):
        make_loader(_ds(root / 'features.h5', recs), sampler=torch.utils.data.SequentialSampler(range(12)),
                    shuffle=True)


# ---------------------------------------------------------------------------------------------------------------
# CLIs and the benchmark
# ---------------------------------------------------------------------------------------------------------------
def test_convert_features_cli(tmp_path, small_set, capsys):
    from videolights.cli import main
    root, recs = small_set
    assert main(['convert-features', str(root / 'features'), str(tmp_path / 'x.h5'), '--quiet', '--types',
                 'clip_features,clip_text_features']) == 0
    out = capsys.readouterr().out
    assert 'clip_features' in out and 'slowfast_features' not in out and 'wrote' in out
    assert open_features(tmp_path / 'x.h5').feature_types('video') == ['clip_features']
    assert main(['convert-features', str(root / 'features'), str(tmp_path / 'x.h5'), '--quiet']) == 2
    assert capsys.readouterr().err == (f"videolights convert-features: error: {tmp_path / 'x.h5'}: exists "
                                       "(pass overwrite=True (--overwrite))\n")
    with pytest.raises(FileNotFoundError, match='nowhere: no such folder'):
        convert_features_main([str(tmp_path / 'nowhere'), str(tmp_path / 'y.h5')])
    with pytest.raises(SystemExit) as e:
        convert_features_main(['--help'])
    assert e.value.code == 0 and 'examples:' in capsys.readouterr().out


def test_inspect_cli(tmp_path, small_set, capsys):
    root, recs = small_set
    figdir = tmp_path / 'figs'
    assert inspect_main([str(root), '--figdir', str(figdir), '--json', str(tmp_path / 's.json')]) == 0
    out = capsys.readouterr().out
    s = json.loads((tmp_path / 's.json').read_text())
    assert s['annotations']['val.jsonl']['n_queries'] == 12
    assert s['features'][str(root / 'features.h5')]['slowfast_features'] == dict(kind='video', dim=10, n=12)
    assert s['features'][str(root / 'features')]['clip_text_features'] == dict(kind='text', dim=5, n=12)
    assert (figdir / 'inspect_val.png').stat().st_size > 1000 and 'windows_per_query_mean' in out
    assert inspect_main([str(DATA / 'tvsum/tvsum_val.jsonl'), '--no-plots']) == 0
    assert 'n_annotators' in capsys.readouterr().out


def test_inspect_cli_store_empty_folder_and_bad_file(tmp_path, small_set, capsys):
    root, recs = small_set
    assert inspect_main([str(root / 'features.h5'), '--json', str(tmp_path / 's.json')]) == 0
    s = json.loads((tmp_path / 's.json').read_text())
    assert (s['annotations'] == {}
            and s['features'][str(root / 'features.h5')]['slowfast_features'] == dict(kind='video', dim=10, n=12))
    assert 'slowfast_features' in capsys.readouterr().out
    (tmp_path / 'empty').mkdir()
    from videolights.cli import main
    assert main(['inspect', str(tmp_path / 'empty')]) == 2
    assert capsys.readouterr().err == (f"videolights inspect: error: {tmp_path / 'empty'}: is empty, "
                                       "expected a .jsonl file, an .h5 store or a dataset folder\n")
    (tmp_path / 'empty' / 'notes.txt').write_text('x')
    with pytest.raises(ValueError, match='no .jsonl annotation files and no features found'):
        inspect_main([str(tmp_path / 'empty')])
    p = _write(tmp_path, 'bad.jsonl', [GOOD, {**GOOD, 'qid': 2, 'query': ''}])
    assert main(['inspect', str(p), '--no-plots']) == 2
    assert capsys.readouterr().err.strip() == f"videolights inspect: error: {p}:2: key 'query' is empty (qid 2)"


def _pad_in_worker(items):
    from videolights.data import pad_sequences
    out, mask = pad_sequences(items)
    return out, mask, out.is_shared()


def test_pad_sequences_builds_the_batch_in_shared_memory_inside_a_worker():
    "In a DataLoader worker the batch is allocated in shared memory (one copy); the values equal the main process's."
    from torch.utils.data import DataLoader
    from videolights.data import pad_sequences
    seqs = [torch.randn(n, 7) for n in (3, 9, 1, 9, 4)]
    ref, ref_mask = pad_sequences(seqs)
    assert not ref.is_shared() and ref.shape == (5, 9, 7)
    assert torch.equal(ref[2, 1:], torch.zeros(8, 7)) and torch.equal(ref[1], seqs[1])
    for workers in (0, 1):
        (out, mask, shared), = DataLoader(seqs, batch_size=5, collate_fn=_pad_in_worker, num_workers=workers)
        assert shared == (workers == 1) and torch.equal(out, ref) and torch.equal(mask, ref_mask)
