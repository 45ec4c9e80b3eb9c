"""Evaluation holds one copy of the parameters: only the weights it evaluates (raw, ema1 or
ema2) are loaded from the checkpoint, and they give the same outputs as the full module."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from jit.builders import load_module
from jit.config import register_schemas
from jit.module import JiTModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NET = {"name": "JiT-T/4", "input_size": 16, "num_classes": 10}


@pytest.fixture(scope="module")
def trained_like():
    """A module whose raw weights and two EMAs all differ (as after training)."""
    torch.manual_seed(0)
    module = JiTModule(net=NET)
    with torch.no_grad():
        for p in module.denoiser.parameters():
            p.normal_(0, 0.02)
        for shadow in module.ema.shadows:
            for s in shadow:
                s.normal_(0, 0.02)
    return module


def save_lightning(module: JiTModule, path: Path) -> None:
    checkpoint = {"state_dict": module.state_dict(), "pytorch-lightning_version": L.__version__,
                  "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)


def tensor_bytes(module: JiTModule) -> int:
    """Bytes of every distinct tensor storage the module keeps: parameters, buffers, EMA shadows."""
    tensors = [*module.parameters(), *module.buffers(), *(s for shadow in module.ema.shadows for s in shadow)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def one_copy_bytes(module: JiTModule) -> int:
    return sum(t.untyped_storage().nbytes() for t in [*module.denoiser.parameters(), *module.denoiser.buffers()])


def compose_eval(ckpt: Path, which: str):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("run", overrides=[f"ckpt_path={ckpt}", "model=jit_t4", "model.net.input_size=16",
                                         f"eval_weights={which}", "paths.output_dir=unused"])


@pytest.mark.parametrize("kind", ["lightning", "official"])
@pytest.mark.parametrize("which", ["raw", "ema1", "ema2"])
def test_eval_module_holds_only_the_evaluated_weights(trained_like, tmp_path, kind, which):
    path = tmp_path / ("last.ckpt" if kind == "lightning" else "checkpoint-last.pth")
    if kind == "lightning":
        save_lightning(trained_like, path)
    else:
        torch.save(trained_like.export_official_state(), path)

    module, _ = load_module(compose_eval(path, which))

    assert tensor_bytes(module) == one_copy_bytes(module)
    z, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.8]), torch.tensor([1, 7])
    with torch.no_grad(), trained_like.eval_weights_context(which):
        expected = trained_like.denoiser.net(z, t, y)
    with torch.no_grad(), module.eval_weights_context(which):
        assert torch.equal(module.denoiser.net(z, t, y), expected)
    with pytest.raises(ValueError, match="only the .* weights were loaded"):
        with module.eval_weights_context("ema1" if which != "ema1" else "ema2"):
            pass
