"""The stacked exit adapters (runtime/exit_adapters.py): one native call gives the modules' results."""

import pytest
import torch

from runtime import native
from runtime.config import ModelConfig
from runtime.model import PonderModel

pytestmark = pytest.mark.skipif(not native.available(torch.float32, torch.device("cpu")),
                                reason="no C compiler here: the native kernels are not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_adapters_give_each_rows_adapter(dtype):
    torch.manual_seed(0)
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=4, max_depth=4, exit_adapter_rank=8)).eval().to(dtype)
    with torch.no_grad():
        for p in model.exit_adapters.parameters():
            p.normal_()  # zero-initialised up weights would make every adapter the identity
    h = torch.randn(7, model.cfg.d_model).to(dtype)
    depth = torch.tensor([4, 0, 2, 2, 3, 4, 0])  # full depth (4) passes as it is
    with torch.inference_mode():
        want = model.adapt_exit(h, depth)  # the modules, one depth at a time
        model.stack_exit_adapters()
        assert model._stacked_adapters.runs(h)
        got = model.adapt_exit(h, depth)
        assert torch.equal(got[depth == 4], h[depth == 4])
        torch.testing.assert_close(got, want)
        with torch.no_grad():
            model.exit_adapters[2].up.bias.add_(1)  # the modules' parameters are views of the stacks
        moved = model.adapt_exit(h, depth)
    torch.testing.assert_close(moved[depth == 2], got[depth == 2] + 1, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(moved[depth != 2], got[depth != 2])
    assert set(model.state_dict()) == set(PonderModel(model.cfg).state_dict())  # nothing new to save


def test_stacked_adapters_refuse_bad_depths():
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=2, max_depth=2, exit_adapter_rank=4)).eval()
    model.stack_exit_adapters()
    with torch.inference_mode(), pytest.raises(ValueError, match="depths"):
        model.adapt_exit(torch.randn(2, model.cfg.d_model), torch.tensor([-1, 0]))
