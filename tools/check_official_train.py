"""Train the official `train.py` loop and ours side by side and compare them step by step.

    python tools/check_official_train.py [--recipes qvh pretrain charades tvsum] [--precisions float64 float32]
                                         [--dropout-run] [--json OUT.json] [--curves data/official_train_parity.json]

For each recipe, synthetic data is written in the official layout (per-file .npz features + jsonl annotations), the
official loop runs in the official environment as a child process (`tools/official/train_probe.py`: its own option
parser, dataset, `setup_model`, `train` / `train_hl`, `eval_epoch`), and ours runs here (`runs.build_run` +
`train.fit`, with the fast layers of `ops` as `videolights train` uses them), from the official initial weights
(converted with `videolights.convert`), with the same batch order and the same random saliency pairs, dropout off.
Compared at every optimiser step: the learning rate, every unweighted loss, the weighted loss, the gradient norm
before and after clipping; at the end of chosen epochs: every parameter; at every evaluation: the metrics, the
selection score, the best epoch, the early-stopping counter and where training stops; at the end: the official
`model_best.ckpt` (keys, `opt` against our config, ours loading it through `convert.load_official`) and our best
checkpoint written back in the official layout and scored by the official `inference.py`.

Recipes (the official scripts' flags on a small model: hidden 256 as the official sine embedding needs, FFN 64,
1 encoder / 2 decoder layers, batch 4, 20 epochs with a learning-rate drop at 10 and early stopping after one
evaluation without improvement so that every branch of the loop runs):
  qvh       video_lights/scripts/qvhl/train.sh (SF+CLIP+BLIP-2)
  pretrain  pretrain/pretrain_sf_clip_blip.sh on `subs_train`-style data, then qvhl/train.sh fine-tuning from each
            side's pretraining `model_best.ckpt` (official `--resume`: weights only, epoch and optimiser reset)
  charades  charades_sta/train.sh (clip 1 s, selection on the test file)
  tvsum     tvsum/train.sh, domain BK (no matcher, `train_hl`, selection by top-5 mAP)
  zero      qvh whose validation moments are single 2-s clips that no prediction of a briefly trained model overlaps,
            so that every evaluation scores 0: the official loop starts its best score at 0 and saves only on a
            strictly greater one, so it writes no model_best.ckpt and counts every evaluation towards early stopping
            (stopping at the second, max_es_cnt 1). Ours does the same by default; `fix_best_score_start` is the fix.

Float64 runs must agree within --tol (relative, default 1e-6) at every step and in every parameter snapshot. Float32
runs report their drift: they must agree at the first step (within FLOAT32_FIRST_TOL) and keep the same schedule, but
rounding grows along a run (the Hungarian matching and the MR->HD top-1 slice are discrete choices that a rounding
difference can flip), so their later losses, evaluations and the loop's choices built on them (best epoch, early stop)
are reported, not required to agree. --dropout-run adds a float32 run with the recipe's dropout on both sides and
early stopping off (so that both run every epoch), and compares loss statistics (per-epoch means) only.
Exit status 1 on any difference beyond tolerance, 2 when the official checkout is missing.
No official code is in this file: it is imported at run time from a scratch checkout (--official, else
$VIDEOLIGHTS_OFFICIAL; made by tools/official/setup.sh).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools' / 'official'))
import official_harness as H  # noqa: E402
import train_probe as P  # noqa: E402

SMALL = dict(hidden_dim=256, nheads=8, dim_feedforward=64, bicmf_layers=1, enc_layers=1, dec_layers=2, num_queries=10,
             max_q_l=32, bsz=4, eval_bsz=8, n_epoch=20, lr_drop=10, max_es_cnt=0, num_workers=0, seed=2018)
EPOCHS_SNAPSHOT = (0, 4, 9, 14, 19)
FLOAT32_FIRST_TOL = 1e-4   # float32: relative difference allowed at the first step (losses, weighted loss, grad norm)
ORDER_SEED, ITEM_SEED = 2018, 1000


# ---------------------------------------------------------------------------------------------------------------
# recipes: data, official flags, our config
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Recipe:
    name: str
    preset: str
    dset: str
    flags: list            # official flags of the recipe (model, losses, optimiser)
    over: dict             # VLConfig overrides beyond SMALL
    v_dirs: dict           # feature folder -> width
    t_dirs: dict
    clip_len: int = 2


QVH_LOSS = ['--mr_to_hd_loss', '--hard_pos_neg_loss', '--contrastive_align_loss']
RECIPES = {
    'qvh': Recipe('qvh', 'qvhighlights', 'hl', QVH_LOSS + ['--contrastive_align_loss_coef', '0.2', '--lr', '1e-4',
                  '--wd', '1e-4', '--grad_clip', '0.1'], {},
                  {'slowfast_features': 8, 'clip_features': 4, 'blip_video_features': 4},
                  {'clip_text_features': 8, 'blip_aug_text_features_openai': 8}),
    'pretrain': Recipe('pretrain', 'qvhighlights', 'hl', QVH_LOSS + ['--contrastive_align_loss_coef', '0.01',
                       '--lr', '1e-4', '--wd', '1e-4', '--grad_clip', '0.1'], dict(contrastive_align_loss_coef=0.01),
                       {'slowfast_features': 8, 'clip_features': 4, 'blip_video_features': 4},
                       {'clip_text_features': 8, 'blip_aug_text_features_openai': 8}),
    'charades': Recipe('charades', 'charades', 'charadesSTA', QVH_LOSS + ['--contrastive_align_loss_coef', '0.3',
                       '--hard_pos_neg_loss_coef', '10', '--lr', '1e-4', '--wd', '1e-4', '--grad_clip', '0.1'],
                       dict(max_v_l=75), {'slowfast_features': 8, 'clip_features': 4, 'blip_video_features': 4},
                       {'clip_text_features': 8, 'blip_text_features': 8}, clip_len=1),
    'zero': Recipe('zero', 'qvhighlights', 'hl', QVH_LOSS + ['--contrastive_align_loss_coef', '0.2', '--lr', '1e-4',
                   '--wd', '1e-4', '--grad_clip', '0.1'], dict(max_es_cnt=1),
                   {'slowfast_features': 8, 'clip_features': 4, 'blip_video_features': 4},
                   {'clip_text_features': 8, 'blip_aug_text_features_openai': 8}),
    'tvsum': Recipe('tvsum', 'tvsum', 'tvsum', QVH_LOSS + ['--hard_pos_neg_loss_coef', '1', '--lr', '1e-3',
                    '--contrastive_align_loss_coef', '0.8',
                    '--wd', '1e-4', '--grad_clip', '0.1', '--max_v_l', '1000', '--dset_domain', 'BK'],
                    dict(max_v_l=1000, dset_domain='BK', max_es_cnt=-1), {'video_features': 8}, {'query_features': 8}),
}


def write_data(recipe: Recipe, root: Path, seed: int = 0) -> dict:
    "Synthetic data of `recipe` in the official layout under `root`; returns the annotation paths."
    from videolights.data import read_charades, read_tvsum, write_fake_features
    root.mkdir(parents=True, exist_ok=True)
    if recipe.dset == 'hl':
        from videolights.synth import synth
        synth(root, seed=seed, size='tiny', dims='tiny', blip=True, n_train=16, n_val=8, h5=False, progress=False,
              v_dims=tuple(recipe.v_dirs.values()), t_dims=tuple(recipe.t_dirs.values()))
        train, val = root / 'highlight_train_release.jsonl', root / 'highlight_val_release.jsonl'
        if recipe.name == 'pretrain':   # the official loader (and ours) recognise pretraining data by its file name
            pt = root / 'subs_train_parity.jsonl'
            shutil.copyfile(train, pt)
            train = pt
        if recipe.name == 'zero':
            zero_score_moments(val)
        return dict(train=train, val=val, feats=root / 'features')
    if recipe.dset == 'charadesSTA':
        src = REPO / 'data' / 'charades_sta'
        tr = list(read_charades(src / 'charades_sta_train_tvr_format.jsonl'))[:16]
        te = list(read_charades(src / 'charades_sta_test_tvr_format.jsonl'))[:8]
        for name, recs in (('train', tr), ('test', te)):
            lines = ''.join(json.dumps(dict(r)) + '\n' for r in recs)
            (root / f'charades_sta_{name}_tvr_format.jsonl').write_text(lines)
        write_fake_features(root / 'features', tr + te, recipe.v_dirs, recipe.t_dirs, clip_len=1., seed=seed)
        return dict(train=root / 'charades_sta_train_tvr_format.jsonl', val=root / 'charades_sta_test_tvr_format.jsonl',
                    feats=root / 'features')
    src = REPO / 'data' / 'tvsum'
    rng = np.random.default_rng(seed)
    feats = root / 'features'
    (feats / 'video_features').mkdir(parents=True, exist_ok=True)
    (feats / 'query_features').mkdir(exist_ok=True)
    for split in ('train', 'val'):
        shutil.copyfile(src / f'tvsum_{split}.jsonl', root / f'tvsum_{split}.jsonl')
        for r in read_tvsum(src / f'tvsum_{split}.jsonl'):   # I3D rgb + flow halves and 'token' text, as released
            if r.get('domain') != 'BK': continue
            for part in ('rgb', 'opt'):
                np.save(feats / 'video_features' / f"{r['vid']}_{part}.npy",
                        rng.standard_normal((len(r['label']), recipe.v_dirs['video_features'] // 2), dtype=np.float32))
            np.savez(feats / 'query_features' / f"{r['qid']}.npz", token=rng.standard_normal((6, 8), dtype=np.float32))
    return dict(train=root / 'tvsum_train.jsonl', val=root / 'tvsum_val.jsonl', feats=feats)


def zero_score_moments(path: Path):
    "Every moment of the annotation file replaced by one 2-s clip (clip 7 q mod 75 of query q), saliency 2 everywhere."
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in recs:
        k = 7 * int(r['qid']) % 75
        r.update(relevant_windows=[[2 * k, 2 * k + 2]], relevant_clip_ids=[k], saliency_scores=[[2, 2, 2]])
    path.write_text(''.join(json.dumps(r) + '\n' for r in recs))


def official_flags(recipe: Recipe, paths: dict, results: Path, dropout_off: bool, extra=()) -> list:
    s = SMALL
    f = ['--dset_name', recipe.dset, '--ctx_mode', 'video_tef', '--clip_length', str(recipe.clip_len),
         '--v_feat_dirs', *[str(paths['feats'] / d) for d in recipe.v_dirs],
         '--t_feat_dirs', *[str(paths['feats'] / d) for d in recipe.t_dirs],
         '--v_feat_dim', str(sum(recipe.v_dirs.values())),
         '--t_feat_dim', str(sum(recipe.t_dirs.values())),
         '--train_path', str(paths['train']), '--eval_path', str(paths['val']), '--eval_split_name', 'val',
         '--results_root', str(results), '--exp_id', 'parity', '--device', '-1', '--num_workers', '0',
         '--no_pin_memory']
    for k in ('hidden_dim', 'nheads', 'dim_feedforward', 'bicmf_layers', 'enc_layers', 'dec_layers', 'num_queries',
              'max_q_l', 'bsz', 'eval_bsz', 'n_epoch', 'lr_drop', 'max_es_cnt', 'seed'):
        f += [f'--{k}', str(s[k])]
    f += recipe.flags
    if recipe.over.get('max_es_cnt') is not None: f += ['--max_es_cnt', str(recipe.over['max_es_cnt'])]
    if dropout_off: f += ['--dropout', '0', '--input_dropout', '0']
    return f + list(extra)


def our_config(recipe: Recipe, dropout_off: bool):
    from videolights.config import get_preset
    v = tuple(recipe.v_dirs.values())
    over = dict(SMALL, v_feat_dims=v, t_feat_dims=tuple(recipe.t_dirs.values()), clip_len=float(recipe.clip_len),
                **recipe.over)
    if dropout_off: over.update(dropout=0., input_dropout=0., fra_dropout=0.)
    return get_preset(recipe.preset, **over)


# ---------------------------------------------------------------------------------------------------------------
# the two runs
# ---------------------------------------------------------------------------------------------------------------
def run_official(cfg: dict, work: Path, official: str, py: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / 'cfg.json').write_text(json.dumps(dict(cfg, official=official, out=str(work))))
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')}
    r = subprocess.run([py, str(REPO / 'tools' / 'official' / 'train_probe.py'), str(work / 'cfg.json')],
                       capture_output=True, text=True, env=env, cwd=official)
    (work / 'official.log').write_text(r.stdout + r.stderr)
    if r.returncode:
        raise RuntimeError(f"official run failed ({work / 'official.log'}):\n" + (r.stdout + r.stderr)[-3000:])
    return json.loads((work / ('infer.json' if cfg.get('mode') == 'infer' else 'record.json')).read_text())


def run_ours(recipe: Recipe, paths: dict, out: Path, dtype, dropout_off: bool, init_official: Path | None,
             init_ours: Path | None = None) -> tuple:
    "Our loop on the same data; returns (record dict, params snapshots, state, cfg, model)."
    import videolights.train as VT
    from videolights.convert import map_official_state_dict
    from videolights.data import collate
    from videolights.runs import build_run
    from videolights.train import RunOptions, fit, load_weights, selection_score
    cfg = our_config(recipe, dropout_off)
    cfg, model, crit, tr_ds, ev = build_run(cfg, paths['train'].parent, verbose=False, train_records=paths['train'],
                                            eval_records=paths['val'])
    model.to(dtype)
    crit.to(dtype)
    if init_official is not None:
        sd = torch.load(init_official, map_location='cpu', weights_only=True)
        model.load_state_dict(map_official_state_dict(sd, model))
    if init_ours is not None: load_weights(model, init_ours)
    if dropout_off: P.no_dropout(model)

    class Seeded(type(tr_ds)):
        "The k-th item built seeds the dataset's rng with ITEM_SEED + k (as the probe seeds the official `random`)."
        def __getitem__(self, i):
            self.rng.seed(ITEM_SEED + self._count)
            self._count += 1
            return super().__getitem__(i)
    tr_ds.__class__, tr_ds._count = Seeded, 0
    coll = lambda items: P.to_dtype(collate(items), dtype)
    ev.collate_fn = coll
    rec = P.Recorder(EPOCHS_SNAPSHOT)
    rec.model = model
    rec.watch_criterion(crit)
    real_eval, real_save = VT._record_eval, VT.save_checkpoint

    def record_eval(out_dir, sp, sub, metrics, state, e, log, dset, weights):
        improved = real_eval(out_dir, sp, sub, metrics, state, e, log, dset, weights)
        brief = metrics.get('brief', metrics) if metrics else {}
        rec.evals.append(dict(epoch=e, brief={k: float(v) for k, v in brief.items() if isinstance(v, (int, float))},
                              score=selection_score(brief, dset, weights), improved=bool(improved)))
        return improved

    def save(obj, path, *a, **k):
        rec.saves.append(dict(name=Path(path).name, state=dict(obj.get('state') or {}), keys=sorted(obj)))
        return real_save(obj, path, *a, **k)
    VT._record_eval, VT.save_checkpoint = record_eval, save
    opts = RunOptions(device='cpu', tensorboard=False, progress=False, curves=False, console=False)
    try:
        with rec.active():
            state = fit(model, crit, tr_ds, cfg, out, opts, coll, ev)
    finally:
        VT._record_eval, VT.save_checkpoint = real_eval, real_save
    return dict(steps=rec.steps, evals=rec.evals, saves=rec.saves), rec.params, state, cfg, model


# ---------------------------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------------------------
def rel(a: float, b: float, floor: float = 1e-8) -> float:
    return abs(a - b) / max(abs(b), floor)


def compare_steps(o: list, u: list) -> dict:
    "Relative differences (official `o` vs ours `u`): at the first step and the largest over all steps, worst key."
    res = dict(n_official=len(o), n_ours=len(u), key_mismatch=[], epochs_equal=True, first={}, lr=0., total=0.,
               gnorm_pre=0., gnorm_post=0., losses=0., worst_loss=None, per_step=[])
    for i, (a, b) in enumerate(zip(o, u)):
        res['epochs_equal'] &= a['epoch'] == b['epoch']
        if set(a['losses']) != set(b['losses']): res['key_mismatch'] = sorted(set(a['losses']) ^ set(b['losses']))
        d = {k: rel(b[k], a[k]) for k in ('lr', 'total', 'gnorm_pre', 'gnorm_post')}
        lk = [k for k in set(a['losses']) & set(b['losses']) if k.startswith('loss')]   # class_error: a statistic
        dl = {k: rel(b['losses'][k], a['losses'][k], 1e-6) for k in lk}
        worst = max(dl, key=dl.get) if dl else None
        d.update(losses=dl[worst] if worst else 0., worst_loss=worst)
        if i == 0: res['first'] = d
        res['per_step'].append(max(d['total'], d['losses']))
        for k in ('lr', 'total', 'gnorm_pre', 'gnorm_post'): res[k] = max(res[k], d[k])
        if d['losses'] >= res['losses']: res['losses'], res['worst_loss'] = d['losses'], worst
    return res


def compare_params(po: dict, pu: dict, model) -> dict:
    "Per snapshot epoch: largest relative difference over all parameters (official mapped to our names)."
    from videolights.convert import map_official_state_dict
    out = {}
    for e in sorted(set(po) & set(pu)):
        mapped = map_official_state_dict(po[e], model)
        worst, name = 0., None
        for k, v in pu[e].items():
            if k not in mapped: continue
            ref = mapped[k].double()
            d = float((v - ref).abs().max()) / max(float(ref.abs().max()), 1e-8) if v.numel() else 0.
            if d >= worst: worst, name = d, k
        out[int(e)] = dict(rel=worst, worst=name, n=len(pu[e]))
    return out


def official_es(evals: list, saves: list) -> list:
    "The official early-stopping counter after each evaluation, from where it wrote model_best.ckpt."
    best_epochs = {s['epoch'] for s in saves if s['name'].endswith('_best.ckpt')}
    cnt, out = 0, []
    for ev in evals:
        cnt = 0 if ev['epoch'] in best_epochs else cnt + 1
        out.append(cnt)
    return out


def compare_evals(ro: dict, ru: dict, max_es: int) -> dict:
    eo, eu = ro['evals'], ru['evals']
    metric, keys_only = 0., set()
    for a, b in zip(eo, eu):
        ka, kb = set(a['brief']), set(b['brief'])
        keys_only |= ka ^ kb
        for k in ka & kb: metric = max(metric, abs(a['brief'][k] - b['brief'][k]))
    score = max((abs(a['score'] - b['score']) for a, b in zip(eo, eu)), default=0.)
    best_o = [s['epoch'] for s in ro['saves'] if s['name'].endswith('_best.ckpt')]
    best_u = [s['state']['best_epoch'] for s in ru['saves'] if s['name'] == 'model_best.ckpt']
    es_o = official_es(eo, ro['saves'])
    ev_epochs = {ev['epoch'] for ev in eu}
    es_u = [s['state']['es_cnt'] for s in ru['saves'] if s['name'] == 'model_latest.ckpt'
            and s['state']['epoch'] - 1 in ev_epochs]
    stop_o = max(s['epoch'] for s in ro['steps']) if ro['steps'] else None
    stop_u = max(s['epoch'] for s in ru['steps']) if ru['steps'] else None
    return dict(epochs_official=[e['epoch'] for e in eo], epochs_ours=[e['epoch'] for e in eu], metric=metric,
                score=score, keys_only_one_side=sorted(keys_only), best_official=best_o, best_ours=best_u,
                es_official=es_o, es_ours=es_u, last_epoch_official=stop_o, last_epoch_ours=stop_u,
                early_stop_official=ro.get('early_stop_epoch'), early_stop_ours=stop_u if
                (max_es != -1 and es_u and es_u[-1] > max_es) else None)


def check_checkpoints(work: Path, ro: dict, cfg, model_best_ours: Path, official: str, py: str, float64: bool,
                      eval_path: Path) -> dict:
    """Official model_best.ckpt: keys, opt vs our config, ours loading it; ours in the official layout, scored
    officially."""
    from videolights.convert import config_from_opt, load_official, read_official_checkpoint, to_official_state_dict
    from videolights.train import load_checkpoint
    from videolights.model import build_model
    ck_o = read_official_checkpoint(ro['best_ckpt'])
    res = dict(official_keys=sorted(ck_o), official_epoch=ck_o['epoch'])
    ocfg = config_from_opt(ck_o['opt'])
    fields = ['dset_name', 'max_v_l', 'max_q_l', 'hidden_dim', 'nheads', 'dim_feedforward', 'bicmf_layers',
              'enc_layers', 'dec_layers', 'num_queries', 'lr', 'wd', 'lr_drop', 'bsz', 'n_epoch', 'grad_clip', 'seed',
              'contrastive_align_loss_coef', 'hard_pos_neg_loss_coef', 'v_feat_dims', 't_feat_dims', 'clip_len',
              'use_matcher', 'max_es_cnt']
    res['opt_vs_config'] = {f: (getattr(ocfg, f, None), getattr(cfg, f)) for f in fields
                            if f in vars(ck_o['opt']) or hasattr(ocfg, f)}
    res['opt_vs_config']['v_feat_dims'] = (ocfg.v_feat_dim, cfg.v_feat_dim)   # sources are named by folder
    res['opt_vs_config']['t_feat_dims'] = (ocfg.t_feat_dim, cfg.t_feat_dim)
    res['opt_mismatch'] = sorted(f for f, (a, b) in res['opt_vs_config'].items()
                                 if f != 'max_es_cnt' and (tuple(a) if isinstance(a, (list, tuple)) else a) !=
                                 (tuple(b) if isinstance(b, (list, tuple)) else b))
    ours = load_checkpoint(model_best_ours)
    res['ours_keys'] = sorted(ours)
    res['ours_epoch'] = ours['state']['best_epoch']
    theirs = load_official(ck_o, cfg=cfg).double() if float64 else load_official(ck_o, cfg=cfg)
    worst = 0.
    for k, v in ours['model'].items():
        ref = theirs.state_dict()[k].to(v.dtype)
        if v.numel(): worst = max(worst, float((v - ref).abs().max()) / max(float(ref.abs().max()), 1e-8))
    res['ours_loading_theirs_rel'] = worst
    # ours in the official layout, beside the official run's opt.json, scored by the official inference.py
    exp = work / 'ours_official_layout'
    exp.mkdir(exist_ok=True)
    shutil.copyfile(Path(ro['results_dir']) / 'opt.json', exp / 'opt.json')
    m = build_model(cfg).to(torch.float64 if float64 else torch.float32)
    m.load_state_dict(ours['model'])
    torch.save(dict(model=to_official_state_dict(m), epoch=ours['state']['best_epoch'], opt=ck_o['opt']),
               exp / 'model_best.ckpt')
    inf = run_official(dict(mode='infer', float64=float64, eval_path=str(eval_path),
                            ckpts=dict(official=ro['best_ckpt'], ours=str(exp / 'model_best.ckpt'))),
                       work / 'infer', official, py)
    res['official_inference'] = inf
    common = set(inf['official']) & set(inf['ours'])
    res['inference_metric_diff'] = max((abs(inf['official'][k] - inf['ours'][k]) for k in common), default=0.)
    return res


# ---------------------------------------------------------------------------------------------------------------
def one_run(recipe: Recipe, paths: dict, work: Path, official: str, py: str, float64: bool, dropout_off: bool,
            tol: float, extra_flags=(), init_ours: Path | None = None, ckpt_check: bool = True) -> dict:
    dtype = torch.float64 if float64 else torch.float32
    ro = run_official(dict(flags=official_flags(recipe, paths, work / 'official', dropout_off, extra_flags),
                           float64=float64, dropout_off=dropout_off, snapshot_epochs=list(EPOCHS_SNAPSHOT),
                           order_seed=ORDER_SEED, item_seed=ITEM_SEED, train_path=str(paths['train'])),
                      work / 'official_probe', official, py)
    po = torch.load(work / 'official_probe' / 'params.pt', weights_only=True)
    init = None if init_ours is not None else work / 'official_probe' / 'init.pt'
    ru, pu, state, cfg, model = run_ours(recipe, paths, work / 'ours', dtype, dropout_off, init, init_ours)
    (work / 'ours_record.json').write_text(json.dumps(ru))
    res = dict(recipe=recipe.name, precision='float64' if float64 else 'float32',
               dropout='off' if dropout_off else 'on',
               init='own' if init_ours is not None else 'official',   # own: each side from its own checkpoint
               steps=compare_steps(ro['steps'], ru['steps']), evals=compare_evals(ro, ru, cfg.max_es_cnt),
               curves=dict(official=[s['total'] for s in ro['steps']], ours=[s['total'] for s in ru['steps']],
                           epoch=[s['epoch'] for s in ro['steps']]),
               official_ckpt=ro.get('best_ckpt'), ours_ckpt=str(work / 'ours' / 'model_best.ckpt'))
    res['curves']['rel_diff'] = res['steps'].pop('per_step')
    res['best_written'] = dict(official=bool(ro.get('best_ckpt')) and Path(ro['best_ckpt']).is_file(),
                               ours=(work / 'ours' / 'model_best.ckpt').is_file())
    res['scores'] = dict(official=[ev['score'] for ev in ro['evals']], ours=[ev['score'] for ev in ru['evals']])
    if dropout_off: res['params'] = compare_params(po, pu, model)
    else:
        res['loss_stats'] = loss_stats(ro['steps'], ru['steps'])
    if ckpt_check and dropout_off and ro.get('best_ckpt') and Path(ro['best_ckpt']).is_file() \
            and (work / 'ours' / 'model_best.ckpt').is_file():
        res['ckpt'] = check_checkpoints(work, ro, cfg, work / 'ours' / 'model_best.ckpt', official, py, float64,
                                        paths['val'])
    res['ok'], res['problems'] = verdict(res, tol)
    return res


def loss_stats(o: list, u: list) -> dict:
    "Per-epoch mean and std of the weighted loss on both sides (dropout on: trajectories differ, statistics agree)."
    out = {}
    for e in sorted({s['epoch'] for s in o}):
        a = np.array([s['total'] for s in o if s['epoch'] == e])
        b = np.array([s['total'] for s in u if s['epoch'] == e])
        out[int(e)] = dict(official_mean=float(a.mean()), ours_mean=float(b.mean()) if len(b) else float('nan'),
                           official_std=float(a.std()), ours_std=float(b.std()) if len(b) else float('nan'))
    n = min(len(o), len(u))   # the steps both made (equal when both run every epoch)
    ao, au = np.array([s['total'] for s in o[:n]]), np.array([s['total'] for s in u[:n]])
    out['all'] = dict(steps=n, official_mean=float(ao.mean()), ours_mean=float(au.mean()), official_std=float(ao.std()),
                      ours_std=float(au.std()), rel_mean_diff=float(abs(ao.mean() - au.mean()) / abs(ao.mean())),
                      first_step_rel=float(rel(au[0], ao[0])) if n else float('nan'),
                      largest_epoch_mean_rel=max(abs(d['official_mean'] - d['ours_mean']) / abs(d['official_mean'])
                                                 for e, d in out.items() if e != 'all'))
    return out


def verdict(r: dict, tol: float) -> tuple[bool, list]:
    """Whether a run agrees. Always: the same loss keys, learning rates and epochs of the steps both made, the same
    official options. Float64 with dropout off, besides: the same steps, evaluation epochs, best epochs, early-stopping
    counters, stop epoch and checkpoint epochs; at every step every loss, the weighted loss and both gradient norms
    within `tol`, every parameter snapshot within `tol`, the same metrics at every evaluation, ours loading theirs
    within `tol` and the official inference giving the same metrics on both best checkpoints. Float32 with dropout
    off: the first step within FLOAT32_FIRST_TOL (the rest is the drift report, in `notes`). Dropout on: the same
    steps and evaluation epochs (early stopping is off) and loss statistics close."""
    p, s, e = [], r['steps'], r['evals']
    exact = r['precision'] == 'float64' and r['dropout'] == 'off'
    loop = p if exact else r.setdefault('notes', [])   # float32 / dropout on: the loop's choices follow the drift
    if s['n_official'] != s['n_ours']:
        (loop if r['dropout'] == 'off' else p).append(f"steps: official {s['n_official']} vs ours {s['n_ours']}")
    if s['key_mismatch']: p.append(f"loss keys differ: {s['key_mismatch']}")
    if not s['epochs_equal']: p.append('step epochs differ')
    if s['lr'] > 1e-12: p.append(f"learning rates differ ({s['lr']:.2e})")
    if e['epochs_official'] != e['epochs_ours']:
        (loop if r['dropout'] == 'off' else p).append(f"eval epochs {e['epochs_official']} vs {e['epochs_ours']}")
    if r['dropout'] == 'off':
        if e['best_official'] != e['best_ours']: loop.append(f"best epochs {e['best_official']} vs {e['best_ours']}")
        if e['es_official'] != e['es_ours']: loop.append(f"early-stop counters {e['es_official']} vs {e['es_ours']}")
        if e['last_epoch_official'] != e['last_epoch_ours']:
            loop.append(f"last epoch {e['last_epoch_official']} vs {e['last_epoch_ours']}")
    bw = r['best_written']
    if bw['official'] != bw['ours']:
        loop.append(f"model_best.ckpt written: official {bw['official']}, ours {bw['ours']}")
    if r['recipe'] == 'zero' and any(r['scores']['official'] + r['scores']['ours']):
        p.append(f"the zero-score recipe scored above 0: {r['scores']}")
    if r['precision'] == 'float32' and r['dropout'] == 'off' and r.get('init') != 'own':
        f = s['first']
        for k in ('total', 'losses', 'gnorm_pre', 'gnorm_post'):
            if f[k] > FLOAT32_FIRST_TOL:
                p.append(f"first step {k}: relative difference {f[k]:.2e} > {FLOAT32_FIRST_TOL:g}")
    if r['precision'] == 'float64' and r['dropout'] == 'off':
        for k in ('total', 'gnorm_pre', 'gnorm_post', 'losses'):
            if s[k] > tol: p.append(f"{k}: relative difference {s[k]:.2e} > {tol:g} (largest over the steps)")
        for ep, d in r.get('params', {}).items():
            if d['rel'] > tol: p.append(f"parameters after epoch {ep}: relative difference {d['rel']:.2e} > {tol:g}")
        if e['metric'] > 1e-9 or e['score'] > 1e-9: p.append(f"evaluation metrics differ ({e['metric']:.2g})")
        ck = r.get('ckpt')
        if ck and ck['ours_loading_theirs_rel'] > tol:
            p.append(f"ours loading theirs: relative difference {ck['ours_loading_theirs_rel']:.2e} > {tol:g}")
        if ck and ck['inference_metric_diff'] > 1e-9:
            p.append(f"official inference on the two best checkpoints differs ({ck['inference_metric_diff']:.2g})")
    if r['dropout'] == 'on':
        st = r['loss_stats']['all']
        if st['first_step_rel'] > 0.5 or st['rel_mean_diff'] > 0.25:
            p.append(f"dropout-on loss statistics differ: mean {st['official_mean']:.4f} vs {st['ours_mean']:.4f}")
    ck = r.get('ckpt')
    if ck:
        if ck['opt_mismatch']: p.append(f"official opt vs our config: {ck['opt_mismatch']}")
        if ck['official_epoch'] != ck['ours_epoch']:
            loop.append(f"best checkpoint epochs {ck['official_epoch']} vs {ck['ours_epoch']}")
    return not p, p


def print_run(r: dict):
    s, e = r['steps'], r['evals']
    head = f"{r['recipe']:9s} {r['precision']:8s} dropout {r['dropout']:3s}"
    print(f"\n== {head}: {'ok' if r['ok'] else 'FAIL'}")
    print(f"  steps compared      {s['n_ours']} (official {s['n_official']})")
    f = s['first']
    print(f"  first step rel diff weighted loss {f['total']:.1e}  losses {f['losses']:.1e} ({f['worst_loss']})  "
          f"grad norm "
          f"before clip {f['gnorm_pre']:.1e}  after {f['gnorm_post']:.1e}")
    print(f"  max rel diff        lr {s['lr']:.1e}  weighted loss {s['total']:.1e}  losses {s['losses']:.1e} "
          f"({s['worst_loss']})  grad norm before clip {s['gnorm_pre']:.1e}  after {s['gnorm_post']:.1e}")
    for ep, d in r.get('params', {}).items():
        print(f"  parameters after epoch {ep:>2}: max rel diff {d['rel']:.1e} ({d['worst']})")
    if 'loss_stats' in r:
        st = r['loss_stats']['all']
        print(f"  loss mean±std       official {st['official_mean']:.4f}±{st['official_std']:.4f}  ours "
              f"{st['ours_mean']:.4f}±{st['ours_std']:.4f} over {st['steps']} steps (first step rel diff "
              f"{st['first_step_rel']:.1e}, largest per-epoch mean rel diff {st['largest_epoch_mean_rel']:.1e})")
    print(f"  evaluations         epochs {e['epochs_official']} / {e['epochs_ours']}  "
          f"max metric diff {e['metric']:.2g} "
          f"score diff {e['score']:.2g}")
    print(f"  best epochs         official {e['best_official']}  ours {e['best_ours']}; model_best.ckpt written: "
          f"official {r['best_written']['official']}, ours {r['best_written']['ours']}")
    print(f"  early-stop counter  official {e['es_official']}  ours {e['es_ours']}; last epoch "
          f"{e['last_epoch_official']} / {e['last_epoch_ours']}; early stop {e['early_stop_official']} / "
          f"{e['early_stop_ours']}")
    if e['keys_only_one_side']: print(f"  metric keys on one side only: {e['keys_only_one_side']}")
    ck = r.get('ckpt')
    if ck:
        print(f"  official ckpt keys  {ck['official_keys']} (epoch {ck['official_epoch']}); ours {ck['ours_keys']} "
              f"(best epoch {ck['ours_epoch']})")
        print(f"  opt vs our config   {'equal' if not ck['opt_mismatch'] else ck['opt_mismatch']} on "
              f"{len(ck['opt_vs_config'])} fields; ours loading theirs: max rel diff "
              f"{ck['ours_loading_theirs_rel']:.1e}")
        print(f"  official inference  on ours vs on theirs: max metric diff {ck['inference_metric_diff']:.2g}")
    for n in r.get('notes', []): print(f"  ~ {n} (drift)")
    for p in r['problems']: print(f"  ! {p}")


def run_recipe(name: str, work: Path, official: str, py: str, precisions, tol: float, dropout_run: bool) -> list:
    recipe = RECIPES[name]
    out = []
    paths = write_data(recipe, work / 'data')
    for prec in precisions:
        w = work / prec
        r = one_run(recipe, paths, w, official, py, prec == 'float64', True, tol)
        out.append(r)
        print_run(r)
        if name == 'pretrain':   # fine-tune from each side's own pretraining checkpoint (official --resume)
            ft = RECIPES['qvh']
            fpaths = dict(paths, train=paths['train'].with_name('highlight_train_release.jsonl'))
            if not (r.get('official_ckpt') and Path(r['official_ckpt']).is_file()):
                raise RuntimeError('pretraining wrote no official model_best.ckpt to fine-tune from')
            rf = one_run(dataclasses.replace(ft, name='finetune'), fpaths, work / f'{prec}_finetune', official, py,
                         prec == 'float64', True, tol, extra_flags=['--resume', r['official_ckpt']],
                         init_ours=Path(r['ours_ckpt']))
            out.append(rf)
            print_run(rf)
    if dropout_run:   # early stopping off: the two random trajectories would stop at different epochs
        r = one_run(dataclasses.replace(recipe, over={**recipe.over, 'max_es_cnt': -1}), paths, work / 'dropout',
                    official, py, False, False, tol)
        out.append(r)
        print_run(r)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog='example: OMP_NUM_THREADS=1 python tools/check_official_train.py --recipes qvh')
    ap.add_argument('--official', default=None, help='official checkout (default: $VIDEOLIGHTS_OFFICIAL)')
    ap.add_argument('--official-python', default=None, help='its interpreter (default: $VIDEOLIGHTS_OFFICIAL_PY)')
    ap.add_argument('--recipes', nargs='+', default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument('--precisions', nargs='+', default=['float64', 'float32'], choices=['float64', 'float32'])
    ap.add_argument('--dropout-run', action='store_true', help='also a float32 run with dropout on (loss statistics)')
    ap.add_argument('--tol', type=float, default=1e-6, help='relative tolerance of the float64 runs')
    ap.add_argument('--json', default=None, help='write the full report here')
    ap.add_argument('--curves', default=None, help='write the per-step weighted losses of both sides here (JSON)')
    ap.add_argument('--workdir', default=None, help='keep the runs here (default: a temporary folder, removed)')
    a = ap.parse_args(argv)
    try:
        official, py = H.require_environment(a.official, a.official_python)
    except FileNotFoundError as e:
        print(f"check_official_train: {e}", file=sys.stderr)
        return 2
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix='vl_train_parity_'))
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())))
    try:
        runs = []
        for name in a.recipes:
            runs += run_recipe(name, work / name, official, py, a.precisions, a.tol, a.dropout_run)
    finally:
        if not a.workdir: shutil.rmtree(work, ignore_errors=True)
    print('\nrecipe     precision dropout steps  max rel diff (loss, params)  evals  best (off/ours)  result')
    for r in runs:
        worst_p = max((d['rel'] for d in r.get('params', {}).values()), default=float('nan'))
        e = r['evals']
        print(f"{r['recipe']:10s} {r['precision']:9s} {r['dropout']:7s} {r['steps']['n_ours']:5d}  "
              f"{max(r['steps']['total'], r['steps']['losses']):.1e}, {worst_p:.1e}        {len(e['epochs_ours']):5d}  "
              f"{e['best_official']}/{e['best_ours']}  {'ok' if r['ok'] else 'FAIL'}")
    if a.json: Path(a.json).write_text(json.dumps(runs, indent=1, default=str))
    if a.curves:
        Path(a.curves).write_text(json.dumps({f"{r['recipe']}/{r['precision']}/dropout_{r['dropout']}": r['curves']
                                              for r in runs}, indent=None) + '\n')
    ok = all(r['ok'] for r in runs)
    print('ALL OK' if ok else 'MISMATCH')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
