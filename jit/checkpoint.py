"""Official JiT checkpoint I/O: safe loading, architecture checks, official-layout export.

An official `checkpoint-last.pth` is a dict with `model`, `model_ema1`, `model_ema2`
(Denoiser state dicts, keys prefixed `net.`), `epoch`, `args` (an argparse.Namespace)
and usually `optimizer`. Files are read with `torch.load(weights_only=True)`; the only
class admitted beyond tensors and containers is `argparse.Namespace`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from jit.atomic import atomic_torch_save
from jit.models import VARIANTS, Denoiser, build_jit

WEIGHT_KEYS = ("model", "model_ema1", "model_ema2")
SAFE_GLOBALS = [argparse.Namespace]
# Settings an official checkpoint's `args` record that change what the model generates,
# with the config key that sets each of them here.
GENERATION_ARGS = {
    "img_size": "model.net.input_size",
    "class_num": "model.net.num_classes",
    "noise_scale": "model.denoiser.noise_scale",
    "t_eps": "model.denoiser.t_eps",
}


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says why and what was found."""


def safe_load(path: str | os.PathLike, mmap: bool = False) -> dict:
    """torch.load restricted to tensors, containers and argparse.Namespace.

    `mmap=True` maps the tensors instead of reading them (cheap peeks at large files).
    Legacy (non-zip) files cannot be mapped and are read whole.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint is not readable (permissions): {path}")
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "global" in str(err).lower():
            raise CheckpointError(
                f"refusing to load {path}: it contains a pickled object outside the allowlist "
                f"(tensors, containers, argparse.Namespace); unrestricted unpickling of a user "
                f"file could run arbitrary code. Loader said: {first_line}"
            ) from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {first_line}") from None
    except Exception as err:  # torch raises many types for corrupt or truncated files
        raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt or truncated?): {err}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def check_finite_weights(state: dict, source: str) -> None:
    """A NaN or Inf weight is refused once, here, naming the parameter; left in, it would
    surface much later as a silent garbage FID or as an error in some downstream layer."""
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(value.isfinite().all()):
            raise CheckpointError(f"{source}: parameter {name} holds NaN or Inf values")


def _args_dict(args) -> dict:
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, dict):
        return dict(args)
    return {}


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def infer_architecture(state_dict: dict) -> dict:
    """Architecture readable from tensor shapes (`in_context_start` is not; the FFN width is given as is)."""
    sd = {k.removeprefix("net."): v for k, v in state_dict.items()}
    hidden = sd["pos_embed"].shape[-1]
    patch = sd["x_embedder.proj1.weight"].shape[-1]
    num_patches = sd["pos_embed"].shape[1]
    head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return dict(
        input_size=int(round(num_patches ** 0.5)) * patch,
        patch_size=patch,
        in_channels=sd["x_embedder.proj1.weight"].shape[1],
        hidden_size=hidden,
        depth=depth,
        num_heads=hidden // head_dim,
        ffn_hidden=sd["blocks.0.mlp.w3.weight"].shape[1],
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        bottleneck_dim=sd["x_embedder.proj1.weight"].shape[0],
        in_context_len=sd["in_context_posemb"].shape[1] if "in_context_posemb" in sd else 0,
    )


def matching_variants(state_dict: dict) -> list[str]:
    """Registered variants whose parameter shapes equal those of `state_dict`."""
    try:
        arch = infer_architecture(state_dict)
    except (KeyError, IndexError, ValueError):
        return []
    names = []
    for name, kw in VARIANTS.items():
        fixed = {k: kw[k] for k in ("depth", "hidden_size", "num_heads", "bottleneck_dim", "in_context_len", "patch_size")}
        if all(arch[k] == v for k, v in fixed.items()):
            names.append(name)
    return names


def load_jit_checkpoint(path, weights: str = "model_ema1", ckpt: Mapping | None = None,
                        check_finite: bool = True) -> tuple[dict, dict]:
    """Read an official checkpoint: (Denoiser state dict with `net.` keys, meta).

    `meta` holds `variant` (args.model when it names a registered variant, else the
    registered variant whose shapes fit, else None), `img_size`, `num_classes`, `epoch`,
    the Denoiser hyper-parameters found in `args`, `weights`, `path` and `args` itself.
    `ckpt`: the file's contents when the caller has read them already (`safe_load` of
    `path`, memory-mapped), so one run reads a checkpoint once. `check_finite=False`
    skips the NaN/Inf scan (which reads every tensor) for callers that only need meta.
    """
    if weights not in WEIGHT_KEYS:
        raise CheckpointError(f"weights must be one of {', '.join(WEIGHT_KEYS)}, got {weights!r}")
    # Memory-mapped: only the chosen weights are read (not the other EMAs or the optimizer).
    if ckpt is None:
        ckpt = safe_load(path, mmap=True)
    if weights not in ckpt:
        present = [k for k in WEIGHT_KEYS if k in ckpt]
        if not present:
            raise CheckpointError(
                f"{path} is not a JiT checkpoint: expected keys {list(WEIGHT_KEYS)} plus 'args' and 'epoch', "
                f"found {sorted(map(str, ckpt))[:12]}"
            )
        raise CheckpointError(f"{path} has no {weights!r} weights; available: {present}")
    state = ckpt[weights]
    if not isinstance(state, dict) or not state or not all(str(k).startswith("net.") for k in state):
        raise CheckpointError(f"{path}[{weights!r}] is not a JiT Denoiser state dict (keys must start with 'net.')")
    if check_finite:
        check_finite_weights(state, f"{path}[{weights!r}]")
    args = _args_dict(ckpt.get("args"))
    arch = infer_architecture(state)
    fits = matching_variants(state)
    named = args.get("model")
    variant = named if named in VARIANTS else (fits[0] if fits else None)
    meta = dict(
        path=str(path),
        weights=weights,
        variant=variant,
        img_size=args.get("img_size", arch["input_size"]),
        num_classes=args.get("class_num", arch["num_classes"]),
        epoch=ckpt.get("epoch"),
        architecture=arch,
        args=args,
    )
    for key in ("P_mean", "P_std", "t_eps", "noise_scale", "label_drop_prob"):
        if key in args:
            meta[key] = args[key]
    return state, meta


def generation_settings(path, weights: str = "model_ema1", ckpt: Mapping | None = None) -> dict:
    """{config key: value} of what an official checkpoint was trained with.

    From its `args` where they record it; resolution and class count otherwise from the
    tensor shapes, which always tell them. `ckpt`: as in `load_jit_checkpoint`.
    """
    _, meta = load_jit_checkpoint(path, weights, ckpt, check_finite=False)
    found = {key: meta["args"][arg] for arg, key in GENERATION_ARGS.items() if arg in meta["args"]}
    found.setdefault("model.net.input_size", meta["architecture"]["input_size"])
    found.setdefault("model.net.num_classes", meta["architecture"]["num_classes"])
    if meta["variant"] is not None:
        found = {"model.net.name": meta["variant"], **found}
    return found


def overrides_that_fit(state_dict: dict) -> str | None:
    """Command-line overrides that build a model the tensor shapes of `state_dict` fit."""
    fits = matching_variants(state_dict)
    if not fits:
        return None
    arch = infer_architecture(state_dict)
    return (f"model.net.name={fits[0]} model.net.input_size={arch['input_size']} "
            f"model.net.num_classes={arch['num_classes']}")


def describe_mismatch(model: torch.nn.Module, state_dict: dict, limit: int = 5) -> str | None:
    """Human-readable difference between a model and a state dict, or None if they match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {missing[:limit]}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:limit]}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): {shapes[:limit]}")
    return "; ".join(parts)


