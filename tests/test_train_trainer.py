"""Trainer: atomic checkpoints, exact resume, activation checkpointing, loss schedule, memory chooser."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch

from ahnet_fast.data import AugmentConfig, Case, IntensityConfig, PatchDataset
from ahnet_fast.reference import AHNet
from ahnet_fast.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from ahnet_fast.train.memory import choose_config, estimate_step_bytes, measure_step_bytes
from ahnet_fast.train.models import FrozenBNTrainMode, enable_activation_checkpointing, freeze_encoder
from ahnet_fast.train.trainer import LossSchedule, TrainConfig, Trainer, ValidationCase

CFG = {"layers": (1, 1, 1, 1), "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "psp_block_num": 0,
       "upsample_mode": "trilinear"}


def _cases(n=2, shape=(40, 40, 32), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.random(shape, dtype=np.float32)
        lab = np.zeros(shape, np.uint8)
        lab[8:20, 8:24, 4:20] = 1
        lab[24:34, 20:30, 10:28] = 2
        img += lab * 0.5
        out.append(Case(img, lab, (1.0, 1.0, 4.0), f"c{i}", f"c{i}.nii.gz", f"l{i}.nii.gz"))
    return out


class TinyNet(torch.nn.Sequential):
    """A small conv net with BatchNorm: the trainer is model-agnostic, and checkpoints stay small."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.BatchNorm3d(8), torch.nn.ReLU(),
                         torch.nn.Conv3d(8, 3, 1))


