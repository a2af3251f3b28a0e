"""The official `inference.py` and `videolights evaluate` on the same official checkpoint
(tools/check_official_infer.py).

The whole comparison runs only where the official checkout and its environment exist ($VIDEOLIGHTS_OFFICIAL,
$VIDEOLIGHTS_OFFICIAL_PY; made by tools/official/setup.sh) and is slow. What it found, fixed in the package, is tested
here without the official code: an official checkpoint written by us comes with the opt.json the official inference
reads; official TVSum folder names give our sources back; TVSum submissions keep float32 saliency (the official mAP
ranks on it); Charades-STA is scored with the evaluator the official inference calls.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'official'))
sys.path.insert(0, str(ROOT / 'tools'))
import official_harness  # noqa: E402

MISSING = official_harness.missing(need_python=True)
needs_official = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
SMALL = dict(enc_layers=1, dec_layers=1, dim_feedforward=64)


def test_official_checkpoint_has_opt_json_with_official_folders(tmp_path):
    from videolights.artifacts import load_any, save_official_checkpoint
    from videolights.config import get_preset
    from videolights.model import build_model
    cfg = get_preset('qvhighlights', **SMALL)
    ck = save_official_checkpoint(build_model(cfg), cfg, tmp_path / 'run' / 'model_best.ckpt', feat_root='/data/qvh')
    opt = json.loads((tmp_path / 'run' / 'opt.json').read_text())
    assert opt['v_feat_dim'] == 2304 + 512 + 768 and opt['t_feat_dim'] == 512 + 768   # before the 2 TEF dims
    assert opt['v_feat_dirs'] == ['/data/qvh/slowfast_features', '/data/qvh/clip_features',
                                  '/data/qvh/blip_video_features']
    assert opt['t_feat_dirs'] == ['/data/qvh/clip_text_features', '/data/qvh/blip_aug_text_features_openai']
    assert opt['results_dir'] == str((tmp_path / 'run').resolve()) and opt['dset_name'] == 'hl'
    m, c, src = load_any(ck)
    assert src.kind == 'official' and src.ckpt['opt'].v_feat_dim == 3586
    assert (c.v_feat_types, c.t_feat_types) == (cfg.v_feat_types, cfg.t_feat_types)
    save_official_checkpoint(build_model(cfg), cfg, tmp_path / 'bare' / 'model_best.ckpt', opt_json=False)
    assert not (tmp_path / 'bare' / 'opt.json').exists()


def test_tvsum_official_folders_give_our_sources():
    from videolights.convert import config_from_opt
    from videolights.runs import feature_dirs
    opt = dict(dset_name='tvsum', ctx_mode='video_tef', v_feat_dim=2050, t_feat_dim=512, clip_length=2,
               v_feat_dirs=['../Datasets/tvsum/video_features'], t_feat_dirs=['../Datasets/tvsum/query_features'],
               dset_domain='BK', max_v_l=1000)   # tvsum/train.sh as released
    cfg = config_from_opt(opt)
    assert (cfg.v_feat_types, cfg.t_feat_types) == (('i3d',), ('clip',))
    assert feature_dirs(cfg) == (['video_features'], ['query_features'])
    sf = config_from_opt(dict(opt, v_feat_dim=2306, v_feat_dirs=['x/sf_features']))
    assert sf.v_feat_types == ('slowfast',) and feature_dirs(sf)[0] == ['sf_features']
    bv = config_from_opt(dict(opt, v_feat_dim=770, v_feat_dirs=['x/video_features_blip']))   # BLIP-2 on one side
    assert bv.v_feat_types == ('blip_video',) and feature_dirs(bv) == (['video_features_blip'], ['query_features'])


def _tvsum_data(root: Path, seed: int = 0) -> Path:
    "The BK domain of TVSum as released (I3D rgb/flow .npy halves, CLIP 'token' text), random features."
    rng = np.random.default_rng(seed)
    (root / 'features' / 'video_features').mkdir(parents=True)
    (root / 'features' / 'query_features').mkdir()
    recs = [json.loads(l) for l in (ROOT / 'data' / 'tvsum' / 'tvsum_val.jsonl').read_text().splitlines() if l.strip()]
    train = (ROOT / 'data' / 'tvsum' / 'tvsum_train.jsonl').read_text().splitlines()
    recs += [json.loads(l) for l in train if l.strip()]
    recs = [r for r in recs if r['domain'] == 'BK']
    (root / 'tvsum_val.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    for r in recs:
        for part in ('rgb', 'opt'):
            np.save(root / 'features' / 'video_features' / f"{r['vid']}_{part}.npy",
                    rng.standard_normal((len(r['label']), 1024), dtype=np.float32))
        np.savez(root / 'features' / 'query_features' / f"{r['qid']}.npz",
                 token=rng.standard_normal((6, 512), dtype=np.float32))
    return root


def test_charades_vgg_options_as_the_official_loader_reads_them(tmp_path):
    """charades_sta/train_vgg.sh: the official loader embeds the query words with GloVe and leaves them unnormalised
    (its 'vgg' feature folder turns that path on); `--max_v_l -1` slices `feat[:-1]`, dropping each video's last clip;
    the clamp of the windows is 360 s only when opt.v_feat_dim is 4096, which the TEF makes 4098."""
    from videolights.convert import config_from_opt
    from videolights.data import DirFeatures, load_video_feats
    opt = dict(dset_name='charadesSTA', ctx_mode='video_tef', v_feat_dim=4098, t_feat_dim=300, clip_length=0.166666,
               max_v_l=-1, v_feat_dirs=['../Datasets/processed/charades/vgg_features/rgb_features'],
               t_feat_dirs=['../Datasets/processed/charades/clip_text_features'])
    cfg = config_from_opt(opt)
    assert cfg.v_feat_types == ('vgg',) and (cfg.normalize_t, cfg.normalize_v) == (False, True)
    assert cfg.max_ts == 150. and config_from_opt(dict(opt, ctx_mode='video', v_feat_dim=4096)).max_ts == 360.
    assert config_from_opt(dict(opt, v_feat_dirs=['x/slowfast_features'], v_feat_dim=2306)).normalize_t   # no GloVe
    (tmp_path / 'vgg').mkdir()
    np.save(tmp_path / 'vgg' / 'v1.npy', np.arange(12., dtype=np.float32).reshape(4, 3))
    src = DirFeatures(tmp_path)
    assert load_video_feats(src, 'v1', ['vgg'], max_v_l=-1, normalize=False).tolist() == \
        np.arange(9.).reshape(3, 3).tolist()                                # [:-1], as the official loader slices
    assert len(load_video_feats(src, 'v1', ['vgg'], max_v_l=None)) == 4 and len(load_video_feats(src, 'v1', ['vgg'],
                                                                                                  max_v_l=2)) == 2


def test_evaluate_official_tvsum_checkpoint_float32_saliency(tmp_path):
    "An official TVSum checkpoint evaluates from the released folders; the scores stay float32, the mAP is on them."
    from videolights.artifacts import save_official_checkpoint
    from videolights.cli import main
    from videolights.config import get_preset
    from videolights.metrics import tvsum_video_ap
    from videolights.model import build_model
    from videolights.runs import build_dataset, load_model
    from videolights.data import collate
    data = _tvsum_data(tmp_path / 'tvsum')
    cfg = get_preset('tvsum', **SMALL)
    torch.manual_seed(0)
    ck = save_official_checkpoint(build_model(cfg), cfg, tmp_path / 'run' / 'model_best.ckpt', device=-1)
    assert main(['evaluate', '--ckpt', str(ck), '--data', str(data), '--split', 'val', '--out', str(tmp_path / 'o'),
                 '--device', 'cpu']) == 0
    sub = [json.loads(l) for l in (tmp_path / 'o' / 'hl_val_submission.jsonl').read_text().splitlines()]
    metrics = json.loads((tmp_path / 'o' / 'hl_val_submission_metrics.json').read_text())
    model, c = load_model(ck, 'cpu')
    ds = build_dataset(c, data, 'val')
    inputs, _, metas = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad(): sal = model(**inputs)['saliency_scores']
    n = inputs['src_vid_mask'].sum(1).long()
    assert [d['qid'] for d in sub] == [m['qid'] for m in metas] and len(sub) == 5
    for d, s, k in zip(sub, sal, n):
        assert d['pred_saliency_scores'] == pytest.approx(s[:k].tolist(), abs=1e-5)   # float32, not half
        assert d['pred_saliency_scores'] != torch.tensor(d['pred_saliency_scores']).half().float().tolist()
    aps = [tvsum_video_ap(np.array(d['pred_saliency_scores']), np.array(r['label'], float))
           for d, r in zip(sub, ds.records)]
    assert metrics['brief']['mAP'] == pytest.approx(round(float(np.mean(aps)), 5))


def test_charades_scored_by_the_official_inference_evaluator():
    """Charades-STA metrics of evaluate/train are the VideoLights evaluator's (no R5, which only `eval --dataset
    charades` adds)."""
    from videolights.metrics import eval_submission, make_noisy_submission
    from videolights.runs import official_metrics
    gt = [json.loads(l) for l in (ROOT / 'data' / 'charades_sta' / 'charades_sta_test_tvr_format.jsonl')
          .read_text().splitlines()[:40]]
    sub = [{k: v for k, v in d.items() if k != 'pred_saliency_scores'} for d in make_noisy_submission(gt, seed=1)]
    m = official_metrics(sub, gt, 'charadesSTA')
    assert m == eval_submission(sub, gt, 'qvhighlights')
    assert 'MR-full-R5@0.5' not in m['brief'] and 'MR-full-R5@0.5' in eval_submission(sub, gt, 'charades')['brief']
    assert {'MR-full-R1@0.3', 'MR-full-mIoU'} <= set(m['brief'])


@pytest.mark.slow
@needs_official
@pytest.mark.parametrize('case', ['qvh_val', 'qvh_test', 'charades', 'charades_vgg', 'tvsum'])
def test_inference_matches_official(case, tmp_path):
    import check_official_infer as C
    rc = C.main(['--cases', case, '--n', '24', '--json', str(tmp_path / 'r.json'), '--workdir', str(tmp_path / 'w')])
    rep = json.loads((tmp_path / 'r.json').read_text())
    s = rep['summary'][case]
    assert s['queries'] > 0 and s['replay_differ'] == 0 and s['replay_metrics_differ'] == 0
    assert s['beyond_rounding'] == 0 and s['raw_max_abs'] <= C.RAW_TOL
    if case != 'qvh_test': assert s['metrics'] > 0
    if case.startswith(('qvh', 'charades')): assert s['windows'] > 0
    if not case.startswith('charades'): assert s['saliency'] > 0
    if case == 'charades_vgg':   # with the TEF the windows stop at 150 s; without, the 360-s clamp lets them pass it
        end = {r['name']: r['replay']['max_window_end'] for r in rep['runs']}
        assert end['charades_vgg'] <= 150. < end['charades_vgg_notef'] <= 360.
    assert rc == 0, [r['problems'] for r in rep['runs']]