def load_into(denoiser: Denoiser, state_dict: dict, source: str = "checkpoint") -> None:
    """Strict load with an error that names the differences and a registered variant that fits."""
    problem = describe_mismatch(denoiser, state_dict)
    if problem:
        fits = matching_variants(state_dict)
        hint = (f" The checkpoint fits the registered variant(s): {', '.join(fits)}; build it with the "
                f"overrides {overrides_that_fit(state_dict)}." if fits else "")
        raise CheckpointError(f"architecture mismatch loading {source}: {problem}.{hint}")
    denoiser.load_state_dict(state_dict, strict=True)


def build_denoiser_from_checkpoint(path, weights: str = "model_ema1", variant: str | None = None,
                                   **overrides) -> tuple[Denoiser, dict]:
    """Build the Denoiser an official checkpoint describes and load its weights strictly."""
    state, meta = load_jit_checkpoint(path, weights)
    name = variant or meta["variant"]
    if name is None:
        raise CheckpointError(
            f"cannot tell which JiT variant {path} holds (args.model={meta['args'].get('model')!r}, "
            f"inferred shapes {meta['architecture']}); pass variant=<one of {', '.join(VARIANTS)}>"
        )
    net = build_jit(name, input_size=meta["img_size"], num_classes=meta["num_classes"], **overrides)
    hyper = {k: meta[k] for k in ("P_mean", "P_std", "t_eps", "noise_scale", "label_drop_prob") if k in meta}
    denoiser = Denoiser(net, meta["num_classes"], **hyper)
    load_into(denoiser, state, source=f"{path}[{weights!r}] into {name}")
    meta["variant"] = name
    return denoiser, meta


