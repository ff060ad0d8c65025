"""Per-backbone defaults: the tiny backbone fills prompts / scorer / reward, real backbones require them."""

import pytest

from spobench.models.backbones.sd import SD15Backbone, SDXLBackbone
from spobench.models.backbones.tiny import TinyBackbone
from spobench.core.errors import InputError
from spobench.models.spm_files import TINY_SPM
from spobench.trainers.ddpo import DDPOTrainer
from spobench.trainers.d3po import D3POTrainer
from spobench.trainers.mspo import MSPOTrainer
from spobench.trainers.spo import SPOTrainer


@pytest.mark.parametrize("trainer", [SPOTrainer, MSPOTrainer])
def test_spo_tiny_defaults_to_the_shipped_spm(trainer):
    cfg = trainer.prepare_config(trainer.Config(), "tiny", TinyBackbone.defaults)
    assert cfg.scorer == str(TINY_SPM) and (TINY_SPM / "spm_config.json").exists()
    assert cfg.prompts == "tiny-train"


@pytest.mark.parametrize("trainer", [DDPOTrainer, D3POTrainer])
def test_online_tiny_defaults_to_the_oracle_reward(trainer):
    cfg = trainer.prepare_config(trainer.Config(), "tiny", TinyBackbone.defaults)
    assert cfg.reward == "metric:toy_aesthetic" and cfg.prompts == "tiny-train"


@pytest.mark.parametrize("bb", [SD15Backbone, SDXLBackbone])
@pytest.mark.parametrize("trainer,missing,given", [
    (SPOTrainer, "scorer", {"prompts": "p.txt"}),
    (SPOTrainer, "prompts", {"scorer": "runs/spm"}),
    (DDPOTrainer, "reward", {"prompts": "p.txt"}),
    (D3POTrainer, "prompts", {"reward": "metric:pickscore"}),
])
def test_real_backbones_require_what_cannot_be_assumed(bb, trainer, missing, given):
    with pytest.raises(InputError, match=f"setting '{missing}' is required"):
        trainer.prepare_config(trainer.Config.from_dict(given), bb.name, bb.defaults)


@pytest.mark.parametrize("bb,expect", [
    (SD15Backbone, {"d3po": 3e-5, "ddpo": 3e-4, "dpo": (2.048e-5, 500, True), "spm": 3e-6}),
    (SDXLBackbone, {"d3po": 3e-5, "ddpo": 3e-4, "dpo": (2.048e-5, 500, True), "spm": 1e-6}),
    (TinyBackbone, {"d3po": 1e-4, "ddpo": 3e-4, "dpo": (1e-4, 0, False), "spm": 1e-4}),
])
def test_each_trainers_backbone_defaults_come_from_backbone_defaults(bb, expect):
    """The references' learning rates (and Diffusion-DPO's warm-up and flips) per backbone: one place,
    BackboneDefaults, read through each setting's ``backbone=`` declaration."""
    from spobench.trainers.diffusion_dpo import DiffusionDPOTrainer
    from spobench.trainers.spm import SPMTrainConfig

    given = {"prompts": "p.txt", "reward": "metric:pickscore"}
    assert D3POTrainer.prepare_config(D3POTrainer.Config.from_dict(given), bb.name, bb.defaults).lr == expect["d3po"]
    assert DDPOTrainer.prepare_config(DDPOTrainer.Config.from_dict(given), bb.name, bb.defaults).lr == expect["ddpo"]
    dpo = DiffusionDPOTrainer.prepare_config(DiffusionDPOTrainer.Config.from_dict({"pairs": "p.parquet"}), bb.name,
                                             bb.defaults)
    assert (dpo.lr, dpo.lr_warmup_steps, dpo.hflip) == expect["dpo"]
    assert SPMTrainConfig().lr_for(bb.defaults) == SPMTrainConfig().lr_for(bb.name) == expect["spm"]
    spo = SPOTrainer.prepare_config(SPOTrainer.Config.from_dict({"prompts": "p.txt", "scorer": "metric:x"}), bb.name,
                                    bb.defaults)
    assert (spo.lr, spo.lora_rank, spo.k, spo.threshold) == (bb.defaults.lr, bb.defaults.lora_rank, bb.defaults.spo_k,
                                                            bb.defaults.spo_threshold)
