"""``compile=true`` compiles the forwards that carry a gradient only where their compiled backward was checked
against eager: on the CPU, torch 2.13's inductor gave a tiny SD-1.5-shaped UNet's LoRA gradients 12% away from
eager (benchmarks/probe_compile_grad.py; benchmarks/README.md, "compiled gradients"). Elsewhere on the CPU only
the no-grad forwards (rollout, reference) are compiled and training runs the eager module: a compiled backward
that silently disagreed with eager would train another model than the one asked for."""

import torch

from spobench.trainers.base import compile_grad_forwards, compile_unet


def test_grad_forwards_compile_only_where_checked():
    assert compile_grad_forwards("tiny", "cpu")  # checked: test_spo.py::test_compiled_unet_gives_the_same_round
    assert compile_grad_forwards("sd15", "cuda:0")  # not limited off the CPU (the GPU check measures it)
    for name in ("sd15", "sdxl", "tiny-flow"):
        assert not compile_grad_forwards(name, "cpu")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


def _recording_backend(seen):
    def backend(gm, example_inputs):
        seen.append(torch.is_grad_enabled())
        return gm.forward  # runs the captured graph as it is

    return backend


def test_no_grad_only_compile_runs_the_eager_module_with_grad():
    """grad=False: the no-grad call goes through torch.compile, the grad call does not, and the gradient is
    the eager module's own (bit-identical), while the no-grad output equals eager too."""
    torch.manual_seed(0)
    eager, comp = _Net(), _Net()
    comp.load_state_dict(eager.state_dict())
    seen: list[bool] = []
    compile_unet(comp, grad=False, backend=_recording_backend(seen))
    assert comp._compiled_call_impl is not None and eager._compiled_call_impl is None
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(comp(x), eager(x))
    assert seen == [False]  # one graph, captured with grad off
    comp(x).square().sum().backward()
    eager(x).square().sum().backward()
    assert seen == [False]  # the grad call did not compile anything
    for p, q in zip(comp.parameters(), eager.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad)


def test_grad_compile_compiles_the_grad_call_too():
    torch.manual_seed(0)
    net = _Net()
    seen: list[bool] = []
    compile_unet(net, grad=True, backend=_recording_backend(seen))
    net(torch.randn(3, 4)).sum().backward()
    assert seen == [True] and all(p.grad is not None for p in net.parameters())


def test_sd15_compile_on_the_cpu_compiles_the_no_grad_forwards_only(tmp_path, monkeypatch):
    """The trainer asks for the no-grad-only compile for sd15 on the CPU (and the full one for tiny)."""
    import spobench.trainers.base as base
    from spobench.models.backbones.sd import SD15Backbone
    from spobench.models.backbones.testing import make_sd15_folder
    from spobench.models.backbones.tiny import TinyBackbone
    from spobench.trainers.spo import SPOTrainer

    asked = []
    monkeypatch.setattr(base, "compile_unet", lambda unet, grad, **kw: asked.append(grad))
    monkeypatch.setattr(base, "check_compile_toolchain", lambda device: None)
    sets = ["prompts=unused", "k=2", "num_steps=4", "kappa=800", "epochs=1", "rollout_batch=2", "compile=true"]
    for name, bb in (("sd15", SD15Backbone.load(make_sd15_folder(tmp_path / "sd15"))), ("tiny", TinyBackbone.build(0))):
        cfg = SPOTrainer.Config.load(None, sets).resolve(bb.defaults)
        SPOTrainer(cfg, bb, tmp_path / name / "run", prompts=["a red cat"], step_scorer=lambda *a, **k: None)
    assert asked == [False, True]
