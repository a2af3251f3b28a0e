"""DDP on CPU (gloo, 2 processes) follows the same loss trajectory as one process with the same global batch.

The toy criterion averages per-sample losses, so the mean of the ranks' means is the global mean and DDP's gradient
average equals the single-process gradient; dropout is off and the toy labels are deterministic, so the two runs
should agree to float rounding.
"""
import json, os, socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_train import ToyData, toy_run
from videolights.train import RunOptions, load_checkpoint


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, accum):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    opts = RunOptions(device='cpu', progress=False, tensorboard=False, grad_accum=accum)
    toy_run(Path(out), data=ToyData(random_labels=False), p_drop=0., opts=opts, n_epoch=3, eval_every=1)
    dist.barrier()
    dist.destroy_process_group()


def _train_losses(run):
    return [l['loss_overall'] for l in map(json.loads, open(run/'log.jsonl')) if l['kind'] == 'train']


@pytest.mark.parametrize('accum', [1, 2])
def test_ddp_two_processes_match_one_process(tmp_path, accum):
    opts = RunOptions(device='cpu', progress=False, tensorboard=False, grad_accum=accum)
    single = toy_run(tmp_path/'single', data=ToyData(random_labels=False), p_drop=0., opts=opts, n_epoch=3,
                     eval_every=1)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path/'ddp'), accum), nprocs=2, join=True)

    l1, l2 = _train_losses(tmp_path/'single'), _train_losses(tmp_path/'ddp')
    assert len(l1) == len(l2) == 3
    assert l1[-1] < l1[0]                                              # it does learn
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-6)
    w1 = single.state_dict()
    w2 = load_checkpoint(tmp_path/'ddp'/'model_latest.ckpt')['model']
    for k in w1: torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    # evaluation: every val query predicted once, in dataset order, gathered from both ranks; only rank 0 wrote
    sub1 = [json.loads(l) for l in open(tmp_path/'single'/'latest_val_preds.jsonl')]
    sub2 = [json.loads(l) for l in open(tmp_path/'ddp'/'latest_val_preds.jsonl')]
    assert [s['qid'] for s in sub2] == [s['qid'] for s in sub1] == list(range(16))
    ck = load_checkpoint(tmp_path/'ddp'/'model_latest.ckpt')
    assert len(ck['rng']) == 2                                         # every rank's RNG state is saved
    assert json.load(open(tmp_path/'ddp'/'config.json'))['world_size'] == 2


# ---------------------------------------------------------------- span losses normalised over the global batch
import torch.nn.functional as F
from test_train import ToyCriterion, ToyModel, toy_cfg, toy_collate, toy_metrics
from videolights.train import EpochSampler, Evaluator, fit, set_seed


class VarSpanData(ToyData):
    "Every third query has a second window, so the ranks' span counts differ from step to step."
    def __getitem__(self, i):
        d = super().__getitem__(i)
        d['spans'] = torch.stack([d['span'], torch.tensor([0.5, 0.2])]) if i % 3 == 0 else d['span'][None]
        return d


def var_collate(items):
    inputs, targets, metas = toy_collate(items)
    targets['span_labels'] = [dict(spans=x['spans']) for x in items]
    return inputs, targets, metas


class VarSpanCriterion(ToyCriterion):
    "The real criterion's normalisation: span losses are means over the batch's matched spans (query j <-> window j)."
    weight_dict = dict(ToyCriterion.weight_dict, loss_giou_0=1.)

    def forward(self, outputs, targets, epoch=0):
        d = super().forward(outputs, targets, epoch)
        src = torch.cat([outputs['pred_spans'][b, :len(t['spans'])] for b, t in enumerate(targets['span_labels'])])
        tgt = torch.cat([t['spans'] for t in targets['span_labels']])
        d['loss_span'], d['loss_giou_0'] = F.l1_loss(src, tgt), ((src - tgt) ** 2).sum(1).mean()
        return d


def _var_run(out, opts):
    set_seed(0)
    m, cfg, val = ToyModel(p_drop=0.), toy_cfg(n_epoch=3, eval_every=1), VarSpanData(n=16, seed=1, random_labels=False)
    ev = Evaluator(val, cfg, var_collate, toy_metrics, gt=[val[i]['meta'] for i in range(len(val))])
    fit(m, VarSpanCriterion(), VarSpanData(random_labels=False), cfg, out, opts, var_collate, ev)
    return m


def _var_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    _var_run(Path(out), RunOptions(device='cpu', progress=False, tensorboard=False))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_span_losses_use_the_global_span_count(tmp_path):
    # the test means something: in some step the two ranks hold different numbers of spans
    shards = [EpochSampler(48, seed=0, rank=r, world_size=2) for r in range(2)]
    counts = [[sum(2 if i % 3 == 0 else 1 for i in s.rank_indices()[k:k + 4]) for k in range(0, 24, 4)] for s in shards]
    assert counts[0] != counts[1]
    single = _var_run(tmp_path/'single', RunOptions(device='cpu', progress=False, tensorboard=False))
    mp.spawn(_var_worker, args=(2, _free_port(), str(tmp_path/'ddp')), nprocs=2, join=True)
    log = lambda run, k: [l[k] for l in map(json.loads, open(run/'log.jsonl')) if l['kind'] == 'train']
    for k in ('loss_overall', 'loss_span', 'loss_giou_0'):
        torch.testing.assert_close(torch.tensor(log(tmp_path/'ddp', k)), torch.tensor(log(tmp_path/'single', k)),
                                   rtol=1e-5, atol=1e-6)
    w2 = load_checkpoint(tmp_path/'ddp'/'model_latest.ckpt')['model']
    for k, v in single.state_dict().items(): torch.testing.assert_close(w2[k], v, rtol=1e-4, atol=1e-5)
