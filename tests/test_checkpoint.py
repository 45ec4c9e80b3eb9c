"""Official checkpoint I/O: safe loading, clear errors, official-layout export."""

import argparse
import os
import shutil

import pytest
import torch

from jit.checkpoint import (
    CheckpointError,
    build_denoiser_from_checkpoint,
    load_jit_checkpoint,
    save_official_checkpoint,
)
from jit.models import Denoiser, build_jit


def test_load_meta_and_weight_choice(official_tiny_ckpt_path):
    raw, meta = load_jit_checkpoint(official_tiny_ckpt_path, "model")
    ema1, _ = load_jit_checkpoint(official_tiny_ckpt_path, "model_ema1")
    ema2, _ = load_jit_checkpoint(official_tiny_ckpt_path, "model_ema2")
    assert all(k.startswith("net.") for k in raw)
    assert not torch.equal(raw["net.blocks.0.mlp.w12.weight"], ema1["net.blocks.0.mlp.w12.weight"])
    assert set(raw) == set(ema1) == set(ema2)
    assert meta["img_size"] == 32 and meta["num_classes"] == 10 and meta["epoch"] == 2
    assert meta["variant"] == "JiT-T/4"  # args.model is 'custom': inferred from the shapes
    assert meta["noise_scale"] == 1.0 and meta["t_eps"] == 0.05


def test_variant_taken_from_args_model(tmp_path):
    denoiser = Denoiser(build_jit("JiT-T/4", input_size=16, num_classes=3), 3)
    path = tmp_path / "ck.pth"
    save_official_checkpoint(path, denoiser.state_dict(), args={"model": "JiT-T/4", "img_size": 16, "class_num": 3})
    _, meta = load_jit_checkpoint(path)
    assert meta["variant"] == "JiT-T/4" and meta["img_size"] == 16 and meta["num_classes"] == 3


def test_export_roundtrip_reproduces_outputs(tmp_path, official_tiny_ckpt_path, official_tiny_cases):
    denoiser, meta = build_denoiser_from_checkpoint(official_tiny_ckpt_path, "model")
    out_path = tmp_path / "export" / "checkpoint-last.pth"
    sd = denoiser.state_dict()
    save_official_checkpoint(out_path, sd, sd, sd, args=meta["args"], epoch=5)
    # readable by a plain weights_only load with the Namespace allowlist, as the official code would
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(out_path, weights_only=True)
    assert set(raw) == {"model", "model_ema1", "model_ema2", "epoch", "args"}
    again, meta2 = build_denoiser_from_checkpoint(out_path, "model_ema2")
    cases = official_tiny_cases
    with torch.no_grad():
        assert torch.equal(again.net(cases["x"], cases["t"], cases["y"]),
                           denoiser.eval().net(cases["x"], cases["t"], cases["y"]))
    assert meta2["epoch"] == 5
    assert not list(tmp_path.joinpath("export").glob("*.tmp"))


def test_missing_path():
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        load_jit_checkpoint("/nonexistent/nope.pth")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        load_jit_checkpoint(tmp_path)


def test_unreadable(tmp_path, official_tiny_ckpt_path, monkeypatch):
    path = tmp_path / "c.pth"
    shutil.copy(official_tiny_ckpt_path, path)
    path.chmod(0)
    # root can read anything; pretend the permission check fails as it would for a user
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(CheckpointError, match="not readable"):
        load_jit_checkpoint(path)


def test_not_a_jit_checkpoint_names_found_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {}, "optimizer": {}}, path)
    with pytest.raises(CheckpointError, match=r"not a JiT checkpoint.*found \['optimizer', 'state_dict'\]"):
        load_jit_checkpoint(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_jit_checkpoint(path)


def test_truncated_file(tmp_path, official_tiny_ckpt_path):
    path = tmp_path / "trunc.pth"
    path.write_bytes(official_tiny_ckpt_path.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_jit_checkpoint(path)


def test_legacy_non_zip_checkpoint_loads_like_the_zip_one(tmp_path, official_tiny_ckpt_path):
    """torch.save(..., _use_new_zipfile_serialization=False) files cannot be memory-mapped."""
    original = torch.load(official_tiny_ckpt_path, weights_only=False)
    legacy = tmp_path / "legacy.pth"
    torch.save(original, legacy, _use_new_zipfile_serialization=False)
    for weights in ("model", "model_ema1"):
        state, meta = load_jit_checkpoint(legacy, weights)
        expected, _ = load_jit_checkpoint(official_tiny_ckpt_path, weights)
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state)
        assert meta["variant"] == "JiT-T/4" and meta["epoch"] == 2
    # a legacy file cut short is still reported as such
    truncated = tmp_path / "legacy_truncated.pth"
    truncated.write_bytes(legacy.read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_jit_checkpoint(truncated)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_object_outside_allowlist_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*outside the allowlist.*arbitrary code"):
        load_jit_checkpoint(path)


def test_architecture_mismatch_names_keys_and_fitting_variant(tmp_path, official_tiny_ckpt_path):
    with pytest.raises(CheckpointError,
                       match=r"architecture mismatch.*(missing|unexpected|shape).*fits the registered variant\(s\): JiT-T/4"):
        build_denoiser_from_checkpoint(official_tiny_ckpt_path, variant="JiT-S/4")


def test_shape_mismatch_is_listed(official_tiny_ckpt_path):
    with pytest.raises(CheckpointError, match=r"shape mismatches .*net\.x_embedder\.proj1\.weight"):
        build_denoiser_from_checkpoint(official_tiny_ckpt_path, variant="JiT-T/4", bottleneck_dim=8)


def test_unknown_weights_name(official_tiny_ckpt_path):
    with pytest.raises(CheckpointError, match="weights must be one of model, model_ema1, model_ema2"):
        load_jit_checkpoint(official_tiny_ckpt_path, "ema")


def test_unknown_variant_name_lists_known(official_tiny_ckpt_path):
    with pytest.raises(KeyError, match="unknown JiT variant 'JiT-Q/2'; known variants: JiT-B/16"):
        build_denoiser_from_checkpoint(official_tiny_ckpt_path, variant="JiT-Q/2")
