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
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _worker(rank, world, port, out, accum):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    opts = RunOptions(device='cpu', progress=False, tensorboard=False, grad_accum=accum)
    toy_run(Path(out), data=ToyData(random_labels=False), p_drop=0., opts=opts, n_epoch=3, eval_every=1)
    dist.destroy_process_group()


def _train_losses(run):
    return [l['loss_overall'] for l in map(json.loads, open(run/'log.jsonl')) if l['kind'] == 'train']


@pytest.mark.parametrize('accum', [1, 2])
def test_ddp_two_processes_match_one_process(tmp_path, accum):
    opts = RunOptions(device='cpu', progress=False, tensorboard=False, grad_accum=accum)
    single = toy_run(tmp_path/'single', data=ToyData(random_labels=False), p_drop=0., opts=opts, n_epoch=3, eval_every=1)
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
