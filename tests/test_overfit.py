"""Overfitting one small batch with the real model and the real criterion: the total loss must drop by >= 90 %.

A model that cannot memorise three samples has a broken gradient path somewhere (a detached head, a loss that
ignores its input, a sign error in a term). The batch is hand-built in the real batch format (padded clips and
tokens, official target keys), the model is the `tiny` preset with every dropout at 0 so that the loss is a
deterministic function of the weights.
"""
import time

import pytest
import torch

from videolights.config import VLConfig, get_preset
from videolights.loss import build_criterion, total_loss
from videolights.model import build_model

torch.set_num_threads(1)


def real_batch(cfg, seed=0):
    "Three samples of 12/9/7 clips and 6/4/5 tokens: model inputs and criterion targets in the documented format."
    g = torch.Generator().manual_seed(seed)
    B, Lv, Lq = 3, 12, 6
    vmask = torch.stack([(torch.arange(Lv) < n).float() for n in (12, 9, 7)])
    tmask = torch.stack([(torch.arange(Lq) < n).float() for n in (6, 4, 5)])
    inputs = dict(src_txt=torch.randn(B, Lq, cfg.t_feat_dim, generator=g) * tmask[..., None], src_txt_mask=tmask,
                  src_vid=torch.randn(B, Lv, cfg.v_feat_dim, generator=g) * vmask[..., None], src_vid_mask=vmask)
    labels = torch.zeros(B, Lv)
    labels[0, 2:5] = torch.tensor([4., 12., 8.])
    labels[1, 0:2] = 3.
    labels[2, 5:7] = 6.
    targets = dict(span_labels=[dict(spans=torch.tensor([[0.29, 0.25]])), dict(spans=torch.tensor([[0.11, 0.22]])),
                                dict(spans=torch.tensor([[0.86, 0.29]]))],
                   saliency_pos_labels=torch.tensor([[3, 2], [0, 1], [5, 6]]),
                   saliency_neg_labels=torch.tensor([[0, 8], [5, 3], [0, 1]]),
                   saliency_all_labels=labels, saliency_pos_index=(labels > 0).float(), src_txt_mask=tmask)
    return inputs, targets


def overfit(cfg, steps=100, seed=0, lr=1e-3):
    "Train on one batch (AdamW, clip 0.1, epoch 0 throughout); return the total loss of every step."
    torch.manual_seed(seed)
    model, crit = build_model(cfg).train(), build_criterion(cfg)
    inputs, targets = real_batch(cfg, seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    hist = []
    for _ in range(steps):
        loss = total_loss(crit(model(**inputs), targets, epoch=0), crit.weight_dict)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        hist.append(loss.item())
    return hist


NO_DROPOUT = dict(dropout=0., input_dropout=0., fra_dropout=0.)


@pytest.mark.parametrize('fixed', [False, True])
def test_overfit_one_batch(fixed):
    "Official computation and all fixes on: 100 steps cut the total loss by >= 90 % (measured ~95-96 %)."
    cfg = get_preset('tiny', **NO_DROPOUT, **({k: True for k in VLConfig().fixes} if fixed else {}))
    t0 = time.perf_counter()
    hist = overfit(cfg)
    assert all(torch.isfinite(torch.tensor(hist)))
    first, last = hist[0], hist[-1]
    assert last <= 0.1 * first, f"loss {first:.3f} -> {last:.3f} ({1 - last / first:.1%} drop, need >= 90%)"
    assert time.perf_counter() - t0 < 60  # ~3-7 s on one busy CPU thread


def test_overfit_needs_the_gradient():
    "The drop comes from learning: with lr=0 the loss stays put (so the >= 90 % assertion can fail)."
    hist = overfit(get_preset('tiny', **NO_DROPOUT), steps=5, lr=0.)
    assert max(hist) - min(hist) < 1e-5 * abs(hist[0])
