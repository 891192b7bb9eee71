"""Budgets: durations, step plans, the trainer's deadline, and a whole recipe under a time budget
on a fake clock (one training step = one second; nothing sleeps)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ahnet_fast.data import AugmentConfig, Case, IntensityConfig, PatchDataset
from ahnet_fast.train.budget import StageCost, format_duration, parse_duration, plan_steps
from ahnet_fast.train.checkpoint import load_checkpoint
from ahnet_fast.train.trainer import TrainConfig, Trainer, ValidationCase


def test_parse_and_format_durations():
    assert parse_duration("20m") == 1200 and parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400 and parse_duration("1200") == 1200 and parse_duration(45) == 45
    for bad in ("20 minutes", "m", "-5m", "0", "1m1m", ""):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    assert format_duration(3725) == "1h02m" and format_duration(750) == "12m30s" and format_duration(45) == "45s"
    assert format_duration(86400 * 3) == "3.0 days" and format_duration(float("nan")) == "unknown"


def test_plan_steps_keeps_the_proportions_and_fits_the_budget():
    base = {"2d": 60, "decoder": 40, "finetune": 500}
    plan = plan_steps(base, steps=120)
    assert sum(plan.values()) == 120 and plan == {"2d": 12, "decoder": 8, "finetune": 100}
    assert plan_steps(base, steps=3) == {"2d": 1, "decoder": 1, "finetune": 1}
    with pytest.raises(ValueError, match="less than 1 step"):
        plan_steps(base, steps=2)
    costs = {"2d": StageCost(4.0, 10.0, 50, 4), "decoder": StageCost(2.0, 3.0, 40, 4),
             "finetune": StageCost(6.0, 3.0, 50, 4)}
    plan = plan_steps(base, costs, seconds=1200.0)
    used = sum(costs[s].seconds(n) for s, n in plan.items())
    assert used <= 1200 and used > 1100  # fills the budget
    assert plan["finetune"] / plan["2d"] == pytest.approx(500 / 60, rel=0.15)
    # more time than the configured schedule needs: scaled up, never down
    big = plan_steps(base, costs, seconds=1e6)
    assert all(big[s] > base[s] for s in base)
    assert StageCost(1.0, 5.0, 50, 4).seconds(8) == 8 + 4 * 5  # at least 4 epochs under a budget
    with pytest.raises(ValueError, match="exactly one budget"):
        plan_steps(base)


class _Clock:
    """Fake seconds: advanced by the network's training forwards, never by waiting."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _TimedNet(torch.nn.Sequential):
    def __init__(self, clock: _Clock, seconds_per_forward: float) -> None:
        super().__init__(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.ReLU(),
                         torch.nn.Conv3d(4, 3, 1))
        self.clock, self.dt = clock, seconds_per_forward

    def forward(self, x):  # type: ignore[override]
        if self.training:
            self.clock.t += self.dt
        return super().forward(x)


def _cases(n=1, shape=(24, 24, 16)):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        lab = np.zeros(shape, np.uint8)
        lab[4:12, 4:14, 2:10] = 1
        lab[14:20, 12:20, 6:14] = 2
        img = rng.random(shape, dtype=np.float32) + lab * 0.5
        out.append(Case(img, lab, (1.0, 1.0, 4.0), f"c{i}", f"c{i}.nii.gz", f"l{i}.nii.gz"))
    return out


def _trainer(out, clock, steps=20, spe=5, **kw):
    torch.manual_seed(0)
    ds = PatchDataset([], 3, IntensityConfig("none"), (16, 16, 16), fg_ratio=0.7, augment=AugmentConfig(),
                      seed=1, cases=_cases())
    cfg = TrainConfig(steps=steps, steps_per_epoch=spe, batch_size=1, device="cpu", seed=2, **kw)
    vc = _cases()[0]
    logs: list[str] = []
    tr = Trainer(_TimedNet(clock, 1.0), {}, ds, cfg, out, 3, [ValidationCase(vc.image, vc.label)], stage="t",
                 progress=False, log=logs.append)
    return tr, logs


