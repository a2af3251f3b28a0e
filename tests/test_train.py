"""Training engine: exact resume, atomic checkpoints, the non-finite guard, selection rule, CLI helpers.

Everything here uses a toy model/criterion/dataset with the real interfaces (ARCHITECTURE.md), so it runs in
seconds on CPU and does not depend on the real model's speed.
"""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from videolights.train import (EpochSampler, Evaluator, NonFiniteLossError, RunOptions, TrainState, cpu_native_bf16,
                               decode_predictions, fit, get_rng_state, load_checkpoint, read_best_metrics,
                               save_checkpoint, selection_score, set_rng_state, set_seed)
from videolights.errors import MissingFileError
from videolights.experiments import captions_to_pretrain, pretrain_data_main
from videolights.runs import parse_overrides


# ---------------------------------------------------------------- toy model, criterion and data (real interfaces)
class ToyModel(nn.Module):
    def __init__(self, d=8, nq=2, p_drop=0.1):
        super().__init__()
        self.clip, self.span, self.cls = nn.Linear(d, 1), nn.Linear(d, 2 * nq), nn.Linear(d, 2 * nq)
        self.drop, self.nq = nn.Dropout(p_drop), nq

    def forward(self, src_txt, src_txt_mask, src_vid, src_vid_mask):
        h = self.drop(src_vid * src_txt.mean(1, keepdim=True))                          # (B, Lv, d)
        pooled = (h * src_vid_mask[..., None]).sum(1) / src_vid_mask.sum(1, keepdim=True)  # (B, d)
        B = h.shape[0]
        return dict(saliency_scores=self.clip(h).squeeze(-1),
                    pred_spans=self.span(pooled).view(B, self.nq, 2).sigmoid(),
                    pred_logits=self.cls(pooled).view(B, self.nq, 2))


class ToyCriterion(nn.Module):
    "Per-sample means only, so a DDP average of rank means equals the global mean; one term ramps with the epoch."
    weight_dict = dict(loss_span=10., loss_saliency=1., loss_label=1.)

    def forward(self, outputs, targets, epoch=0):
        tgt = torch.stack([t['spans'][0] for t in targets['span_labels']])
        span = (outputs['pred_spans'][:, 0] - tgt).abs().mean()
        zero = torch.zeros(len(tgt), dtype=torch.long, device=tgt.device)
        lab = nn.functional.cross_entropy(outputs['pred_logits'][:, 0], zero)
        sal = ((outputs['saliency_scores'] - targets['saliency_all_labels']) ** 2).mean()
        return dict(loss_span=span, loss_saliency=sal * min(epoch + 1, 3), loss_label=lab)


class ToyData(Dataset):
    def __init__(self, n=48, L=10, d=8, seed=0, random_labels=True):
        g = torch.Generator().manual_seed(seed)
        self.q = torch.randn(n, 3, d, generator=g)
        self.st = torch.randint(0, L - 3, (n,), generator=g)
        self.v = torch.randn(n, L, d, generator=g) * 0.5
        for i in range(n): self.v[i, self.st[i]:self.st[i] + 3] += self.q[i].mean(0)
        self.L, self.random_labels, self.nan_at = L, random_labels, None

    def __len__(self): return len(self.q)

    def __getitem__(self, i):
        st, L = int(self.st[i]), self.L
        lab = torch.zeros(L)
        lab[st:st + 3] = 1 + (np.random.rand() if self.random_labels else 0.5)
        v = self.v[i].clone()
        if self.nan_at == i: v[0, 0] = float('nan')
        meta = dict(qid=i, query=f'q{i}', vid=f'v{i}', duration=2. * L, relevant_windows=[[2. * st, 2. * st + 6]])
        return dict(meta=meta,
                    q=self.q[i], v=v, lab=lab, span=torch.tensor([(st + 1.5) / L, 3 / L]))


def toy_collate(items):
    B = len(items)
    inputs = dict(src_txt=torch.stack([x['q'] for x in items]), src_txt_mask=torch.ones(B, 3),
                  src_vid=torch.stack([x['v'] for x in items]), src_vid_mask=torch.ones(B, items[0]['v'].shape[0]))
    targets = dict(span_labels=[dict(spans=x['span'][None]) for x in items],
                   saliency_all_labels=torch.stack([x['lab'] for x in items]))
    return inputs, targets, [x['meta'] for x in items]


