"""Record what a training loop does, step by step, without editing it: the probe of tools/check_official_train.py.

The same `Recorder` watches the official `train.py` loop (in the official environment, `python train_probe.py
CONFIG.json`) and ours (`videolights.train.fit`, imported by the check): a forward hook on the criterion gives every
unweighted loss and the weighted total, a wrapper of `torch.nn.utils.clip_grad_norm_` the gradient norm before and
after clipping, an optimiser pre-step hook the learning rate of the step, and a wrapper of `StepLR.step` the parameters
at the end of chosen epochs. Only torch is needed here, so the official environment can import it.

Run as a script, it trains the official loop (`video_lights.train.start_training`, its own option parser, dataset,
`setup_model`, `train`/`train_hl`, `eval_epoch`) with these run-time changes, none of which edits an official file:

* the training DataLoader draws its batches in the order of `videolights.train.EpochSampler` (permutation of
  torch.Generator().manual_seed(seed + epoch)), the order our loop uses;
* the k-th training item the dataset builds seeds Python's `random` with `item_seed + k` first (the official
  dataset draws its random saliency pairs and window subsets from `random`; ours seeds its own `rng` the same way);
* with `float64`, the default dtype is float64 for the model, every batch is cast to it and the official GIoU runs in
  float64 (it casts to float32; `_giou_in_input_dtype`); the dataset builds its items in float32 as in an official
  run (`_items_in_float32`);
* with `dropout_off`, every dropout probability of the built model is set to 0 (FRA's 0.1 is hard-coded);
* `setup_model` saves the initial weights (`init.pt`) that ours starts from;
* `eval_epoch`, `calculate_stop_score` and `torch.save` are wrapped to record the metrics, the selection score and
  the checkpoints written.
With `mode: infer` it runs the official `inference.start_inference` on given checkpoints instead and records the
metrics of each.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from pathlib import Path

import torch


def _norm(ts) -> float:
    "Total 2-norm of the gradients of `ts` (float64 accumulation)."
    gs = [p.grad.detach().double().flatten() for p in ts if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(gs))) if gs else 0.


def _float_losses(d: dict) -> dict:
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in d.items()}


class Recorder:
    "Per-step records (`steps`), evaluations (`evals`), checkpoints written (`saves`), parameter snapshots (`params`)."

    def __init__(self, snapshot_epochs=()):
        self.steps, self.evals, self.saves, self.params = [], [], [], {}
        self.snapshot_epochs, self.model, self._cur, self._handles = set(snapshot_epochs), None, None, []

    # --- hooks -----------------------------------------------------------------------------------------------
    def watch_criterion(self, criterion):
        "Record the loss dict of every training call of `criterion(outputs, targets, epoch)`."
        def hook(m, args, kwargs, out):
            if not m.training: return
            ep = args[2] if len(args) > 2 else kwargs.get('epoch_i', kwargs.get('epoch'))
            wd = m.weight_dict
            total = sum(out[k] * wd[k] for k in out.keys() if k in wd)   # the loops' own expression
            self._cur = dict(epoch=int(ep), losses=_float_losses(out), total=float(total.detach()))
        self._handles.append(criterion.register_forward_hook(hook, with_kwargs=True))

    def _clip(self, real):
        def clip(parameters, max_norm, *a, **k):
            ps = [parameters] if torch.is_tensor(parameters) else list(parameters)
            n = real(ps, max_norm, *a, **k)
            if self._cur is not None: self._cur.update(gnorm_pre=float(n), gnorm_post=_norm(ps))
            return n
        return clip

    def _pre_step(self, opt, args, kwargs):
        if self._cur is None: return
        ps = [p for g in opt.param_groups for p in g['params']]
        if 'gnorm_pre' not in self._cur:
            n = _norm(ps)
            self._cur.update(gnorm_pre=n, gnorm_post=n)   # no clipping in this loop
        self._cur['lr'] = float(opt.param_groups[0]['lr'])
        self.steps.append(self._cur)
        self._cur = None

    def _sched(self, real):
        rec = self
        def step(sched, *a, **k):
            ready = getattr(sched, '_probe_ready', False) and rec.model is not None
            if ready and sched.last_epoch in rec.snapshot_epochs:
                rec.params[int(sched.last_epoch)] = {n: v.detach().double().clone()
                                                    for n, v in rec.model.state_dict().items()}
            return real(sched, *a, **k)
        return step

    @contextlib.contextmanager
    def active(self):
        "Inside this block: clipping, optimiser steps and StepLR steps are recorded."
        from torch.optim import lr_scheduler
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        real_clip = torch.nn.utils.clip_grad_norm_
        real_step, real_init = lr_scheduler.StepLR.step, lr_scheduler.StepLR.__init__
        def init(sched, *a, **k):
            real_init(sched, *a, **k)
            sched._probe_ready = True
        torch.nn.utils.clip_grad_norm_ = self._clip(real_clip)
        lr_scheduler.StepLR.step, lr_scheduler.StepLR.__init__ = self._sched(real_step), init
        h = register_optimizer_step_pre_hook(self._pre_step)
        try: yield self
        finally:
            torch.nn.utils.clip_grad_norm_ = real_clip
            lr_scheduler.StepLR.step, lr_scheduler.StepLR.__init__ = real_step, real_init
            h.remove()
            for x in self._handles: x.remove()
            self._handles = []

    def dump(self, out_dir: Path, **extra):
        out_dir = Path(out_dir)
        (out_dir / 'record.json').write_text(json.dumps(dict(steps=self.steps, evals=self.evals, saves=self.saves,
                                                             **extra)))
        torch.save(self.params, out_dir / 'params.pt')


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    "The batch order of `videolights.train.EpochSampler(n, seed)` in `epoch` (one process, shuffled)."
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


class OrderSampler(torch.utils.data.Sampler):
    "Yields `epoch_order(n, seed, e)` for e = first, first + 1, ... at successive iterations."
    def __init__(self, n: int, seed: int, first: int = 0):
        self.n, self.seed, self.epoch = n, seed, first
    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)
        self.epoch += 1
        return iter(order)
    def __len__(self): return self.n


def to_dtype(x, dtype):
    """Floating tensors in `x` (nested dicts/lists) cast to `dtype`, except the padding masks (`*_mask`): the official
    collate makes them float32 and the official model takes their dtype as it comes (FRA's `(video_mask +
    1e-45).log()` is -103.28 in float32, -103.62 in float64, the value it gives padded clips); ours makes float32
    masks itself. A float64 run widens the features and targets only."""
    if torch.is_tensor(x): return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, dict): return {k: v if k.endswith('_mask') else to_dtype(v, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)): return type(x)(to_dtype(v, dtype) for v in x)
    return x


def no_dropout(model):
    "Set every dropout probability of `model` to 0 (nn.Dropout modules and attention modules' `dropout` floats)."
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd): m.p = 0.
        elif isinstance(getattr(m, 'dropout', None), float): m.dropout = 0.
    return model


# ---------------------------------------------------------------------------------------------------------------
# the official side (run in the official environment)
# ---------------------------------------------------------------------------------------------------------------
def _no_pandas(off):
    "The options table printed at start-up needs pandas (not in a CPU environment): a plain listing instead."
    md = lambda d, max_str_len=None: '\n'.join(f'{k}: {v}' for k, v in d.items())
    for m in (off.config, off.train, off.basic_utils):
        if hasattr(m, 'dict_to_markdown'): m.dict_to_markdown = md


def _giou_in_input_dtype(off):
    """Float64 runs only: the official GIoU (loss and matcher) in the dtype of its inputs. It casts to float32
    (video_lights/span_utils.py, `generalized_temporal_iou`), an island that float64 parity cannot pass through;
    ours computes it in the input dtype. The same formula, only the cast left out."""
    su = off.span_utils
    def giou(spans1, spans2):
        iou, union = su.temporal_iou(spans1, spans2)
        left = torch.min(spans1[:, None, 0], spans2[:, 0])
        right = torch.max(spans1[:, None, 1], spans2[:, 1])
        hull = (right - left).clamp(min=0)
        return iou - (hull - union) / hull
    for m in (su, off.model, off.matcher): m.generalized_temporal_iou = giou


def _items_in_float32(D):
    """The dataset builds its items under the default dtype float32, as in an official run: `torch.Tensor(windows)`
    and `torch.arange(0, ctx_l, 1.0)` (span labels, TEF; video_lights/start_end_dataset.py) follow the default
    dtype, which a float64 probe run sets to float64 for the model. The batch is cast afterwards
    (`prepare_batch_inputs`), so both loops see float32 data widened to float64. Returns the original
    `__getitem__`."""
    real = D.StartEndDataset.__getitem__
    def getitem(self, index):
        dt = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try: return real(self, index)
        finally: torch.set_default_dtype(dt)
    D.StartEndDataset.__getitem__ = getitem
    return getitem


def _official_train(cfg: dict, H, out: Path):
    dtype = torch.float64 if cfg['float64'] else torch.float32
    torch.set_default_dtype(dtype)
    off = H.load(cfg['official'], extra=('video_lights.train', 'video_lights.inference'))
    T, I, D = off.train, off.inference, off.dataset
    _no_pandas(off)
    if cfg['float64']: _giou_in_input_dtype(off)
    rec = Recorder(cfg['snapshot_epochs'])
    train_path = cfg['train_path']

    real_loader = T.DataLoader
    def loader(ds, *a, shuffle=False, **k):
        if not shuffle: return real_loader(ds, *a, **k)
        return real_loader(ds, *a, sampler=OrderSampler(len(ds), cfg['order_seed'], cfg.get('first_epoch', 0)), **k)
    T.DataLoader = loader

    real_get, count = _items_in_float32(D), [0]
    def getitem(self, index):
        if self.data_path == train_path:
            random.seed(cfg['item_seed'] + count[0])
            count[0] += 1
        return real_get(self, index)
    D.StartEndDataset.__getitem__ = getitem

    real_prep = D.prepare_batch_inputs
    def prep(*a, **k):
        mi, tg = real_prep(*a, **k)
        return to_dtype(mi, dtype), to_dtype(tg, dtype)
    T.prepare_batch_inputs = I.prepare_batch_inputs = prep

    real_setup = T.setup_model
    def setup(opt):
        model, criterion, optimizer, sched = real_setup(opt)
        if opt.device.type == 'cpu': H.on_cpu(model)
        if cfg['dropout_off']: no_dropout(model)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / 'init.pt')
        rec.model = model
        rec.watch_criterion(criterion)
        return model, criterion, optimizer, sched
    T.setup_model = setup

    real_eval, real_score = T.eval_epoch, T.calculate_stop_score
    def eval_epoch(model, ds, opt, fname, epoch_i=None, *a, **k):
        res = real_eval(model, ds, opt, fname, epoch_i, *a, **k)
        brief = res[0]['brief']
        rec.evals.append(dict(epoch=epoch_i, brief={kk: float(v) for kk, v in brief.items()},
                              score=float(brief['mAP']) if opt.dset_name == 'tvsum' else None))
        return res
    def score(metrics, opts):
        s = real_score(metrics, opts)
        rec.evals[-1]['score'] = float(s)
        return s
    T.eval_epoch, T.calculate_stop_score = eval_epoch, score

    real_save = torch.save
    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and 'model' in obj:
            rec.saves.append(dict(name=os.path.basename(str(f)), epoch=obj.get('epoch'), keys=sorted(obj)))
        return real_save(obj, f, *a, **k)

    sys.argv = ['train.py'] + cfg['flags']
    with rec.active():
        torch.save = save
        try: best, *_ , opt = T.start_training()
        finally: torch.save = real_save
    log = Path(opt.train_log_filepath).read_text()
    stop = [int(line.split('Early Stop at epoch')[1].split()[0]) for line in log.split('\n')
            if 'Early Stop at epoch' in line]
    rec.dump(out, results_dir=opt.results_dir, best_ckpt=best, early_stop_epoch=stop[0] if stop else None)


def _official_infer(cfg: dict, H, out: Path):
    "Official `start_inference` on each checkpoint of cfg['ckpts'] (each beside an opt.json); metrics per checkpoint."
    torch.set_default_dtype(torch.float64 if cfg['float64'] else torch.float32)
    off = H.load(cfg['official'], extra=('video_lights.train', 'video_lights.inference'))
    I = off.inference
    _no_pandas(off)
    if cfg['float64']: _giou_in_input_dtype(off)
    got, real_eval, real_setup = {}, I.eval_epoch, I.setup_model
    def setup(opt):
        m, c, o, s = real_setup(opt)
        if opt.device.type == 'cpu': H.on_cpu(m)
        return m, c, o, s
    def eval_epoch(*a, **k):
        res = real_eval(*a, **k)
        got['brief'] = {kk: float(v) for kk, v in res[0]['brief'].items()}
        return res
    I.setup_model, I.eval_epoch = setup, eval_epoch
    _items_in_float32(off.dataset)
    real_prep = off.dataset.prepare_batch_inputs
    I.prepare_batch_inputs = lambda *a, **k: tuple(to_dtype(x, torch.get_default_dtype()) for x in real_prep(*a, **k))
    res = {}
    for name, ck in cfg['ckpts'].items():
        sys.argv = ['inference.py', '--resume', ck, '--eval_split_name', 'val', '--eval_path', cfg['eval_path'],
                    '--num_workers', '0']
        I.start_inference()
        res[name] = got.pop('brief')
    (out / 'infer.json').write_text(json.dumps(res))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = json.loads(Path(argv[0]).read_text())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import official_harness as H
    out = Path(cfg['out'])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())))
    (_official_infer if cfg.get('mode') == 'infer' else _official_train)(cfg, H, out)


if __name__ == '__main__':
    main()
