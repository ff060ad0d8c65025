import pytest
import torch

from spobench.core.dtypes import NAMES, torch_dtype
from spobench.core.errors import InputError


def test_names_map_to_torch_dtypes_and_anything_else_is_one_line():
    assert [torch_dtype(n) for n in NAMES] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(InputError, match=r"^--dtype must be one of fp32, bf16, fp16 \(got 'float16'\)$"):
        torch_dtype("float16")
    with pytest.raises(InputError, match=r"^generate.dtype must be one of"):
        torch_dtype("half", "generate.dtype")