def toy_metrics(sub, gt):
    by = {g['qid']: g for g in gt}
    hits = []
    for s in sub:
        (a, b, _), (c, d) = s['pred_relevant_windows'][0], by[s['qid']]['relevant_windows'][0]
        inter, union = max(0., min(b, d) - max(a, c)), max(b, d) - min(a, c)
        hits.append(float(union > 0 and inter / union >= 0.5))
    return dict(brief={'MR-full-R1@0.5': 100 * sum(hits) / len(hits), 'MR-full-R1@0.3': 50.})


def toy_cfg(**kw):
    return SimpleNamespace(**{**dict(lr=5e-2, grad_clip=1.0, bsz=8, n_epoch=4, seed=0, eval_every=2, eval_bsz=8,
                                     num_workers=0, dset_name='hl', clip_len=2.), **kw})


def toy_run(out, resume=False, on_step=None, data=None, p_drop=0.1, opts=None, **kw):
    set_seed(0)
    m = ToyModel(p_drop=p_drop)
    cfg = toy_cfg(**kw)
    val = ToyData(n=16, seed=1, random_labels=False)
    ev = Evaluator(val, cfg, toy_collate, toy_metrics, gt=[val[i]['meta'] for i in range(len(val))])
    fit(m, ToyCriterion(), data if data is not None else ToyData(), cfg, out,
        opts or RunOptions(device='cpu', progress=False, tensorboard=False), toy_collate, ev, resume, on_step)
    return m


def assert_same_weights(a, b):
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k


def ctrl_c_at(step):
    def f(state):
        if state.global_step == step: raise KeyboardInterrupt
    return f


# ---------------------------------------------------------------- RNG, sampler
def test_rng_state_roundtrip_through_weights_only_checkpoint(tmp_path):
    set_seed(7)
    save_checkpoint(dict(rng=get_rng_state()), tmp_path/'r.ckpt')
    a = (np.random.rand(3).tolist(), torch.rand(3).tolist(), __import__('random').random())
    set_rng_state(load_checkpoint(tmp_path/'r.ckpt')['rng'])
    b = (np.random.rand(3).tolist(), torch.rand(3).tolist(), __import__('random').random())
    assert a == b