# torch.save to a temporary file beside `path`, then rename over it (`jit.atomic`).
atomic_save = atomic_torch_save


def save_official_checkpoint(path, model: dict, model_ema1: dict | None = None, model_ema2: dict | None = None,
                             args: dict | argparse.Namespace | None = None, epoch: int = 0) -> None:
    """Write the official layout (readable by the official code and by `load_jit_checkpoint`).

    State dicts must be Denoiser state dicts (`net.` keys); EMA weights default to `model`.
    """
    for name, sd in (("model", model), ("model_ema1", model_ema1), ("model_ema2", model_ema2)):
        if sd is not None and not all(k.startswith("net.") for k in sd):
            raise CheckpointError(f"{name} must be a Denoiser state dict with 'net.' keys")

    copies: dict[int, dict] = {}

    def cpu(sd):
        # the same dict given twice is stored once (torch.save keeps shared storages shared)
        if id(sd) not in copies:
            copies[id(sd)] = {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}
        return copies[id(sd)]

    ns = args if isinstance(args, argparse.Namespace) else argparse.Namespace(**(args or {}))
    atomic_save({
        "model": cpu(model),
        "model_ema1": cpu(model_ema1 if model_ema1 is not None else model),
        "model_ema2": cpu(model_ema2 if model_ema2 is not None else model),
        "epoch": int(epoch),
        "args": ns,
    }, path)


def official_args(hparams: Mapping, epoch: int = 0) -> argparse.Namespace:
    """The `args` Namespace of an official checkpoint, filled from JiTModule's hyper-parameters.

    Names follow the official `main_jit.py` so its tools (and `load_jit_checkpoint`) read them.
    """
    net, den, opt = hparams["net"], hparams["denoiser"], hparams["optim"]
    ema, smp = hparams["ema"], hparams["sampler"]
    return argparse.Namespace(
        model=net["name"],
        img_size=net["input_size"],
        class_num=net["num_classes"],
        attn_dropout=net.get("attn_drop", 0.0),
        proj_dropout=net.get("proj_drop", 0.0),
        label_drop_prob=den["label_drop_prob"],
        P_mean=den["P_mean"],
        P_std=den["P_std"],
        noise_scale=den["noise_scale"],
        t_eps=den["t_eps"],
        ema_decay1=ema["decay1"],
        ema_decay2=ema["decay2"],
        sampling_method=smp["method"],
        num_sampling_steps=smp["steps"],
        cfg=smp["cfg_scale"],
        interval_min=smp["interval"][0],
        interval_max=smp["interval"][1],
        blr=opt["blr"],
        min_lr=opt["min_lr"],
        weight_decay=opt["weight_decay"],
        lr_schedule=opt["schedule"],
        warmup_steps=opt["warmup_steps"],
        epoch=epoch,
    )


