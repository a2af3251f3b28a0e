"""End-to-end checks of the synthetic dataset generator (`videolights.synth`): files, determinism, CLI, loaders."""
import json, time
from pathlib import Path

import numpy as np
import pytest

from videolights.synth import (synth, synth_main, read_qvh_split, query_words, load_split, fit_bilinear,
                               bilinear_scores, oracle_scores, hit_at_1, score_windows, r1_at, random_r1_at, SIZES)

FIXTURE = Path(__file__).resolve().parents[1]/'data'/'fixtures'/'synth_tiny'
GT_KEYS = ('relevant_windows', 'relevant_clip_ids', 'saliency_scores', 'duration')


def _files(d):
    return {str(p.relative_to(d)): p for p in sorted(Path(d).rglob('*')) if p.is_file()}


def _h5_contents(path):
    import h5py
    out = {}
    with h5py.File(path, 'r') as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
    return out


def _jsonl(p): return [json.loads(l) for l in Path(p).read_text().splitlines()]


def test_same_seed_same_bytes(tmp_path):
    "Same seed → byte-identical jsonl, npz and info (and equal HDF5 contents); another seed → different."
    a, b, c = (synth(tmp_path/n, seed=s, size='tiny', progress=False) for n, s in (('a', 0), ('b', 0), ('c', 1)))
    fa, fb = _files(tmp_path/'a'), _files(tmp_path/'b')
    assert fa.keys() == fb.keys() and len(fa) == 2 + 1 + 1 + 18 * 3
    for k in fa:
        if k != 'features.h5': assert fa[k].read_bytes() == fb[k].read_bytes(), k
    ha, hb = _h5_contents(a['h5']), _h5_contents(b['h5'])
    assert ha.keys() == hb.keys() and all(np.array_equal(ha[k], hb[k]) for k in ha)
    assert ((tmp_path/'a'/'highlight_train_release.jsonl').read_bytes()
            != (tmp_path/'c'/'highlight_train_release.jsonl').read_bytes())


