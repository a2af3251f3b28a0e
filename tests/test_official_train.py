"""The official `train.py` loop and ours side by side (tools/check_official_train.py).

Runs only where the official checkout and its environment exist ($VIDEOLIGHTS_OFFICIAL, $VIDEOLIGHTS_OFFICIAL_PY;
made by tools/official/setup.sh); the whole-run comparisons are slow (minutes each). The probe's own pieces (batch
order, recorder) are tested without the official code.
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'official'))
sys.path.insert(0, str(ROOT / 'tools'))
import official_harness  # noqa: E402
import train_probe as P  # noqa: E402

MISSING = official_harness.missing(need_python=True)
needs_official = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def test_probe_order_is_our_sampler_order():
    from videolights.train import EpochSampler
    s, o = EpochSampler(13, seed=7), P.OrderSampler(13, 7)
    for e in range(3):
        s.set_epoch(e)
        assert list(iter(o)) == list(iter(s))
    assert sorted(P.epoch_order(13, 7, 5)) == list(range(13))


def test_recorder_sees_losses_norms_lr_and_epoch_params():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)

    class Crit(torch.nn.Module):
        weight_dict = {'loss_a': 2.0}
        def forward(self, out, tgt, epoch):
            return {'loss_a': out.pow(2).mean(), 'class_error': torch.tensor(50.)}

    crit, opt = Crit(), torch.optim.AdamW(model.parameters(), lr=0.1)
    rec = P.Recorder(snapshot_epochs=(0,))
    rec.model = model
    rec.watch_criterion(crit)
    with rec.active():
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        for e in range(2):
            x = torch.randn(4, 3)
            ld = crit(model(x), None, e)
            loss = ld['loss_a'] * 2.0
            opt.zero_grad()
            loss.backward()
            pre = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            opt.step()
            sched.step()
            assert rec.steps[-1]['total'] == pytest.approx(float(loss.detach())) and rec.steps[-1]['epoch'] == e
            assert rec.steps[-1]['gnorm_pre'] == pytest.approx(pre, rel=1e-6)
            assert rec.steps[-1]['gnorm_post'] == pytest.approx(min(pre, 0.01), rel=1e-4)
    assert [s['lr'] for s in rec.steps] == [0.1, 0.05]
    assert list(rec.params) == [0] and set(rec.params[0]) == {'weight', 'bias'}
    assert torch.nn.utils.clip_grad_norm_ is not None and len(rec._handles) == 0   # hooks removed after the block


def test_no_dropout_zeroes_every_probability():
    m = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.MultiheadAttention(8, 2, dropout=0.2))
    P.no_dropout(m)
    assert m[0].p == 0. and m[1].dropout == 0.


@pytest.mark.slow
@needs_official
@pytest.mark.parametrize('recipe', ['qvh', 'pretrain', 'charades', 'tvsum', 'zero'])
def test_training_loop_matches_official(recipe, tmp_path):
    import check_official_train as C
    rc = C.main(['--recipes', recipe, '--precisions', 'float64', '--json', str(tmp_path / 'r.json'),
                 '--workdir', str(tmp_path / 'w')])
    import json
    runs = json.loads((tmp_path / 'r.json').read_text())
    for r in runs:
        s, e = r['steps'], r['evals']
        assert s['n_ours'] == s['n_official'] > 0 and s['lr'] <= 1e-12
        assert s['first']['total'] <= 1e-6 and s['first']['losses'] <= 1e-6
        assert e['epochs_ours'] == e['epochs_official'] and e['best_ours'] == e['best_official']
        assert e['es_ours'] == e['es_official'] and e['last_epoch_ours'] == e['last_epoch_official']
        assert r['best_written']['ours'] == r['best_written']['official'] == (recipe != 'zero')
    if recipe == 'zero':   # every evaluation scored 0: no best checkpoint, each evaluation counted, stop at the second
        assert runs[0]['scores']['official'] == runs[0]['scores']['ours'] == [0., 0.]
        assert runs[0]['evals']['es_official'] == [1, 2]
    assert rc == 0, [r['problems'] for r in runs]