def test_sampler_shards_cover_global_batches_and_restart_mid_epoch():
    one = EpochSampler(20, seed=1)
    one.set_epoch(3)
    ranks = [EpochSampler(20, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in ranks: s.set_epoch(3)
    g, sh = list(one), [list(s) for s in ranks]
    assert sorted(g) == list(range(20))
    for k in range(5): assert sorted(g[4*k:4*k+4]) == sorted(sh[0][2*k:2*k+2] + sh[1][2*k:2*k+2])
    one.set_epoch(3, start=6)
    assert list(one) == g[6:]
    one.set_epoch(4)
    assert list(one) != g                       # a new epoch reshuffles
    odd = [EpochSampler(5, rank=r, world_size=2, shuffle=False) for r in range(2)]
    assert [list(s) for s in odd] == [[0, 2, 4], [1, 3, 0]]       # padded by wrapping


# ---------------------------------------------------------------- atomic checkpoints
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    p = save_checkpoint(dict(epoch=1, w=torch.ones(4)), tmp_path/'model_latest.ckpt')
    def dying(obj, f):
        f.write(b'PK\x03\x04 truncated')
        raise OSError('No space left on device')
    monkeypatch.setattr(torch, 'save', dying)
    with pytest.raises(OSError): save_checkpoint(dict(epoch=2, w=torch.zeros(4)), p)
    monkeypatch.undo()
    assert load_checkpoint(p)['epoch'] == 1
    assert [x.name for x in tmp_path.iterdir()] == ['model_latest.ckpt']


def test_killed_save_leaves_a_readable_checkpoint(tmp_path):
    "SIGKILL a process that keeps rewriting a large checkpoint; whatever is on disk must load."
    path = tmp_path/'model_latest.ckpt'
    code = textwrap.dedent(f"""
        import torch, sys
        from videolights.train import save_checkpoint
        save_checkpoint(dict(version=0, w=torch.zeros(10)), {str(path)!r})
        print('ready', flush=True)
        i = 1
        while True:
            save_checkpoint(dict(version=i, w=torch.full((4_000_000,), float(i))), {str(path)!r}); i += 1
    """)
    for delay in (0.05, 0.3, 0.7):
        proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == 'ready'
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = load_checkpoint(path)                                  # never a truncated file
        assert ck['version'] == 0 or float(ck['w'][0]) == ck['version']
    assert load_checkpoint(path)['version'] >= 0


# ---------------------------------------------------------------- exact resume
def test_resume_at_epoch_boundary_is_exact(tmp_path):
    straight = toy_run(tmp_path/'a')
    toy_run(tmp_path/'b', n_epoch=2)
    resumed = toy_run(tmp_path/'b', resume=True)
    assert_same_weights(straight, resumed)
    ck = load_checkpoint(tmp_path/'b'/'model_latest.ckpt')
    assert ck['state']['epoch'] == 4
    assert set(ck) >= {'model', 'optimizer', 'scheduler', 'rng', 'config', 'metrics', 'state'}
    assert isinstance(ck['config'], dict)


def test_ctrl_c_mid_epoch_saves_and_resumes_exactly(tmp_path):
    straight = toy_run(tmp_path/'a')
    with pytest.raises(KeyboardInterrupt): toy_run(tmp_path/'c', on_step=ctrl_c_at(9))
    ck = load_checkpoint(tmp_path/'c'/'model_latest.ckpt')
    assert (ck['state']['epoch'], ck['state']['batch'], ck['state']['global_step']) == (1, 3, 9)
    assert_same_weights(straight, toy_run(tmp_path/'c', resume=True))


def test_resume_with_grad_accumulation_is_exact(tmp_path):
    o = RunOptions(device='cpu', progress=False, tensorboard=False, grad_accum=2)
    straight = toy_run(tmp_path/'a', opts=o)
    with pytest.raises(KeyboardInterrupt): toy_run(tmp_path/'c', on_step=ctrl_c_at(4), opts=o)   # epoch 1, step 1 of 3
    assert load_checkpoint(tmp_path/'c'/'model_latest.ckpt')['state']['batch'] == 2
    assert_same_weights(straight, toy_run(tmp_path/'c', resume=True, opts=o))
    assert not torch.equal(straight.clip.weight, toy_run(tmp_path/'d').clip.weight)   # accumulation changes the run


@pytest.mark.skipif(not cpu_native_bf16(),
                    reason='this CPU has no bf16 instructions (bf16 would be emulated; it still runs, with a warning)')
def test_cpu_bf16_autocast_trains_and_resumes_exactly(tmp_path):
    "--amp bf16 on the CPU really autocasts (the run differs from float32), weights stay float32, resume is exact."
    o = RunOptions(device='cpu', amp='bf16', progress=False, tensorboard=False)
    straight = toy_run(tmp_path/'a', opts=o)
    assert all(p.dtype == torch.float32 for p in straight.parameters())
    assert not torch.equal(straight.clip.weight, toy_run(tmp_path/'f').clip.weight)   # not silently float32
    with pytest.raises(KeyboardInterrupt): toy_run(tmp_path/'c', on_step=ctrl_c_at(9), opts=o)
    assert_same_weights(straight, toy_run(tmp_path/'c', resume=True, opts=o))
    log = [json.loads(l) for l in open(tmp_path/'a'/'log.jsonl')]
    assert json.loads((tmp_path/'a'/'config.json').read_text())['options']['amp'] == 'bf16'
    losses = [l['loss_overall'] for l in log if l['kind'] == 'train']
    assert len(losses) == 4 and losses[-1] < losses[0], losses


def test_cli_refuses_fp16_on_the_cpu_before_doing_any_work(tmp_path, capsys):
    from videolights.runs import train_main
    with pytest.raises(SystemExit) as e:
        train_main(['--preset', 'tiny', '--data', str(tmp_path/'no_data'), '--out', str(tmp_path/'run'),
                    '--device', 'cpu', '--amp', 'fp16', '--no-progress'])
    assert e.value.code == 2 and "use amp='bf16'" in capsys.readouterr().err
    assert not (tmp_path/'run').exists()


def test_run_directory_contents_and_best_checkpoint(tmp_path):
    toy_run(tmp_path/'a')
    names = {p.name for p in (tmp_path/'a').iterdir()}
    assert names >= {'config.json', 'log.jsonl', 'model_latest.ckpt', 'model_best.ckpt', 'latest_val_preds.jsonl',
                     'best_val_preds.jsonl', 'latest_val_metrics.json', 'best_val_metrics.json'}
    log = [json.loads(l) for l in open(tmp_path/'a'/'log.jsonl')]
    evals = [l for l in log if l['kind'] == 'eval']
    assert [l['epoch'] for l in evals] == [1, 3] and len([l for l in log if l['kind'] == 'train']) == 4
    best = load_checkpoint(tmp_path/'a'/'model_best.ckpt')
    assert best['state']['best_score'] == max(l['score'] for l in evals)
    sub = [json.loads(l) for l in open(tmp_path/'a'/'best_val_preds.jsonl')]
    assert [s['qid'] for s in sub] == list(range(16))
    assert all(len(s['pred_saliency_scores']) == 10 for s in sub)


# ---------------------------------------------------------------- non-finite guard
def test_non_finite_loss_stops_with_batch_ids_and_keeps_last_good_checkpoint(tmp_path):
    data = ToyData()
    toy_run(tmp_path/'a', n_epoch=1, data=data)
    before = (tmp_path/'a'/'model_latest.ckpt').read_bytes()
    data.nan_at = 5
    with pytest.raises(NonFiniteLossError) as e: toy_run(tmp_path/'a', resume=True, data=data, n_epoch=2)
    msg = str(e.value)
    assert 'epoch 1' in msg and '5' in msg and 'loss_span=' in msg and 'loss_saliency=' in msg
    assert (tmp_path/'a'/'model_latest.ckpt').read_bytes() == before


# ---------------------------------------------------------------- selection, decoding, CLI helpers
def test_selection_score_official_weights():
    brief = {'MR-full-R1@0.3': 70., 'MR-full-R1@0.5': 60., 'MR-full-R1@0.7': 40., 'MR-full-mAP@0.5': 55.,
             'MR-full-mAP@0.75': 35., 'MR-full-mAP': 35., 'MR-long-mAP': 45., 'MR-middle-mAP': 35., 'MR-short-mAP': 5.}
    assert selection_score(brief) == pytest.approx(162.75 / 3.75)
    charades = selection_score({'MR-full-R1@0.3': 50., 'MR-full-mIoU': 40.}, 'charadesSTA')
    assert charades == pytest.approx((15 + 20) / 2.0)
    assert selection_score({'mAP': 80.}, 'tvsum') == 80.


def test_decode_predictions_matches_spec_postprocessing():
    outs = dict(pred_logits=torch.tensor([[[0., 0.], [5., 0.]]]), pred_spans=torch.tensor([[[0.5, 0.2], [0.1, 0.5]]]),
                saliency_scores=torch.tensor([[0.12345, -1., 3.]]))
    (line,) = decode_predictions(outs, [dict(qid=3, query='q', vid='v', duration=100.)], torch.tensor([[1., 1., 0.]]))
    # second query first (p = 0.9933); 0.1 ± 0.25 of 100 s → [-15, 35] → clamp [0, 35] → round to 2 s → [0, 36]
    assert line['pred_relevant_windows'] == [[0., 36., 0.9933], [40., 60., 0.5]]
    assert line['pred_saliency_scores'] == [float(torch.tensor(0.12345).half()), -1.]


def test_parse_overrides_types_aliases_and_errors():
    assert parse_overrides(['--epochs', '3', '--lr=1e-3', '--use-tef', 'no', '--t_feat_dims', '16']) == \
        dict(n_epoch=3, lr=1e-3, use_tef=False, t_feat_dims=(16,))
    with pytest.raises(ValueError, match='did you mean'): parse_overrides(['--n_epochs', '3'])
    with pytest.raises(ValueError, match='true/false'): parse_overrides(['--aux_loss', 'maybe'])


def test_pretrain_data_cli(tmp_path):
    caps = [dict(vid='v1', timestamp=t, caption=f'frame {t}', score=0.5) for t in (0, 10, 20, 30)]
    caps += [dict(vid='long', timestamp=0, caption='x', duration=900)]
    (tmp_path/'c.jsonl').write_text(''.join(json.dumps(c) + '\n' for c in caps))
    (tmp_path/'d.json').write_text(json.dumps({'v1': 41.5}))
    assert pretrain_data_main(['--captions', str(tmp_path/'c.jsonl'), '--durations', str(tmp_path/'d.json'),
                               '--out', str(tmp_path/'pt.jsonl')]) == 0
    recs = [json.loads(l) for l in open(tmp_path/'pt.jsonl')]
    assert len(recs) == 4                                           # the 900-s video is skipped (official 500-s limit)
    r = recs[1]
    assert (r['qid'], r['duration'], r['relevant_windows'], r['split']) == ('v1_10_20.25', 41, [[10., 20.25]], 'train')
    assert r['relevant_clip_ids'] == [5, 6, 7, 8, 9, 10]
    assert r['saliency_scores'] == [[round(float(np.exp(1.25)), 4)]] * 6
    with pytest.raises(ValueError, match='captions.jsonl:2: missing'):
        captions_to_pretrain([dict(vid='a', timestamp=0, caption='x', duration=9), dict(vid='a', caption='y')],
                             where='captions.jsonl')


def test_new_run_refuses_to_clobber_an_existing_one(tmp_path):
    toy_run(tmp_path/'a', n_epoch=1)
    with pytest.raises(FileExistsError, match='already holds a run'): toy_run(tmp_path/'a', n_epoch=1)
    set_seed(0)
    cfg = toy_cfg(n_epoch=1)
    fit(ToyModel(), ToyCriterion(), ToyData(), cfg, tmp_path/'a',
        RunOptions(device='cpu', progress=False, tensorboard=False), toy_collate, overwrite=True)
    assert len([l for l in open(tmp_path/'a'/'log.jsonl')]) == 1          # the old log was replaced, not appended to


# ---------------------------------------------------------------- periodic copies, early stopping
def _const_run(out, resume=False, opts=None, **kw):
    "Toy run whose validation metric never changes: only the first evaluation improves."
    set_seed(0)
    cfg = toy_cfg(**{**dict(eval_every=1, n_epoch=10), **kw})
    val = ToyData(n=16, seed=1, random_labels=False)
    ev = Evaluator(val, cfg, toy_collate, lambda sub, gt: dict(brief={'MR-full-R1@0.5': 50.}),
                   gt=[val[i]['meta'] for i in range(len(val))])
    opts = opts or RunOptions(device='cpu', progress=False, tensorboard=False)
    return fit(ToyModel(), ToyCriterion(), ToyData(), cfg, out, opts, toy_collate, ev, resume)


def test_early_stopping_counts_evaluations_and_survives_resume(tmp_path):
    st = _const_run(tmp_path/'a', max_es_cnt=2)
    assert (st.epoch, st.es_cnt, st.best_epoch) == (4, 3, 0)
    log = [json.loads(l) for l in open(tmp_path/'a'/'log.jsonl')]
    assert log[-1]['kind'] == 'early_stop' and log[-1]['epoch'] == 3
    assert _const_run(tmp_path/'a', resume=True, max_es_cnt=2).epoch == 4        # a stopped run stays stopped
    assert _const_run(tmp_path/'a', resume=True, max_es_cnt=4).epoch == 6        # a larger budget continues the count
    assert _const_run(tmp_path/'off', max_es_cnt=-1).epoch == 10                 # -1: never stops (official)
    assert _const_run(tmp_path/'dflt').epoch == 10                               # default 200: off in practice


def _zero_run(out, **kw):
    "Toy run whose every evaluation scores 0 (no window is ever right)."
    set_seed(0)
    cfg = toy_cfg(**{**dict(eval_every=1, n_epoch=6, max_es_cnt=1), **kw})
    val = ToyData(n=16, seed=1, random_labels=False)
    ev = Evaluator(val, cfg, toy_collate, lambda sub, gt: dict(brief={'MR-full-R1@0.5': 0., 'MR-full-R1@0.3': 0.}),
                   gt=[val[i]['meta'] for i in range(len(val))])
    opts = RunOptions(device='cpu', progress=False, tensorboard=False)
    return fit(ToyModel(), ToyCriterion(), ToyData(), cfg, out, opts, toy_collate, ev)


def test_all_zero_scores_keep_no_best_checkpoint_as_the_official_loop_unless_fixed(tmp_path):
    "Official: best score starts at 0, a strictly greater score saves; `fix_best_score_start` starts below any score."
    st = _zero_run(tmp_path/'off')
    files = {p.name for p in (tmp_path/'off').iterdir()}
    assert 'model_best.ckpt' not in files and not any(f.startswith('best_') for f in files)
    assert 'model_latest.ckpt' in files and 'latest_val_metrics.json' in files
    assert (st.best_score, st.best_epoch) == (0., -1)
    assert (st.epoch, st.es_cnt) == (2, 2)          # every evaluation counts: stops at the second (max_es_cnt=1)
    log = [json.loads(l) for l in open(tmp_path/'off'/'log.jsonl')]
    assert [l['score'] for l in log if l['kind'] == 'eval'] == [0., 0.]
    assert 'no evaluation scored above 0' in (tmp_path/'off'/'train.log').read_text()
    with pytest.raises(MissingFileError, match='no evaluation of this run scored above 0'):
        read_best_metrics(tmp_path/'off')
    st = _zero_run(tmp_path/'fix', fix_best_score_start=True)
    assert (tmp_path/'fix'/'model_best.ckpt').is_file() and (tmp_path/'fix'/'best_val_metrics.json').is_file()
    assert (st.best_score, st.best_epoch) == (0., 0)
    assert (st.epoch, st.es_cnt) == (3, 2)          # the first evaluation is the best: one more before stopping
    assert load_checkpoint(tmp_path/'fix'/'model_best.ckpt')['state']['best_epoch'] == 0
    assert read_best_metrics(tmp_path/'fix')['brief'] == {'MR-full-R1@0.5': 0., 'MR-full-R1@0.3': 0.}


def test_a_run_without_best_checkpoint_is_evaluated_from_its_latest(tmp_path):
    "A run folder whose evaluations all scored 0 resolves to model_latest.ckpt (the documented fallback)."
    from videolights.runs import resolve_ckpt
    _zero_run(tmp_path/'r')
    assert resolve_ckpt(tmp_path/'r') == tmp_path/'r'/'model_latest.ckpt'


def test_periodic_checkpoints(tmp_path):
    names = lambda d: sorted(p.name for p in d.glob('model_e*.ckpt'))
    _const_run(tmp_path/'a', n_epoch=5, opts=RunOptions(device='cpu', progress=False, tensorboard=False, save_every=2))
    assert names(tmp_path/'a') == ['model_e0001.ckpt', 'model_e0003.ckpt']
    ck = load_checkpoint(tmp_path/'a'/'model_e0003.ckpt')
    assert ck['state']['epoch'] == 4 and set(ck) >= {'model', 'optimizer', 'scheduler', 'rng', 'config'}
    _const_run(tmp_path/'b', n_epoch=5, lr_drop=4)                # official default: 50 and every lr_drop
    assert names(tmp_path/'b') == ['model_e0003.ckpt']
    _const_run(tmp_path/'c', n_epoch=5, lr_drop=4,
               opts=RunOptions(device='cpu', progress=False, tensorboard=False, save_every=0))
    assert names(tmp_path/'c') == []


def test_resume_uses_this_machines_adamw_implementation():
    "A checkpoint written by plain AdamW (older runs) resumes with the fused one where torch has it, same state."
    from dataclasses import asdict
    from videolights.train import _restore, adamw, DistInfo, get_rng_state
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    old = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-4)
    m(torch.ones(1, 3)).sum().backward()
    old.step()
    sched = torch.optim.lr_scheduler.StepLR(old, 10)
    st = asdict(TrainState(epoch=1))
    st.pop('rng')
    ck = dict(model=m.state_dict(), optimizer=old.state_dict(), scheduler=sched.state_dict(), state=st,
              rng=[get_rng_state()])
    new = adamw(m.parameters(), 1e-3, 1e-4)
    state = _restore(ck, m, new, torch.optim.lr_scheduler.StepLR(new, 10), None, DistInfo())
    assert state.epoch == 1 and new.param_groups[0]['fused'] == new.defaults['fused']
    assert torch.equal(new.state[m.weight]['exp_avg'], old.state[m.weight]['exp_avg'])
    new.step()                                                             # and it steps


def test_cuda_graphs_without_cuda_warns_and_keeps_the_plain_forward(tmp_path):
    "`cuda_graphs=True` on the CPU: a warning, and the same submission as the plain forward (no padding, no graphs)."
    import warnings
    from videolights.config import get_preset
    from videolights.synth import synth
    from videolights.runs import build_run
    synth(tmp_path/'d', seed=0, size='tiny', progress=False)
    _, m, _, _, ev = build_run(get_preset('tiny', max_v_l=75), tmp_path/'d', train=False, verbose=False)
    a = ev.predict(m, torch.device('cpu'), progress=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        b = ev.predict(m, torch.device('cpu'), progress=False, cuda_graphs=True)
    assert any('no CUDA device' in str(x.message) for x in w) and ev.graphed is None
    assert a == b
    from videolights.accel import GraphedInference
    cuda = torch.device('cuda')  # the choice of forward only; nothing runs on it here
    g1, g2 = ev._forward(m, cuda, None, True), ev._forward(m, cuda, None, True)
    assert isinstance(g1, GraphedInference) and g1 is g2 and g1.model is m  # graphs kept across evaluations
    assert ev._forward(m, cuda, torch.bfloat16, True) is not g1               # another dtype: new graphs
    assert ev._forward(m, cuda, None, False) is m


def test_cuda_graphs_option_wraps_the_training_forward_only_where_it_can(recwarn):
    "`RunOptions(cuda_graphs=True)` on CUDA: `GraphedTraining` around the model, unless DDP, compile or grad_accum > 1."
    from videolights.config import get_preset
    from videolights.model import build_model
    from videolights.accel import GraphedTraining
    from videolights.train import DistInfo, _unwrap, _wrap
    m, cuda = build_model(get_preset('tiny')), torch.device('cuda')  # nothing runs on the device here
    net = _wrap(m, RunOptions(cuda_graphs=True), DistInfo(), cuda)
    assert isinstance(net, GraphedTraining) and _unwrap(net) is m and not recwarn.list
    assert _wrap(m, RunOptions(cuda_graphs=True), DistInfo(), torch.device('cpu')) is m
    assert _wrap(m, RunOptions(), DistInfo(), cuda) is m
    assert _wrap(m, RunOptions(cuda_graphs=True, grad_accum=2), DistInfo(), cuda) is m
    assert 'grad_accum > 1' in str(recwarn.pop(UserWarning).message)


@pytest.mark.parametrize('accelerate', [True, False])
def test_fit_accelerates_the_model_unless_asked_not_to(tmp_path, monkeypatch, accelerate):
    "`fit` swaps in the fast layers of `ops` (`RunOptions.accelerate`, on by default) and leaves other models alone."
    import videolights.train as T
    from videolights import ops
    seen = []
    monkeypatch.setattr(T, 'accelerate', lambda m: seen.append(type(m).__name__) or ops.accelerate(m))
    set_seed(0)
    m = ToyModel()
    fit(m, ToyCriterion(), ToyData(), toy_cfg(n_epoch=1), tmp_path/'a',
        RunOptions(device='cpu', progress=False, tensorboard=False, accelerate=accelerate), toy_collate)
    assert seen == (['ToyModel'] if accelerate else [])
    assert type(m.drop) is nn.Dropout  # not a VideoLights: untouched


def test_evaluator_on_the_cpu_starts_no_workers_beyond_the_free_cores(monkeypatch):
    "CPU evaluation caps its DataLoader workers to the cores torch's threads leave free; the predictions stay the same."
    import videolights.train as T
    from videolights.data import usable_cores
    seen, real = [], T.DataLoader
    monkeypatch.setattr(T, 'DataLoader', lambda *a, **k: seen.append(k['num_workers']) or real(*a, **k))
    val = ToyData(n=16, seed=1, random_labels=False)
    set_seed(0)
    m = ToyModel()
    ev = Evaluator(val, toy_cfg(), toy_collate, toy_metrics, gt=[val[i]['meta'] for i in range(len(val))],
                   num_workers=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(usable_cores())
        busy = ev.predict(m, torch.device('cpu'))
        torch.set_num_threads(1)
        free = ev.predict(m, torch.device('cpu'))
    finally: torch.set_num_threads(threads)
    assert seen == [0, min(2, usable_cores() - 1)]
    assert busy == free and len(busy) == 16