def test_small_counts_layout_and_real_statistics(tmp_path):
    "size='small': counts, unique ids, feature shapes, and annotations that are resampled real records."
    t0 = time.time()
    s = synth(tmp_path, seed=0, size='small', h5=False, progress=False)
    assert time.time() - t0 < 30                          # a few seconds normally; generous on a loaded 2-core box
    assert (s['n_train'], s['n_val']) == SIZES['small'] == (400, 100)
    assert s['v_feat_types'] == {'slowfast_features': 32, 'clip_features': 16}
    assert s['t_feat_types'] == {'clip_text_features': 16}
    real = {sp: {json.dumps([r[k] for k in GT_KEYS]) for r in read_qvh_split(sp)} for sp in ('train', 'val')}
    qids, vids = set(), set()
    for sp in ('train', 'val'):
        recs = _jsonl(tmp_path/f'highlight_{sp}_release.jsonl')
        assert list(recs[0]) == ['qid', 'query', 'duration', 'vid', 'relevant_clip_ids', 'saliency_scores',
                                 'relevant_windows']
        for r in recs:
            assert json.dumps([r[k] for k in GT_KEYS]) in real[sp]      # windows/saliency/duration of a real record
            qids.add(r['qid'])
            vids.add(r['vid'])
        r = recs[-1]
        with np.load(tmp_path/'features'/'slowfast_features'/f"{r['vid']}.npz") as z:
            assert z['features'].shape == (r['duration'] // 2, 32) and z['features'].dtype == np.float32
        with np.load(tmp_path/'features'/'clip_text_features'/f"qid{r['qid']}.npz") as z:
            assert z['last_hidden_state'].shape == (len(query_words(r['query'])) + 2, 16)
            assert np.array_equal(z['pooler_output'], z['last_hidden_state'][-1])
    assert len(qids) == len(vids) == 500


def test_signal_learnable_above_random(tmp_path):
    "A model-free fitted bilinear scorer and the oracle projection beat random HIT@1 by a wide margin (seed 1)."
    info = synth(tmp_path, seed=1, size='small', h5=False, progress=False)
    tr, va = load_split(tmp_path, 'train'), load_split(tmp_path, 'val')
    hit_bil, rand = hit_at_1(bilinear_scores(va, fit_bilinear(tr)), va)
    hit_orc, _ = hit_at_1(oracle_scores(va, info), va)
    assert 15 < rand < 30
    assert hit_bil > 3 * rand and hit_orc > 2.5 * rand, (hit_bil, hit_orc, rand)
    assert hit_bil < 95
    mr_bil, mr_rand = r1_at([score_windows(s) for s in bilinear_scores(va, fit_bilinear(tr))], va), random_r1_at(va)
    assert mr_bil > 4 * mr_rand, (mr_bil, mr_rand)


def test_qvh_subset_keeps_real_records(tmp_path):
    "size='qvh' reuses the real records (qids, vids, queries) in order; dims='small' and float16 are honoured."
    s = synth(tmp_path, size='qvh', dims='small', n_train=6, n_val=4, dtype='float16', progress=False)
    for sp, n in (('train', 6), ('val', 4)):
        assert _jsonl(tmp_path/f'highlight_{sp}_release.jsonl') == read_qvh_split(sp)[:n]
    r = read_qvh_split('train')[0]
    with np.load(tmp_path/'features'/'clip_features'/f"{r['vid']}.npz") as z:
        assert z['features'].dtype == np.float16 and z['features'].shape == (75, 16)
    import h5py
    with h5py.File(s['h5']) as f:
        assert f[f"video/clip_features/{r['vid']}"].dtype == np.float16
        assert f[f"text/clip_text_features/{r['qid']}"].shape[1] == 16


def test_real_dims_and_blip(tmp_path):
    "dims='real' writes the official widths (SF 2304, CLIP 512, BLIP 768; text CLIP 512, BLIP 768)."
    s = synth(tmp_path, size='qvh', dims='real', blip=True, n_train=1, n_val=1, h5=False, progress=False)
    assert s['v_feat_types'] == {'slowfast_features': 2304, 'clip_features': 512, 'blip_video_features': 768}
    assert s['t_feat_types'] == {'clip_text_features': 512, 'blip_aug_text_features_openai': 768}
    r = read_qvh_split('val')[0]
    with np.load(tmp_path/'features'/'blip_video_features'/f"{r['vid']}.npz") as z: assert z['features'].shape[1] == 768
    a = np.load(tmp_path/'features'/'clip_text_features'/f"qid{r['qid']}.npz")['last_hidden_state']
    b = np.load(tmp_path/'features'/'blip_aug_text_features_openai'/f"qid{r['qid']}.npz")['last_hidden_state']
    assert len(a) == len(b)                               # text sources pair tokens by position


def test_explicit_dims_cli(tmp_path):
    "--v-dims/--t-dims set arbitrary widths; a wrong count is a clear argparse/ValueError."
    assert synth_main(['--out', str(tmp_path), '--size', 'tiny', '--v-dims', '24,12', '--t-dims', '20', '--no-h5']) == 0
    info = json.loads((tmp_path/'synth_info.json').read_text())
    assert info['v_feat_types'] == {'slowfast_features': 24, 'clip_features': 12} and info['concept_dim'] == 20
    r = _jsonl(tmp_path/'highlight_val_release.jsonl')[0]
    assert np.load(tmp_path/'features'/'clip_text_features'/f"qid{r['qid']}.npz")['last_hidden_state'].shape[1] == 20
    with pytest.raises(ValueError, match='one per source'): synth(tmp_path/'x', size='tiny', v_dims=(8,))
    with pytest.raises(SystemExit): synth_main(['--out', str(tmp_path/'y'), '--v-dims', '8,x'])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='size must be one of'): synth(tmp_path, size='huge')
    with pytest.raises(ValueError, match='exceeds the 1550 real val records'): synth(tmp_path, size='small', n_val=2000)
    with pytest.raises(FileNotFoundError, match='highlight_train_release.jsonl'): synth(tmp_path,
            ann_dir=tmp_path/'nowhere')
    bad = tmp_path/'ann'
    bad.mkdir()
    (bad/'highlight_train_release.jsonl').write_text('{"qid": 1}\n')
    with pytest.raises(ValueError, match=r'highlight_train_release.jsonl:1: record lacks keys'): read_qvh_split('train',
            bad)