def test_trainer_stops_cleanly_at_the_deadline_and_resumes(tmp_path):
    clock = _Clock()
    tr, logs = _trainer(tmp_path, clock)
    res = tr.fit(deadline=7.0, clock=clock)
    # the step that passed the deadline closed its (partial) epoch: validated, logged, saved
    assert res["steps"] == 7 and res["stopped_by_deadline"] and not res["finished"] and res["epochs"] == 2
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["step"] == 7 and "optimizer" in last and "rng" in last  # what a resume needs
    best = load_checkpoint(tmp_path / "best.pt")
    assert "optimizer" not in best and "rng" not in best and "model" in best  # weights and metadata only
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["epoch", "epoch", "deadline"]
    assert events[1]["step"] == 7 and events[2]["planned_steps"] == 20
    assert any("time budget reached: stopped at step 7/20" in m for m in logs)
    # resumed without a deadline it finishes; the finished stage's last.pt keeps weights only
    again, _ = _trainer(tmp_path, clock)
    res = again.fit(resume=True)
    assert res["steps"] == 20 and res["finished"] and not res["stopped_by_deadline"]
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["finished"] and "optimizer" not in last and last["step"] == 20


def test_loss_label_and_a_switch_at_the_last_step(tmp_path):
    clock = _Clock()
    # min_delta 10: every epoch counts as a plateau; patience 1: switch at the first epoch end
    tr, logs = _trainer(tmp_path / "a", clock, steps=4, spe=2, loss="ce_then_focal", plateau_patience=1,
                        plateau_min_delta=10.0)
    tr.fit()
    recs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["event"] == "epoch"]
    # epoch 1 was trained with cross-entropy even though the switch happened at its end
    assert [e["loss_fn"] for e in epochs] == ["ce", "focal"]
    assert [r["step"] for r in recs if r["event"] == "loss_switch"] == [2]
    assert any("epoch 1 step 2/4 loss" in m and "(ce)" in m for m in logs)
    assert any("epoch 2 step 4/4 loss" in m and "(focal)" in m for m in logs)
    # a plateau at the stage's last step: nothing left to train with focal, so no switch is made or claimed
    tr, logs = _trainer(tmp_path / "b", clock, steps=2, spe=2, loss="ce_then_focal", plateau_patience=1,
                        plateau_min_delta=10.0)
    tr.fit()
    text = (tmp_path / "b" / "log.jsonl").read_text()
    assert "loss_switch" not in text and tr.schedule.current == "ce"
    assert not any("focal" in m for m in logs)


@pytest.fixture(scope="module")
def mni(tmp_path_factory):
    from ahnet_fast.data.mni import build_mni_dataset

    return build_mni_dataset(tmp_path_factory.mktemp("mni_budget") / "data", inplane_step=3)


