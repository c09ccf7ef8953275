"""The plain-PyTorch trainer: exact resume, NaN handling, the bound falls, DDP, atomic checkpoints."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config

from sedd_ray import checkpoint as ckpt
from sedd_ray import trainer as trainer_mod
from sedd_ray.layout import TrainerFiles
from sedd_ray.trainer import NonFiniteLossError, Trainer, drill_nan_step, train


class Stop(Exception):
    """Raised from the report callback to simulate a crash right after a checkpoint."""


def _weights(path) -> dict[str, torch.Tensor]:
    state, _ = ckpt.load_checkpoint(path)
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"ema.{k}": v for k, v in state["ema"].items()}}


def test_resume_matches_uninterrupted_run(tmp_path, tiny_bundle):
    """2k steps straight == 1k steps, a crash, a resume from the checkpoint, 1k more."""
    cfg = tiny_config(steps=2000, ckpt_every=1000, eval_every=1000, log_every=50, cosine=True,
                      dropout=0.1, hidden_size=16, cond_dim=8, batch_size=4, seq_len=16)
    full_log: list[dict] = []
    full = train(cfg, tmp_path / "full", lambda m, c: full_log.append(m), bundle=tiny_bundle)

    part_log: list[dict] = []

    def crash_after_checkpoint(metrics, checkpoint_dir):
        part_log.append(metrics)
        if checkpoint_dir is not None:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "part", crash_after_checkpoint, bundle=tiny_bundle)
    assert part_log[-1]["step"] == 1000
    resumed = train(cfg, tmp_path / "part", lambda m, c: part_log.append(m), bundle=tiny_bundle)
    assert resumed.resumed_from_step == 1000 and resumed.step == full.step == 2000

    def curve(run):  # every log row, reported or not
        rows = [json.loads(line) for line in TrainerFiles(tmp_path / run).metrics.open()]
        return [(m["step"], m["train_loss"]) for m in rows if "train_loss" in m]

    assert len(curve("full")) == 2000 // 50
    assert curve("part") == curve("full")  # bitwise: the same floats
    assert [m["step"] for m in part_log if "val_nll" in m] == [1000, 2000]
    wa, wb = _weights(full.checkpoint_dir), _weights(resumed.checkpoint_dir)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert resumed.val_nll == full.val_nll


def test_log_rows_are_reported_at_most_every_report_every_s(tmp_path, tiny_bundle):
    """metrics.jsonl gets every log row; the report function (Ray Train) gets evaluation,
    checkpoint and final rows always, plain log rows only report_every_s apart."""
    def run(name, every):
        seen = []
        cfg = tiny_config(steps=20, log_every=2, eval_every=10, ckpt_every=5,
                          report_every_s=every)
        train(cfg, tmp_path / name, lambda m, c: seen.append((m["step"], c is not None)),
              bundle=tiny_bundle)
        rows = [json.loads(line) for line in TrainerFiles(tmp_path / name).metrics.open()]
        return seen, [r["step"] for r in rows]

    every_log_point = sorted({*range(2, 21, 2), 5, 15})  # log steps, checkpoint steps
    seen, logged = run("never", 1e9)
    assert logged == every_log_point  # the last one is the final row
    assert [s for s, _ in seen] == [5, 10, 15, 20]  # checkpoints (10: and evaluation), final
    assert all(has_ckpt for _, has_ckpt in seen)
    seen, logged = run("always", 0)
    assert [s for s, _ in seen] == logged == every_log_point


def test_checkpoint_holds_the_whole_state(tmp_path, tiny_bundle):
    res = train(tiny_config(steps=10, ckpt_every=5), tmp_path, bundle=tiny_bundle)
    state, meta = ckpt.load_checkpoint(res.checkpoint_dir)
    assert {"model", "ema", "optimizer", "scheduler", "step", "tokens", "rng",
            "data_position"} <= state.keys()
    assert state["step"] == meta["step"] == 10
    assert state["tokens"] == 10 * 8 * 32
    assert meta["vocab_size"] == tiny_bundle.vocab_size
    assert TrainerFiles(tmp_path).final.is_file() and TrainerFiles(tmp_path).metrics.is_file()


def test_nan_loss_stops_with_step_and_last_finite_loss(tmp_path, tiny_bundle, monkeypatch):
    from sedd_ray import objective as objective_mod  # the trainer's loss comes from there

    real = objective_mod.score_entropy_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 13 else out  # the 13th update

    monkeypatch.setattr(objective_mod, "score_entropy_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"at step 13; last finite loss [0-9.]+ nats/token at step 10"):
        train(tiny_config(steps=40), tmp_path, bundle=tiny_bundle)


def test_nan_drill_poisons_only_the_runs_it_selects(tmp_path, tiny_bundle, monkeypatch):
    """SEDD_RAY_DRILL_NAN_AT (+ _IF, a JSON selector) is an environment-only drill: no config
    field, flag or Parquet column; it stops the selected runs as a real NaN would."""
    monkeypatch.setenv("SEDD_RAY_DRILL_NAN_AT", "7")
    monkeypatch.setenv("SEDD_RAY_DRILL_NAN_IF", json.dumps({"graph": "absorb", "lr": 2.5e-3}))
    assert drill_nan_step(tiny_config(graph="absorb", lr=2.5e-3)) == 7
    assert drill_nan_step(tiny_config(graph="uniform", lr=2.5e-3)) == 0
    assert drill_nan_step(tiny_config(graph="absorb", lr=2e-3)) == 0
    assert not any("nan" in k for k in tiny_config().flat())
    cfg = tiny_config(graph="absorb", lr=2.5e-3, steps=10, eval_every=10, ckpt_every=10)
    with pytest.raises(NonFiniteLossError, match=r"at step 7; last finite loss [0-9.]+ nats/token at step 5"):
        train(cfg, tmp_path / "drill", bundle=tiny_bundle)
    monkeypatch.delenv("SEDD_RAY_DRILL_NAN_IF")
    assert drill_nan_step(tiny_config(graph="uniform")) == 7  # no selector: every run
    monkeypatch.setenv("SEDD_RAY_DRILL_NAN_IF", "lr=1")
    with pytest.raises(ValueError, match="bad NaN drill"):
        drill_nan_step(tiny_config())


def test_validation_bound_falls_with_training(tmp_path, tiny_bundle):
    cfg = tiny_config(steps=150, eval_sequences=32, eval_draws=4, lr=3e-3, warmup_steps=10,
                      ema_decay=0.9, ckpt_every=0, eval_every=150, hidden_size=32)
    t = Trainer(cfg, tmp_path, bundle=tiny_bundle)
    before, se_before, n = t.evaluate()
    assert n == 32
    t.run(resume=False)
    after, se_after, _ = t.evaluate()
    assert after < before - 3 * (se_before + se_after), (before, after)
    # Evaluation is deterministic for fixed weights (same time draws each time).
    assert t.evaluate()[0] == after


def test_training_seeds_share_the_blocks_tokenizer_and_draws(tmp_path, tiny_bundle):
    """Two trials of a study that differ only in the training seed: the same split and
    tokenizer (data.split_seed, never train.seed), the same final-evaluation blocks, and the
    same draws (train.eval_seed): the same weights give the same per-block values."""
    one, two = (Trainer(tiny_config(seed=s), tmp_path / f"s{s}") for s in (0, 1))
    assert one.data.backend.to_str().encode() == two.data.backend.to_str().encode()
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(one.data, split), getattr(two.data, split))
    assert one.data.meta["data_identity"] == two.data.meta["data_identity"] is not None
    assert one.data.meta["data_identity"] == tiny_bundle.meta["data_identity"]
    assert not torch.equal(next(one.raw_model.parameters()), next(two.raw_model.parameters()))
    two.ema.load_state_dict(one.ema.state_dict())  # same weights: same blocks and draws
    a, b = (t.evaluation("val", 24, 2) for t in (one, two))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.nll, b.nll)
    n = one.data.val.shape[0]
    assert a.ids[0] > 0 and a.ids[-1] > n // 2  # spread over the split, not its head
    two.cfg.train.eval_seed = 1  # other draws (a study-wide setting)
    assert not torch.equal(two.evaluation("val", 24, 2).nll, a.nll)


def test_final_evaluation_is_the_trials_number(tmp_path, tiny_bundle):
    """val_nll of the final row and of final.json is the final evaluation (not the best
    periodic one, kept as val_nll_best); its per-block values sit next to final.json."""
    from sedd_ray import results

    cfg = tiny_config(steps=20, eval_every=5, ckpt_every=10, final_eval_sequences=12,
                      final_eval_draws=3, test_draws=2, test_sequences=6)
    rows: list[dict] = []
    res = train(cfg, tmp_path, lambda m, c: rows.append(m), bundle=tiny_bundle)
    final = rows[-1]
    assert final["final"] and final["val_nll"] == final["val_nll_final"] == res.val_nll
    assert res.val_nll_final == res.val_nll and res.val_nll_final_stderr == res.val_nll_stderr > 0
    periodic = [m["val_nll"] for m in rows[:-1] if "val_nll" in m]
    assert len(periodic) == 3 and final["val_nll_best"] == res.val_nll_best
    assert res.val_nll_best == min(periodic + [res.best_val_nll]) == res.best_val_nll
    assert final["data_identity"] == res.data_identity == tiny_bundle.meta["data_identity"]
    assert final["final_eval_blocks"] == 12 and res.test_nll is not None
    blocks = pd.read_parquet(TrainerFiles(tmp_path).final_blocks)
    t = Trainer(cfg, tmp_path / "again", bundle=tiny_bundle)
    t.load(res.checkpoint_dir)
    ev = t.evaluation("val", 12, 3)
    assert blocks["block"].tolist() == ev.ids.tolist()
    assert blocks["nll"].tolist() == ev.nll.tolist()
    assert abs(blocks["nll"].mean() - res.val_nll) < 1e-12
    meta = json.loads(pq.read_schema(TrainerFiles(tmp_path).final_blocks).metadata[b"sedd_ray.meta"])
    assert meta["data_identity"] == res.data_identity and meta["draws"] == 3
    # resumed at the final step: the same number again
    assert train(cfg, tmp_path, bundle=tiny_bundle).val_nll == res.val_nll
    assert results.BLOCKS_SCHEMA.names == ["block", "nll"]


def _ddp_worker(rank: int, world: int, init_file: str, out: str, cache: str) -> None:
    os.environ["SEDD_RAY_CACHE"] = cache
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        # report_every_s: rank 0's clock picks which plain log rows are reported, and every
        # rank must follow it (each report is a barrier in Ray Train). Fake clocks: rank
        # 0's runs (some rows due, not all), rank 1's stands still (never due by itself).
        ticks = [0.0]

        def clock() -> float:
            ticks[0] += 0.004 if rank == 0 else 0.0
            return ticks[0]

        # this spawned process only; the wall clock (TrainResult.started_at) stays real
        trainer_mod.time = SimpleNamespace(perf_counter=clock, time=time.time)
        cfg = tiny_config(steps=40, ckpt_every=20, eval_every=20, log_every=2,
                          report_every_s=0.01)
        seen = []
        t = Trainer(cfg, out, lambda m, c: seen.append(m["step"]))
        res = t.run(resume=False)
        flat = torch.cat([p.detach().flatten() for p in t.raw_model.parameters()])
        torch.save({"weights": flat, "steps": seen, "val": res.val_nll,
                    "checkpoint": res.checkpoint_dir}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_gloo_ranks_hold_identical_weights(tmp_path, tiny_bundle):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker,
                         args=(r, 2, str(tmp_path / "init"), str(tmp_path), os.environ["SEDD_RAY_CACHE"]))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["weights"], r1["weights"])
    assert r0["steps"] == r1["steps"]  # every rank reports at the same steps
    plain_rows = set(range(2, 40, 2)) - {20}  # log rows without evaluation or checkpoint
    assert 0 < len(plain_rows & set(r0["steps"])) < len(plain_rows)  # some reported, not all
    assert r0["val"] == r1["val"]  # metrics averaged over ranks
    # the final evaluation does not depend on the number of ranks: one rank, same weights
    single = Trainer(tiny_config(), tmp_path / "single", bundle=tiny_bundle)
    single.load(r0["checkpoint"])
    t = single.cfg.train
    one = single.evaluation("val", t.final_eval_sequences, t.final_eval_draws)
    two = pd.read_parquet(TrainerFiles(tmp_path).final_blocks)
    assert two["block"].tolist() == one.ids.tolist()
    assert torch.allclose(torch.tensor(two["nll"].to_numpy()), one.nll, rtol=1e-6, atol=0)
    assert abs(r0["val"] - one.nll.mean().item()) < 1e-5
    # Weights moved away from the shared initialisation.
    init = Trainer(tiny_config(), tmp_path / "init-model", bundle=tiny_bundle).raw_model
    flat0 = torch.cat([p.detach().flatten() for p in init.parameters()])
    assert not torch.equal(flat0, r0["weights"])


def _crash_mid_write(out: str, cache: str) -> None:
    os.environ["SEDD_RAY_CACHE"] = cache
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if "ckpt-00000020" in str(f):
            with open(f, "wb") as fh:  # half a file, then the process dies
                fh.write(b"\x80\x02partial")
            os._exit(9)
        return real_save(obj, f, *a, **k)

    ckpt.torch.save = dying_save
    train(tiny_config(steps=30, ckpt_every=10), out)


def test_killed_mid_write_checkpoint_is_never_loaded(tmp_path, tiny_bundle):
    p = mp.get_context("spawn").Process(target=_crash_mid_write,
                                        args=(str(tmp_path), os.environ["SEDD_RAY_CACHE"]))
    p.start()
    p.join(timeout=240)
    assert p.exitcode == 9
    root = TrainerFiles(tmp_path).checkpoints
    assert [c.name for c in ckpt.list_checkpoints(root)] == ["ckpt-00000010"]
    assert ckpt.latest_checkpoint(root).name == "ckpt-00000010"
    assert any(n.name.startswith(".tmp-ckpt-00000020") for n in root.iterdir())  # the debris
    res = train(tiny_config(steps=30, ckpt_every=10), tmp_path, bundle=tiny_bundle)
    assert res.resumed_from_step == 10 and res.step == 30


def test_tampered_checkpoint_is_refused(tmp_path, tiny_bundle):
    res = train(tiny_config(steps=5, ckpt_every=5), tmp_path, bundle=tiny_bundle)
    state_file = os.path.join(res.checkpoint_dir, ckpt.STATE_FILE)
    data = bytearray(open(state_file, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(state_file, "wb").write(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="fails its checksum"):
        ckpt.load_checkpoint(res.checkpoint_dir)
    open(state_file, "wb").write(bytes(data[: len(data) // 3]))  # truncated
    with pytest.raises(ckpt.CheckpointError, match="fails its checksum"):
        Trainer(tiny_config(steps=5), tmp_path, bundle=tiny_bundle).run(resume=True)
    meta = json.loads(open(os.path.join(res.checkpoint_dir, ckpt.META_FILE)).read())
    assert meta["files"][ckpt.STATE_FILE]  # the checksum lives in the metadata


def test_progress_bar_off_a_terminal_draws_few_lines(tmp_path, tiny_bundle, capsys):
    """A Ray worker's stderr is no terminal, and Ray forwards every redraw of a bar there as
    a console line of its own: off a terminal the bar redraws at most every 10 s."""
    cfg = tiny_config(steps=200, progress=True, ckpt_every=0, eval_every=200, log_every=50)
    t0 = time.time()
    res = train(cfg, tmp_path / "run", bundle=tiny_bundle)
    # started_at is the wall clock of the first step: after the call, before its end
    assert t0 < res.started_at < res.started_at + res.wall_time_s <= time.time()
    err = capsys.readouterr().err
    draws = err.count("train:")
    assert "200/200" in err  # the bar closes on the last step
    assert 1 <= draws <= 4, err  # the opening and closing draws (+ one per 10 s elapsed)
