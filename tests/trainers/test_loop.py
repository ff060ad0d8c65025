"""The one training loop (spobench.trainers.loop) on a fake algorithm that trains a whole small model (no
LoRA): gradient accumulation, clipping, bit-exact resume, the non-finite stop, the checkpoint's weights."""

import json

import pytest
import torch

from spobench.core.checkpoint import LoraWeights, ModuleWeights, latest_checkpoint, list_checkpoints, read_checkpoint
from spobench.core.errors import InputError, ModelLoadError
from spobench.trainers.loop import Loop, Round, Schedule, Task, TrainingError


class Regression(Task):
    """Least squares on items drawn from (round, item); the model has dropout, so a resume must also bring
    the global RNG back to be bit-exact."""

    def __init__(self, items_per_round=4, rounds=3, nan_at=None):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        self.items_per_round, self.rounds, self.nan_at = items_per_round, rounds, nan_at
        self.losses: list[float] = []

    def rounds_per_epoch(self):
        return self.rounds

    def round(self, epoch, rnd):
        g = torch.Generator().manual_seed(1000 * epoch + rnd)
        x = torch.randn(self.items_per_round, 3, generator=g)
        return Round(epoch, rnd, [(x[i], x[i].sum().reshape(1)) for i in range(len(x))])

    def loss(self, items, total):
        x = torch.stack([i[0] for i in items])
        y = torch.stack([i[1] for i in items])
        loss = ((self.model(x) - y) ** 2).sum() / total
        if self.nan_at is not None and self.loop.progress.rounds_done == self.nan_at:
            loss = loss * float("nan")
        return loss, {"loss": float(loss.detach()) * total}

    def after_step(self, log):
        self.losses.append(log["loss"])

    def report(self, rnd, steps):
        return [{"step": int(s["step"]), "loss": s["loss"], "grad_norm": s["grad_norm"]} for s in steps], ""

    def state_dict(self):
        return {"losses": self.losses}

    def load_state_dict(self, state):
        self.losses = list(state["losses"])


