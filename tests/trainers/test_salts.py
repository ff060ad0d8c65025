"""The seed salts: distinct (two equal salts would replay one stream's numbers in another) and the
values every recorded run was drawn with (a changed salt changes every result of its stream)."""

from spobench.trainers import salts

RECORDED = {"LORA_INIT": 0x10A, "EPOCH_ORDER": 0x9E0, "SHARE": 0x5A1, "TRAINED_STEPS": 0x75, "DDPO_SAMPLE": 0xDD,
            "D3PO_PAIR": 0xD3, "DPO_VAE": 0x7AE, "DPO_PAIR": 0xDB0, "FLOW_GRPO_SAMPLE": 0xF6}


def test_salts_are_distinct_and_as_recorded():
    values = {name: v for name, v in vars(salts).items() if name.isupper()}
    assert values == RECORDED
    assert len(set(values.values())) == len(values)