def _trainer(out, steps=4, spe=2, stop=None, model_seed=0, tiny=False, **kw):
    torch.manual_seed(model_seed)
    model = TinyNet() if tiny else AHNet(**CFG)
    ds = PatchDataset([], 3, IntensityConfig("none"), (32, 32, 32), fg_ratio=0.7, augment=AugmentConfig(),
                      seed=5, cases=_cases())
    cfg = TrainConfig(steps=steps, steps_per_epoch=spe, batch_size=2, lr=1e-3, device="cpu", seed=3, **kw)
    vc = _cases(1, shape=(32, 32, 32), seed=9)[0]
    return Trainer(model, {} if tiny else CFG, ds, cfg, out, 3, [ValidationCase(vc.image, vc.label)], stage="t",
                   progress=False, log=lambda m: None)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "last.pt"
    save_checkpoint(p, {"model": {"w": torch.ones(3)}, "step": 1})
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(p, {"model": {"w": torch.zeros(3)}, "step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    ck = load_checkpoint(p)
    assert ck["step"] == 1 and torch.equal(ck["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary left behind
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")


def test_rng_capture_restore_roundtrip():
    import random

    st = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(st)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_resume_is_exact(tmp_path):
    """4 steps in one go == 2 steps, 'kill', resume for 2 more: identical weights and optimizer."""
    full = _trainer(tmp_path / "full", tiny=True, loss="ce_then_focal", plateau_patience=1, plateau_min_delta=10.0,
                    lr_schedule="cosine")
    res_full = full.fit()
    part = _trainer(tmp_path / "part", tiny=True, loss="ce_then_focal", plateau_patience=1, plateau_min_delta=10.0,
                    lr_schedule="cosine")
    r1 = part.fit(stop_at_step=2)
    assert r1["steps"] == 2 and not r1["finished"]
    # a fresh process: new model with other init, new trainer, resume from last.pt
    again = _trainer(tmp_path / "part", model_seed=123, tiny=True, loss="ce_then_focal", plateau_patience=1,
                     plateau_min_delta=10.0, lr_schedule="cosine")
    r2 = again.fit(resume=True)
    assert r2["steps"] == 4 and r2["finished"] and res_full["finished"]
    # min_delta=10 forces the switch to focal loss after epoch 1: the schedule must survive the resume
    assert full.schedule.current == again.schedule.current == "focal"
    sa, sb = full.model.state_dict(), again.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = full.optimizer.state_dict()["state"], again.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    assert full.history == again.history
    ck = load_checkpoint(tmp_path / "part" / "last.pt")
    assert ck["model_config"] == {} and ck["step"] == 4 and (tmp_path / "part" / "best.pt").is_file()
    lines = (tmp_path / "part" / "log.jsonl").read_text().splitlines()
    assert sum('"event": "epoch"' in ln for ln in lines) == 2 and any("resume" in ln for ln in lines)


def test_activation_checkpointing_matches_plain():
    torch.manual_seed(0)
    a = AHNet(**CFG)
    b = AHNet(**CFG)
    b.load_state_dict(a.state_dict())
    names = enable_activation_checkpointing(b)
    assert "layer1.0" in names and "dense0" in names
    x = torch.randn(2, 1, 32, 32, 32)
    for m in (a, b):
        m.train()
        m(x).square().mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    # BatchNorm statistics updated exactly once per step, as without checkpointing
    for (n, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(t, u, rtol=1e-5, atol=1e-6, msg=n)
    assert list(a.state_dict()) == list(b.state_dict())


def test_frozen_encoder_stays_fixed(tmp_path):
    tr = _trainer(tmp_path, steps=2, spe=2)
    frozen = freeze_encoder(tr.model)
    tr.train_mode = FrozenBNTrainMode()
    tr.optimizer = torch.optim.Adam([p for p in tr.model.parameters() if p.requires_grad], lr=1e-3)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.fit()
    after = tr.model.state_dict()
    assert "conv1.weight" in frozen and "layer4.0.conv3.weight" in frozen
    for k in before:
        same = torch.equal(before[k], after[k])
        if k.startswith(("conv1.", "bn0.", "layer")):
            assert same, f"encoder tensor {k} changed"
    assert not torch.equal(before["final.conv.weight"], after["final.conv.weight"])  # the decoder did train


def test_lr_schedules():
    c = TrainConfig(steps=4, steps_per_epoch=2, batch_size=1, lr=1e-3, lr_schedule="cosine")
    assert [round(c.lr_at(s), 8) for s in range(5)] == [1e-3, 0.00085355, 0.0005, 0.00014645, 0.0]
    assert TrainConfig(steps=4, steps_per_epoch=2, batch_size=1, lr=1e-3).lr_at(3) == 1e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(steps=4, steps_per_epoch=2, batch_size=1, lr_schedule="step")


def test_loss_schedule_switches_on_plateau():
    s = LossSchedule("ce_then_focal", patience=2, min_delta=0.05)
    assert s.current == "ce"
    assert not s.end_epoch(1.0, 10) and not s.end_epoch(0.8, 20)  # improving
    assert not s.end_epoch(0.79, 30)  # < 5 % better: 1 bad epoch
    assert s.end_epoch(0.78, 40) and s.current == "focal" and s.switched_at == 40
    t = LossSchedule("ce_then_focal", 2, 0.05)
    t.load_state_dict(s.state_dict())
    assert t.current == "focal"
    assert LossSchedule("ce", 1, 0.0).end_epoch(5.0, 1) is False


def test_dice_ce_loss_trains_and_never_switches(tmp_path):
    """loss="dice_ce": cross-entropy + soft Dice from the first step to the last (no plateau
    switch), logged under its own name; an unknown loss names the accepted ones."""
    s = LossSchedule("dice_ce", patience=1, min_delta=0.5)
    assert s.current == "dice_ce" and not s.end_epoch(1.0, 1) and not s.end_epoch(1.0, 2) and s.current == "dice_ce"
    tr = _trainer(tmp_path, steps=2, spe=1, tiny=True, loss="dice_ce")
    res = tr.fit()
    assert res["finished"] and all(math.isfinite(h["loss"]) for h in res["history"])
    epochs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {e["loss_fn"] for e in epochs if e.get("event") == "epoch"} == {"dice_ce"}
    with pytest.raises(ValueError, match="loss must be one of ce_then_focal, ce, focal, dice_ce"):
        TrainConfig(steps=1, steps_per_epoch=1, batch_size=1, loss="dice")


def test_memory_chooser_respects_limit_and_prefers_big():
    f = lambda: AHNet(**CFG)  # noqa: E731
    small = estimate_step_bytes(f, (2, 1, 32, 32, 32), False)
    big = estimate_step_bytes(f, (2, 1, 64, 64, 32), False)
    big_ck = estimate_step_bytes(f, (2, 1, 64, 64, 32), True)
    big_bf = estimate_step_bytes(f, (2, 1, 64, 64, 32), False, amp="bf16")
    assert small < big and big_ck < big and big_bf < big
    patches = [(64, 64, 32), (32, 32, 32)]
    roomy = choose_config(100.0, f, 1, 3, patches, (2, 1))
    assert roomy.patch_size == (64, 64, 32) and roomy.batch_size == 2 and not roomy.checkpointing
    tight = choose_config(big_ck / 2**30 * 1.001, f, 1, 3, patches, (2, 1))
    assert tight.peak_bytes <= tight.limit_bytes
    assert (tight.patch_size, tight.batch_size) == ((64, 64, 32), 2) and tight.checkpointing
    assert "chose patch 64x64x32" in tight.describe()
    with pytest.raises(ValueError, match="no patch/batch/checkpointing configuration fits"):
        choose_config(small / 2**30 / 4, f, 1, 3, patches, (2,))
    # shapes the model refuses (batch 1 at 32^3: BatchNorm sees one value per channel) are skipped,
    # never raised from inside the model
    with pytest.raises(ValueError, match="no patch/batch/checkpointing configuration fits"):
        choose_config(small / 2**30 * 0.9, f, 1, 3, [(32, 32, 32)], (2, 1), allow_checkpointing=False)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_and_measured_memory_on_gpu(tmp_path, amp):
    torch.manual_seed(0)
    model = AHNet(**CFG)
    ds = PatchDataset([], 3, IntensityConfig("none"), (32, 32, 32), seed=5, cases=_cases())
    cfg = TrainConfig(steps=4, steps_per_epoch=2, batch_size=2, lr=1e-3, device="cuda", amp=amp,
                      checkpointing=True, grad_accum=2)
    vc = _cases(1, shape=(32, 32, 32), seed=9)[0]
    tr = Trainer(model, CFG, ds, cfg, tmp_path, 3, [ValidationCase(vc.image, vc.label)], progress=False,
                 log=lambda m: None)
    res = tr.fit()
    assert res["finished"] and all(np.isfinite(h["loss"]) for h in res["history"])
    assert tr.scaler.is_enabled() == (amp == "fp16")
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    f = lambda: AHNet(**CFG)  # noqa: E731
    plain = measure_step_bytes(f, (2, 1, 64, 64, 32), 3, False, amp)
    ck = measure_step_bytes(f, (2, 1, 64, 64, 32), 3, True, amp)
    assert plain is not None and ck is not None and 0 < ck < plain
    choice = choose_config(64.0, f, 1, 3, [(64, 64, 32)], (2,), amp=amp, device="cuda")
    assert choice.method == "measured" and choice.peak_bytes == pytest.approx(plain, rel=0.05)


def _weights(path):
    ck = load_checkpoint(path)
    return ck["step"], ck["best_dice"], ck["model"]


def _same_checkpoint(a, b):
    (sa, da, ma), (sb, db, mb) = _weights(a), _weights(b)
    return sa == sb and da == db and ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_resume_after_a_kill_between_best_and_last_is_exact(tmp_path, monkeypatch):
    """Every epoch improves here; the run dies right after writing best.pt at step 3, before last.pt.
    The resumed run must end with the same best.pt and last.pt as an uninterrupted one."""
    full = _trainer(tmp_path / "full", steps=4, spe=1, tiny=True)
    full.fit()
    part = _trainer(tmp_path / "part", steps=4, spe=1, tiny=True)
    real_save = Trainer.save
    written = []

    def dying_save(self, name="last.pt"):
        if name == "last.pt" and self.step == 3:
            assert written[-1] == ("best.pt", 3)  # best.pt is on disk before last.pt records it
            raise KeyboardInterrupt  # kill -9 between the two writes
        written.append((name, self.step))
        return real_save(self, name)

    monkeypatch.setattr(Trainer, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    monkeypatch.setattr(Trainer, "save", real_save)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["step"] == 2
    again = _trainer(tmp_path / "part", steps=4, spe=1, model_seed=7, tiny=True)
    again.fit(resume=True)
    for name in ("best.pt", "last.pt"):
        assert _same_checkpoint(tmp_path / "full" / name, tmp_path / "part" / name), name
    assert again.best_dice == full.best_dice


def test_resume_rederives_a_best_that_last_recorded(tmp_path):
    """A run written by the old order (last.pt saved before best.pt, killed in between): last.pt
    records the improved Dice, best.pt is older. Resuming re-derives best.pt from last.pt."""
    tr = _trainer(tmp_path, steps=4, spe=1, tiny=True)
    tr.fit(stop_at_step=2)
    old_best = (tmp_path / "best.pt").read_bytes()  # the step-2 best
    _trainer(tmp_path, steps=4, spe=1, tiny=True).fit(resume=True, stop_at_step=3)
    (tmp_path / "best.pt").write_bytes(old_best)
    again = _trainer(tmp_path, steps=4, spe=1, tiny=True)
    again.fit(resume=True, stop_at_step=3)
    assert _same_checkpoint(tmp_path / "best.pt", tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 3
    assert '"event": "best_rederived"' in (tmp_path / "log.jsonl").read_text()
    # a recorded best whose weights were never saved anywhere: said, and the best falls back
    ck = load_checkpoint(tmp_path / "last.pt")
    save_checkpoint(tmp_path / "last.pt", {**ck, "best_dice": 0.99})
    lost = _trainer(tmp_path, steps=4, spe=1, tiny=True)
    logs = []
    lost._log = logs.append
    lost.fit(resume=True, stop_at_step=3)
    assert lost.best_dice == ck["best_dice"] and any("were never saved" in m for m in logs)


def test_resume_refuses_another_model_or_changed_settings(tmp_path):
    run = tmp_path / "tiny"
    _trainer(run, steps=4, spe=2, tiny=True).fit(stop_at_step=2)
    # a checkpoint of another model configuration: a clear refusal, not a raw state_dict error
    other = _trainer(run, steps=4, spe=2, tiny=True)
    other.model_config = {"layers": (2, 1, 1, 1)}
    with pytest.raises(ValueError, match=r"the checkpoint's model differs from this run's \(layers: None "
                                         r"in the checkpoint, \[2, 1, 1, 1\] now\)"):
        other.fit(resume=True)
    # changed seed / learning rate / steps per epoch: refused, naming each change
    for field, value, text in [("seed", 4, "seed 3 -> 4"), ("lr", 2e-3, "lr 0.001 -> 0.002"),
                               ("steps_per_epoch", 1, "steps_per_epoch 2 -> 1")]:
        tr = _trainer(run, steps=4, spe=2, tiny=True)
        setattr(tr.cfg, field, value)
        with pytest.raises(ValueError, match=re.escape(f"cannot resume with changed settings ({text})")):
            tr.fit(resume=True)
    # ... unless overridden explicitly: then it runs and the log says so
    tr = _trainer(run, steps=4, spe=2, tiny=True)
    tr.cfg.lr = 2e-3
    tr.overrides = {"lr"}
    assert tr.fit(resume=True)["steps"] == 4
    assert '"event": "override"' in (run / "log.jsonl").read_text()
    assert load_checkpoint(run / "last.pt")["train_config"]["lr"] == 2e-3


def test_train_checkpoints_never_unpickle_code(tmp_path, capsys):
    """A last.pt with code in its pickle is refused by the trainer's loader; nothing runs."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "last.pt", "wb") as fh:
        torch.save({"model": {}, "x": Evil()}, fh, pickle_module=pickle)
    with pytest.raises(ValueError, match="last.pt: cannot read the checkpoint"):
        load_checkpoint(tmp_path / "last.pt")
    assert "pwned" not in capsys.readouterr().out


def test_checkpoints_tell_segment_the_window_and_mirroring(tmp_path, monkeypatch):
    """A 3D stage's checkpoints record the training patch and augmentation, which `segment` turns
    into its default window and test-time mirroring; validation runs on windows of that patch."""
    import ahnet_fast.infer.sliding_window as sw
    from ahnet_fast.infer.segment import SegmentOptions

    seen = []
    real = sw.sliding_window_inference

    def spy(*a, **kw):
        seen.append(tuple(kw["window"]))
        return real(*a, **kw)

    monkeypatch.setattr(sw, "sliding_window_inference", spy)
    _trainer(tmp_path, steps=1, spe=1, tiny=True).fit()
    assert seen and set(seen) == {(32, 32, 32)}
    for name in ("best.pt", "last.pt"):
        ck = load_checkpoint(tmp_path / name)
        assert ck["patch_size"] == [32, 32, 32]
        assert ck["augment"]["flip_axes"] == [0, 1] and ck["augment"]["enabled"] is True
        opts = SegmentOptions.from_checkpoint(ck)
        assert tuple(opts.window) == (32, 32, 32) and tuple(opts.mirror_axes) == (0, 1)


def test_weight_average_is_what_is_validated_saved_and_resumed(tmp_path):
    """``ema``: the average follows the documented recurrence, validation and every checkpoint's
    ``model`` hold it, the trained weights ride in last.pt for a resume, and a resume is exact."""
    decay = 0.9
    tr = _trainer(tmp_path / "a", steps=4, spe=2, tiny=True, loss="dice_ce", ema=decay)
    start = {k: v.clone() for k, v in tr.model.state_dict().items()}
    seen = []  # the weights each optimizer step leaves, to recompute the average by hand
    real_step = tr.scaler.step

    def step(opt):
        out = real_step(opt)
        seen.append({k: v.detach().clone() for k, v in tr.model.state_dict().items()})
        return out

    tr.scaler.step = step
    validated = []
    real_validate_predict = tr.predict

    def predict(model, image):
        validated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_validate_predict(model, image)

    tr.predict = predict
    tr.fit()
    expected = {k: v.clone() for k, v in start.items()}
    for n, w in enumerate(seen, start=1):
        d = min(decay, (1 + n) / (10 + n))
        for k, v in w.items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    assert len(seen) == 4
    last = load_checkpoint(tmp_path / "a" / "last.pt")  # a finished stage: weights only, the average
    assert "train_model" not in last
    for k, v in expected.items():
        torch.testing.assert_close(last["model"][k], v, rtol=1e-6, atol=1e-7)
    trained = tr.model.state_dict()  # the model itself keeps the trained weights
    assert any(not torch.allclose(trained[k], expected[k]) for k in expected if expected[k].is_floating_point())
    # the last epoch's validation ran on the average, and the model got its trained weights back afterwards
    for k, v in expected.items():
        torch.testing.assert_close(validated[-1][k], v, rtol=1e-6, atol=1e-7)
    for k, v in seen[-1].items():
        assert torch.equal(trained[k], v), k
    best = load_checkpoint(tmp_path / "a" / "best.pt")
    assert best["train_config"]["ema"] == decay and "train_model" not in best

    # killed after 2 steps: last.pt holds both; a fresh process resumes to the same average and weights
    part = _trainer(tmp_path / "b", steps=4, spe=2, tiny=True, loss="dice_ce", ema=decay)
    part.fit(stop_at_step=2)
    mid = load_checkpoint(tmp_path / "b" / "last.pt")
    assert set(mid["train_model"]) == set(mid["model"])
    assert any(not torch.equal(mid["train_model"][k], mid["model"][k]) for k in mid["model"]
               if mid["model"][k].is_floating_point())
    again = _trainer(tmp_path / "b", steps=4, spe=2, tiny=True, loss="dice_ce", ema=decay, model_seed=7)
    again.fit(resume=True)
    fin = load_checkpoint(tmp_path / "b" / "last.pt")
    for k in last["model"]:
        assert torch.equal(fin["model"][k], last["model"][k]), k
        assert torch.equal(again.model.state_dict()[k], trained[k]), k


def test_weight_average_decay_is_checked():
    with pytest.raises(ValueError, match=r"ema .* must be in \[0, 1\)"):
        TrainConfig(steps=1, steps_per_epoch=1, batch_size=1, ema=1.0)
