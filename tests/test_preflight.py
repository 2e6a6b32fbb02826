import shutil

import pytest

from mtpress.archs import get_arch
from mtpress.errors import InsufficientDiskError
from mtpress.schema import ReleaseConfig
from mtpress.stages.preflight import check_disk_space, planned_output_bytes
from tests.fixtures import SMALL, make_checkpoint


def config(**overrides) -> ReleaseConfig:
    return ReleaseConfig(name="x", finetune={"repo": "a/b"}, target={"repo": "c/d"}, **overrides)


def test_estimate_scales_with_quants_and_layouts(tmp_path):
    model = make_checkpoint(tmp_path / "m", with_head=True, seed=0)
    arch = get_arch("qwen35")
    params = sum(t.n_elements for t in model.tensors.values())
    vocab_sized = 2 * SMALL["vocab_size"] * SMALL["hidden_size"]  # embedding + lm_head
    embedded = planned_output_bytes(model, arch, config(layouts=["embedded"], quants=["Q8_0"]))
    assert embedded == int(params * 2 * (1 + 8 / 16))
    both = planned_output_bytes(model, arch, config(layouts=["sidecar", "embedded"], quants=["Q8_0", "Q4_K_M"]))
    assert both == int((params * 2 * 2 + vocab_sized * 2) * (1 + 8 / 16 + 4 / 16))


def test_refuses_when_the_disk_is_too_small(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(InsufficientDiskError) as err:
        check_disk_space(tmp_path / "release", required=free)
    assert "GiB free" in str(err.value) and "trim `quants:`" in str(err.value)
    check_disk_space(tmp_path / "release", required=1024)
