"""Per-backbone defaults: the tiny backbone fills prompts / scorer / reward, real backbones require them."""

import pytest

from spobench.models.backbones.sd import SD15Backbone, SDXLBackbone
from spobench.models.backbones.tiny import TinyBackbone
from spobench.core.errors import InputError
from spobench.models.spm import TINY_SPM
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