def official_state(raw: Mapping[str, torch.Tensor], ema_shadows: Sequence[Mapping[str, torch.Tensor]],
                   hparams: Mapping, epoch: int) -> dict:
    """{"model", "model_ema1", "model_ema2", "epoch", "args"} as the official code writes it.

    `raw`: the Denoiser's training state dict; `ema_shadows`: the two EMAs' averaged
    parameters by name. An EMA entry is the raw state dict with its averaged parameters put
    in (buffers are not averaged). Every tensor is copied to the CPU.
    """
    raw = {k: v.detach().cpu().clone() for k, v in raw.items()}
    ema1, ema2 = ({**raw, **{k: v.detach().cpu().clone() for k, v in shadow.items()}} for shadow in ema_shadows)
    return {"model": raw, "model_ema1": ema1, "model_ema2": ema2, "epoch": int(epoch),
            "args": official_args(hparams, int(epoch))}


def official_state_from_lightning(ckpt: Mapping) -> dict:
    """The official layout (`official_state`) of a JiTModule Lightning checkpoint dict."""
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(
            "not a JiTModule Lightning checkpoint: 'state_dict' or 'hyper_parameters' missing"
        )
    if "ema" not in ckpt:
        raise CheckpointError(
            "the Lightning checkpoint holds no 'ema' state (was it written by JiTModule?)"
        )
    return official_state(_denoiser_state(ckpt), ckpt["ema"]["shadows"], ckpt["hyper_parameters"],
                          int(ckpt.get("epoch", 0)))


def check_lightning_checkpoint(ckpt: Mapping) -> None:
    """A JiTModule Lightning checkpoint to resume from holds the EMA state, and finite weights."""
    if "ema" not in ckpt:
        raise CheckpointError(
            "the checkpoint holds no 'ema' state; it was not written by JiTModule "
            "(to start from an official checkpoint use init_checkpoint)"
        )
    check_finite_weights(ckpt["state_dict"], "checkpoint state_dict")
    for i, shadow in enumerate(ckpt["ema"]["shadows"]):
        check_finite_weights(shadow, f"checkpoint EMA {i + 1}")


def _denoiser_state(ckpt: Mapping) -> dict:
    """The Denoiser's entries of a JiTModule Lightning checkpoint, without the `denoiser.` prefix."""
    return {k.removeprefix("denoiser."): v for k, v in ckpt["state_dict"].items() if k.startswith("denoiser.")}


def lightning_weights(ckpt: Mapping, ema_index: int | None, source: str) -> dict:
    """The Denoiser state dict of a JiTModule Lightning checkpoint with its raw weights
    (`ema_index` None) or with EMA `ema_index`'s averaged parameters over them (buffers are
    not averaged), checked finite."""
    if "ema" not in ckpt:
        raise CheckpointError(f"{source} holds no 'ema' state; it was not written by JiTModule "
                              "(to start from an official checkpoint use init_checkpoint)")
    state = _denoiser_state(ckpt)
    if ema_index is not None:
        state.update(ckpt["ema"]["shadows"][ema_index])
    label = "raw" if ema_index is None else f"ema{ema_index + 1}"
    check_finite_weights(state, f"{source} ({label} weights)")
    return state


def official_ema_weights(path) -> dict[int, dict]:
    """{EMA index: averaged parameters} of the EMAs an official checkpoint holds (0 for
    model_ema1, 1 for model_ema2; an absent one is left out), each checked finite."""
    ckpt = safe_load(path, mmap=True)  # only the EMA tensors are read from it
    found = {}
    for index, key in enumerate(("model_ema1", "model_ema2")):
        if key in ckpt:
            check_finite_weights(ckpt[key], f"{path}[{key!r}]")
            found[index] = dict(ckpt[key].items())
    return found