def test_recipe_under_a_time_budget_on_a_fake_clock(mni, tmp_path, monkeypatch):
    """Warm-up measured (1 s per step on the fake clock), steps planned to fit, training that turns
    out 3x slower than measured is stopped at the budget; model.pt is written from the decoder's first
    epoch on, holds no optimizer state; summary.json and progress.png are written. (Stages 2d, transfer
    and decoder: the fine-tune stage plans and stops by the same code, and would double the time.)"""
    import torch.nn.functional as F

    from ahnet_fast.train import recipe as recipe_mod
    from ahnet_fast.train.recipe import RecipeConfig, run_recipe

    clock = _Clock()
    calls = {"n": 0}
    real_ce = F.cross_entropy

    def timed_ce(*a, **k):  # one loss per training step: measurement (6 calls) 1 s each, training 3 s
        calls["n"] += 1
        clock.t += 1.0 if calls["n"] <= 6 else 3.0
        return real_ce(*a, **k)

    monkeypatch.setattr(F, "cross_entropy", timed_ce)
    saved = []
    real_save = recipe_mod.save_checkpoint

    def spy(path, payload):
        saved.append((str(path).rsplit("/", 1)[-1], payload.get("stage"), "optimizer" in payload))
        return real_save(path, payload)

    monkeypatch.setattr(recipe_mod, "save_checkpoint", spy)
    out = tmp_path / "run"
    cfg = RecipeConfig(
        data=str(mni), out_dir=str(out), stages=("2d", "transfer", "decoder"), model_config={"layers": (1, 1, 1, 1), "psp_block_num": 0,
                                                       "upsample_mode": "trilinear"},
        model_2d="fcn", patch_2d=(32, 32), patch_3d=(32, 32, 32), batch_2d=2, batch_3d=2,
        steps_2d=10, steps_decoder=90, num_workers=0, device="cpu", loss="ce", time_budget=30.0,
    )
    logs: list[str] = []
    res = run_recipe(cfg, log=logs.append, progress=False, clock=clock)
    rec = json.loads((out / "recipe.json").read_text())
    assert rec["plan"]["costs"]["decoder"]["seconds_per_step"] == pytest.approx(1.0)
    assert rec["plan"]["base_steps"] == {"2d": 10, "decoder": 90}
    planned = [m for m in logs if m.startswith("[plan] time budget 30s")]
    assert planned and "scaled to fit" in planned[0]
    # the plan fits the budget: fewer steps than configured (30 s less the warm-up and the reserve)
    st = res["stages"]
    assert rec["steps_2d"] + rec["steps_decoder"] < 25 and st["2d"]["steps"] >= 1
    # training ran 3x slower than measured: the last stage was stopped, and the run ended near the budget
    assert st["decoder"]["stopped_by_deadline"] and any("time budget reached" in m for m in logs)
    assert st["decoder"]["steps"] < rec["steps_decoder"] and clock.t <= 30.0 + 3.0
    # model.pt: written by the decoder stage's epochs, weights and config only
    assert ("model.pt", "decoder", False) in saved
    ck = load_checkpoint(out / "model.pt")
    assert "optimizer" not in ck and "rng" not in ck and ck["model_config"]["out_channels"] == 4
    assert ck["model_source"]["stage"] == "decoder" and ck["preprocessing"]["class_names"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["time_budget_s"] == 30.0 and summary["stages"]["decoder"]["stopped_by_deadline"]
    assert summary["validation_cases"] == 1 and summary["model_source"] == ck["model_source"]
    assert (out / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the start-up summary: model, backend, data and what validation means; the ETA on epoch lines
    text = "\n".join(logs)
    assert "[run] model: ahnet_fast.reference.AHNet" in text and "[run] backend:" in text
    assert "1 training case(s); 1 validation case(s)" in text and "run ETA" in text
    assert "[run] steps: 2d" in text and "estimated total" in text


def test_extending_a_stage_continues_the_same_sample_stream(tmp_path):
    """A stage lengthened from 4 to 6 steps at its first epoch end trains exactly like one planned with 6."""
    clock = _Clock()
    planned, _ = _trainer(tmp_path / "six", clock, steps=6, spe=2)
    planned.fit()
    grown, logs = _trainer(tmp_path / "grown", clock, steps=4, spe=2)
    grown.on_epoch = lambda tr, rec: tr.resize_steps(6, "test") if tr.step == 2 else None
    res = grown.fit()
    assert res["steps"] == 6 and res["finished"] and any("test: 4 -> 6 steps" in m for m in logs)
    a, b = planned.model.state_dict(), grown.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert '"event": "resized"' in (tmp_path / "grown" / "log.jsonl").read_text()
    with pytest.raises(ValueError, match="before the stage ends"):
        grown.resize_steps(8, "again")


def _budgeted_recipe(tmp_path, costs, run_end, base_steps, **steps):
    """A recipe under a time budget ending at ``run_end`` (clock seconds) with measured ``costs``, as
    :meth:`_Recipe._fit_to_budget` sees it; returns it, its clock, the resizes it asks for and a
    factory of stage trainers ``trainer(stage, step, steps, steps_per_epoch)``."""
    from types import SimpleNamespace

    from ahnet_fast.train.recipe import RecipeConfig, _Recipe

    clock = _Clock()
    r = _Recipe.__new__(_Recipe)
    r.cfg = RecipeConfig(data=str(tmp_path), out_dir=str(tmp_path), stages=tuple(costs), time_budget=run_end, **steps)
    r.out, r.clock, r.replan, r.run_end, r.spe_fixed, r.base_steps = tmp_path, clock, True, run_end, {}, base_steps
    r.rates, r.costs, r.log = {}, costs, lambda m: None
    calls = []

    def trainer(stage, step, steps, steps_per_epoch):
        def resize(n, why):
            calls.append((n, why))
            tr.cfg.steps = n

        tr = SimpleNamespace(stage=stage, step=step, world=1, resize_steps=resize,
                             cfg=TrainConfig(steps=steps, steps_per_epoch=steps_per_epoch, batch_size=1))
        return tr

    return r, clock, calls, trainer


def test_a_stage_is_resized_to_the_time_it_has_left(tmp_path):
    """The warm-up measured 2 s/step, the epoch just run took 1 s/step: the last stage is lengthened to
    use the time left (its epoch length is recorded, so a resume rebuilds the same stage); then the
    machine gets busy: shortened to what fits, so its learning rate still anneals."""
    r, clock, calls, trainer = _budgeted_recipe(tmp_path, {"finetune": StageCost(2.0, 0.0, 5, 4)}, 100.0, {},
                                                steps_finetune=20)
    tr = trainer("finetune", 5, 20, 5)
    clock.t = 10.0
    r._fit_to_budget(tr, {"seconds_per_step": 1.0})
    # 90 s left, 15 steps need 15 s: about 0.85 * 75 more steps
    assert calls and calls[0][0] == 20 + int(0.85 * 75) and "ahead of the plan" in calls[0][1]
    assert r.cfg.steps_finetune == calls[0][0] and r.spe_fixed == {"finetune": 5}
    rec = json.loads((tmp_path / "recipe.json").read_text())
    assert rec["steps_finetune"] == calls[0][0] and rec["plan"]["steps_per_epoch"] == {"finetune": 5}
    # busy now: median of the last epochs 3 s/step, 78 steps left need 234 s of the 90: cut to what fits
    calls.clear()
    r._fit_to_budget(tr, {"seconds_per_step": 5.0})
    assert calls and calls[0][0] == 5 + int(0.9 * 90 / 3.0) and "behind the plan" in calls[0][1]
    # on plan: left alone; several processes: never
    calls.clear()
    r._fit_to_budget(tr, {"seconds_per_step": 3.0})
    tr.world = 2
    r._fit_to_budget(tr, {"seconds_per_step": 0.1})
    assert calls == []


def test_time_saved_on_an_early_stage_is_shared_with_the_later_ones(tmp_path):
    """The decoder's warm-up measured 2 s/step on a busy moment; it runs at 0.5 s/step. It is lengthened
    only by the share of the time saved that the configured steps (10 : 100) give it, not to its whole
    deadline, so the fine-tuning stage keeps the time the plan meant for it. A stage behind the plan is
    never lengthened (the validation of its last epoch cannot be spread over its steps)."""
    r, clock, calls, trainer = _budgeted_recipe(
        tmp_path, {"decoder": StageCost(2.0, 0.0, 5, 4), "finetune": StageCost(1.0, 0.0, 50, 4)}, 130.0,
        {"decoder": 10, "finetune": 100}, steps_decoder=10, steps_finetune=100)
    tr = trainer("decoder", 5, 10, 5)
    clock.t = 10.0
    r._fit_to_budget(tr, {"seconds_per_step": 0.5})
    # the deadline (130 - 100 s of fine-tuning) would take 10 + int(0.85 * 17.5 / 0.5) = 39 steps; the
    # shared plan: 10 k * 0.5 + 100 k * 1.0 = 120 + 2.5 s  ->  k = 1.17, 11 decoder steps
    shared = plan_steps({"decoder": 10, "finetune": 100},
                        {"decoder": StageCost(0.5, 0.0, 5, 4), "finetune": StageCost(1.0, 0.0, 50, 4)},
                        seconds=122.5)["decoder"]
    assert shared == 11 and calls == [(11, calls[0][1])] and "ahead of the plan" in calls[0][1]
    assert r.cfg.steps_decoder == 11

    # the last stage, two steps before its end, with a whole epoch's validation still to come
    r.costs["finetune"] = StageCost(1.0, 10.0, 5, 4)
    tr = trainer("finetune", 18, 20, 5)
    r.cfg.steps_finetune = 20
    calls.clear()
    clock.t = 130.0 - 10.5
    r._fit_to_budget(tr, {"seconds_per_step": 1.0})
    assert calls == []