def make(out, schedule=None, **task_kw):
    task = Regression(**task_kw)
    params = list(task.model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    schedule = schedule or Schedule(epochs=2, micro_batch=2, grad_accum=1, max_grad_norm=1.0, checkpoint_every=1)
    task.loop = Loop(task, out=out, name="regression", weights=ModuleWeights({"model": task.model}, {"model": "mlp"}),
                     params=params, optimizer=opt, scheduler=sched, schedule=schedule, config={"lr": 1e-2})
    out.mkdir(parents=True, exist_ok=True)
    return task


def _spy_grads(task):
    seen, step = [], task.loop.optimizer.step

    def spy(*a, **kw):
        seen.append(torch.cat([p.grad.flatten().clone() for p in task.loop.params]))
        return step(*a, **kw)

    task.loop.optimizer.step = spy
    return seen


def test_accumulation_equals_one_big_micro_batch(tmp_path):
    a = make(tmp_path / "a", Schedule(micro_batch=4, grad_accum=1))
    b = make(tmp_path / "b", Schedule(micro_batch=1, grad_accum=4))
    a.model.eval(), b.model.eval()  # no dropout: the same function for both
    ga, gb = _spy_grads(a), _spy_grads(b)
    items = a.round(0, 0).items
    la, lb = a.loop.train_items(items), b.loop.train_items(items)
    assert len(la) == len(lb) == 1 and len(ga) == len(gb) == 1  # four micro-batches, one optimizer step
    assert la[0]["items"] == lb[0]["items"] == 4
    assert la[0]["loss"] == pytest.approx(lb[0]["loss"], rel=1e-6)
    assert ga[0].norm() > 0 and (ga[0] - gb[0]).norm() <= 1e-6 * ga[0].norm()
    # grad_accum=2 over four micro-batches of one: two steps
    c = make(tmp_path / "c", Schedule(micro_batch=1, grad_accum=2))
    assert len(c.loop.train_items(items)) == 2 and c.loop.progress.step == 2


def test_clipping_clips_the_step_and_logs_the_raw_norm(tmp_path):
    task = make(tmp_path, Schedule(micro_batch=4, max_grad_norm=1e-3))
    seen = _spy_grads(task)
    logs = task.loop.train_items(task.round(0, 0).items)
    assert logs[0]["grad_norm"] > 1e-3
    assert seen[0].norm().item() == pytest.approx(1e-3, rel=1e-3)
    free = make(tmp_path / "free", Schedule(micro_batch=4, max_grad_norm=None))
    seen = _spy_grads(free)
    logs = free.loop.train_items(free.round(0, 0).items)
    assert seen[0].norm().item() == pytest.approx(logs[0]["grad_norm"], rel=1e-5)  # measured, not clipped


def _state(task):
    return {k: v.clone() for k, v in task.model.state_dict().items()}


def test_resume_is_bit_exact(tmp_path):
    full = make(tmp_path / "full")
    assert full.loop.run() is True
    part = make(tmp_path / "part", Schedule(epochs=2, micro_batch=2, max_grad_norm=1.0, checkpoint_every=1,
                                            max_rounds=4, keep_checkpoints=2))
    assert part.loop.run() is False  # stopped by max_rounds, with a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["checkpoint-000003", "checkpoint-000004"]
    torch.rand(5)  # the global RNG moves on in between; the checkpoint brings it back
    resumed = make(tmp_path / "part")
    assert resumed.loop.resume() == latest_checkpoint(tmp_path / "part")
    assert resumed.loop.progress.rounds_done == 4 and resumed.loop.progress.step == 8
    assert resumed.loop.run() is True
    want, got = _state(full), _state(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.losses == full.losses and len(full.losses) == 12  # 6 rounds x 2 micro-batches of 2 items
    rows = lambda t: [json.loads(x) for x in (t.loop.out / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(resumed) == rows(full)
    opt_a, opt_b = full.loop.optimizer.state_dict(), resumed.loop.optimizer.state_dict()
    assert all(torch.equal(opt_a["state"][i][k], opt_b["state"][i][k]) for i in opt_a["state"] for k in opt_a["state"][i])
    assert resumed.loop.scheduler.last_epoch == full.loop.scheduler.last_epoch == 12


def test_a_killed_runs_log_rows_past_its_checkpoint_are_dropped(tmp_path):
    task = make(tmp_path, Schedule(epochs=1, micro_batch=4, checkpoint_every=2))
    task.loop.run()  # checkpoints after rounds 2 and 3 (the epoch end)
    task.loop.log({"step": 99, "loss": 0.0, "rounds_done_before": 3})  # as if round 4 ran, then a kill
    again = make(tmp_path, Schedule(epochs=1, micro_batch=4, checkpoint_every=2))
    again.loop.resume()
    steps = [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from safetensors.torch import load_file

    task = make(tmp_path, nan_at=4)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 1, round 1, step 8; the last good "
                                            r"checkpoint is .*checkpoint-000004"):
        task.loop.run()
    last = latest_checkpoint(tmp_path)
    assert last.name == "checkpoint-000004" and read_checkpoint(last).progress["step"] == 8
    # the failed round never reached an optimizer step: the weights are the checkpoint's
    saved = load_file(last / "weights" / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in _state(task).items())


def test_non_finite_gradient_norm_stops(tmp_path):
    task = make(tmp_path)
    task.model[0].weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingError, match="non-finite gradient norm .* no checkpoint was written yet"):
        task.loop.run()


def test_whole_model_checkpoint_holds_the_modules_and_refuses_other_weights(tmp_path):
    task = make(tmp_path, Schedule(epochs=1, micro_batch=4, checkpoint_every=3))
    task.loop.run()
    ckpt = latest_checkpoint(tmp_path)
    manifest = read_checkpoint(ckpt).manifest
    assert manifest["weights"] == {"modules": ["model"], "model": "mlp"}
    assert "weights/model.safetensors" in manifest["files"] and "lora_rank" not in manifest
    from safetensors.torch import load_file

    saved = load_file(ckpt / "weights" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in task.model.state_dict().items())

    other = make(tmp_path / "other")
    other.loop.weights = ModuleWeights({"model": other.model}, {"model": "cnn"})
    with pytest.raises(ModelLoadError, match="checkpoint weights have model 'mlp', this run has 'cnn'"):
        other.loop.restore(ckpt)

    class NoLora:  # a LoRA run's weights cannot take a whole-model checkpoint, nor the other way round
        lora_rank = 4

        def identity(self):
            return {"backbone": "tiny", "source": "x", "prediction_type": "v_prediction"}

    with pytest.raises(ModelLoadError, match="trained on backbone None"):
        LoraWeights(NoLora()).check(manifest, ckpt)
    with pytest.raises(ModelLoadError, match="no whole-model weights"):
        ModuleWeights({"model": task.model}, {"model": "mlp"}).check(LoraWeights(NoLora()).manifest(), ckpt)


def test_a_checkpoint_of_other_shapes_is_one_line(tmp_path):
    task = make(tmp_path, Schedule(epochs=1, micro_batch=4, checkpoint_every=3))
    task.loop.run()
    wide = make(tmp_path / "wide")
    wide.model[0] = torch.nn.Linear(3, 9)
    with pytest.raises(InputError, match=r"model.safetensors: does not fit this run"):
        wide.loop.restore(latest_checkpoint(tmp_path))


def test_no_checkpoints_when_checkpoint_every_is_none(tmp_path):
    task = make(tmp_path, Schedule(epochs=1, micro_batch=4))
    assert task.loop.run() is True and task.loop.progress.step == 3
    assert latest_checkpoint(tmp_path) is None


def test_old_format_tiny_pretrain_folder_is_refused(tmp_path):
    from spobench.models.backbones.tiny import TinyBackbone
    from spobench.toyworld.pretrain import PretrainConfig, Pretrainer, toy_batch

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"old")
    tr = Pretrainer(TinyBackbone.build(0), PretrainConfig(steps=1, batch_size=2), toy_batch, tmp_path)
    with pytest.raises(InputError, match="format before spobench's shared one; it cannot be resumed"):
        tr.load_checkpoint()


@pytest.mark.parametrize("spoil", ["truncated", "missing-key"])
def test_a_spoiled_whole_model_checkpoint_is_one_named_line(tmp_path, spoil):
    from safetensors.torch import load_file, save_file

    from spobench.core.errors import SpobenchError

    task = make(tmp_path, Schedule(epochs=1, micro_batch=4, checkpoint_every=3))
    task.loop.run()
    ckpt = latest_checkpoint(tmp_path)
    f = ckpt / "weights" / "model.safetensors"
    if spoil == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        sd = load_file(f)
        sd.pop(sorted(sd)[0])
        save_file(sd, f)
    with pytest.raises(SpobenchError, match="model.safetensors") as e:
        make(tmp_path / "again").loop.restore(ckpt)
    assert "\n" not in str(e.value)