def test_overwrite_guard(tmp_path):
    "A second run into the same folder must not mix features with the first one's."
    synth(tmp_path, size='tiny', progress=False)
    with pytest.raises(FileExistsError, match='overwrite'): synth(tmp_path, size='tiny', n_train=2, n_val=1,
                                                                  progress=False)
    synth(tmp_path, size='tiny', n_train=2, n_val=1, overwrite=True, progress=False)
    assert len(list((tmp_path/'features'/'clip_features').iterdir())) == 3
    assert len(list((tmp_path/'features'/'clip_text_features').iterdir())) == 3
    with pytest.raises(ValueError, match='dims must be'): synth(tmp_path/'x', dims='huge')
    with pytest.raises(ValueError, match='dtype must be'): synth(tmp_path/'x', dtype='int8')


def test_cli_help_and_summary(tmp_path, capsys):
    from videolights.cli import main
    with pytest.raises(SystemExit) as e: synth_main(['--help'])
    assert e.value.code == 0 and 'examples:' in capsys.readouterr().out
    assert main(['synth', '--out', str(tmp_path), '--size', 'tiny', '--seed', '3']) == 0
    out = capsys.readouterr().out
    assert 'train 12, val 6' in out and 'stand-in' in out and str(tmp_path/'features.h5') in out
    assert json.loads((tmp_path/'synth_info.json').read_text())['seed'] == 3


def test_data_module_reads_it(tmp_path):
    "videolights.data reads the folder and the HDF5 store identically, and collates a batch (batch contract)."
    data = pytest.importorskip('videolights.data')
    synth(tmp_path, size='tiny', progress=False)
    kw = dict(v_feat_types=['slowfast_features', 'clip_features'], t_feat_types=['clip_text_features'])
    ds_dir = data.VLDataset(tmp_path/'highlight_val_release.jsonl', tmp_path/'features', **kw)
    ds_h5 = data.VLDataset(tmp_path/'highlight_val_release.jsonl', tmp_path/'features.h5', **kw)
    a, b = ds_dir[0]['model_inputs'], ds_h5[0]['model_inputs']
    assert np.allclose(a['video_feat'], b['video_feat']) and np.allclose(a['query_feat'], b['query_feat'])
    assert a['video_feat'].shape[1] == 8 + 4 + 2                            # SF + CLIP + TEF
    inputs, targets, metas = data.collate([ds_h5[i] for i in range(4)])
    assert inputs['src_vid'].shape[0] == 4 and inputs['src_txt'].shape[-1] == 8
    assert len(targets['span_labels']) == 4


def test_committed_fixture_is_current():
    """data/fixtures/synth_tiny is what `videolights synth --size tiny --n-train 4 --n-val 2 --dtype float16 --no-h5`
    writes."""
    if not FIXTURE.exists(): pytest.skip('no fixture committed')
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        synth(d, seed=0, size='tiny', n_train=4, n_val=2, dtype='float16', h5=False, progress=False)
        fresh, fixed = _files(d), _files(FIXTURE)
        assert fresh.keys() == fixed.keys()
        assert all(fresh[k].read_bytes() == fixed[k].read_bytes() for k in fresh)


@pytest.mark.slow
def test_full_qvh_small_dims(tmp_path):
    "The whole real QVHighlights annotation set with small generated features (~2 min on one core, ~350 MB)."
    s = synth(tmp_path, size='qvh', dims='small', progress=False)
    assert (s['n_train'], s['n_val'], s['n_videos']) == (7218, 1550, 8619)
    assert len(list((tmp_path/'features'/'clip_text_features').iterdir())) == 7218 + 1550
    va = load_split(tmp_path, 'val')
    hit, rand = hit_at_1(oracle_scores(va, s), va)
    assert hit > 2.5 * rand, (hit, rand)


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    assert synth_main(['--out', str(tmp_path), '--size', 'tiny', '--no-h5']) == 0
    capsys.readouterr()
    assert synth_main(['--out', str(tmp_path), '--size', 'tiny', '--no-h5']) == 1          # would mix two runs
    err = capsys.readouterr().err
    assert err.startswith('videolights synth: error: ') and '--overwrite' in err and 'Traceback' not in err
    assert synth_main(['--out', str(tmp_path / 'x'), '--size', 'qvh', '--ann-dir', str(tmp_path / 'none')]) == 1
    assert capsys.readouterr().err.startswith('videolights synth: error: ')
