"""Parity of the backbone and Denoiser with the official JiT code (fixtures made by it)."""

import pytest
import torch

from jit.checkpoint import load_jit_checkpoint
from jit.models import OFFICIAL_VARIANTS, VARIANTS, Denoiser, JiT, build_jit


def tiny_denoiser(cases, ckpt_path, weights):
    net = JiT(**cases["config"])
    denoiser = Denoiser(net, cases["config"]["num_classes"])
    state, _ = load_jit_checkpoint(ckpt_path, weights)
    denoiser.load_state_dict(state, strict=True)
    return denoiser.eval()


@pytest.mark.parametrize("weights", ["model", "model_ema1"])
def test_forward_matches_official(official_tiny_cases, official_tiny_ckpt_path, weights):
    cases = official_tiny_cases
    denoiser = tiny_denoiser(cases, official_tiny_ckpt_path, weights)
    with torch.no_grad():
        out = denoiser.net(cases["x"], cases["t"], cases["y"])
    assert (out - cases[f"out_{weights}"]).abs().max().item() <= 1e-4


def test_every_sampler_case_matches_official(official_tiny_cases, official_tiny_ckpt_path):
    cases = official_tiny_cases
    denoiser = tiny_denoiser(cases, official_tiny_ckpt_path, "model_ema1")
    assert len(cases["sampler"]) >= 3
    for case in cases["sampler"]:
        denoiser.t_eps = case["t_eps"]
        out = denoiser.generate(case["labels"], noise=case["z0"], steps=case["steps"], method=case["method"],
                                cfg_scale=case["cfg_scale"], interval=tuple(case["interval"]))
        err = (out - case["expected"]).abs().max().item()
        assert err <= 1e-3, f"{case['method']} steps={case['steps']} cfg={case['cfg_scale']}: {err}"


def reference_sample(denoiser, labels, z, steps, method, cfg_scale, interval, t_eps):
    """The official sampling loop as the fixture README states it, on float32 tensors only:
    every velocity runs both passes and picks the scale with a tensor comparison of t."""
    net, null = denoiser.net, torch.full_like(labels, denoiser.num_classes)
    low, high = interval
    times = torch.linspace(0.0, 1.0, steps + 1).view(-1, 1, 1, 1, 1).expand(-1, z.shape[0], 1, 1, 1)

    def velocity(z, t):
        v_cond = (net(z, t.flatten(), labels) - z) / (1.0 - t).clamp_min(t_eps)
        v_uncond = (net(z, t.flatten(), null) - z) / (1.0 - t).clamp_min(t_eps)
        scale = torch.where((t < high) & ((low == 0) | (t > low)), cfg_scale, 1.0)
        return v_uncond + scale * (v_cond - v_uncond)

    with torch.no_grad():
        for i in range(steps):
            t, t_next = times[i], times[i + 1]
            v = velocity(z, t)
            if method == "heun" and i < steps - 1:
                v = 0.5 * (v + velocity(z + (t_next - t) * v, t_next))
            z = z + (t_next - t) * v
    return z


def test_reference_sampler_reproduces_the_official_fixtures(official_tiny_cases, official_tiny_ckpt_path):
    denoiser = tiny_denoiser(official_tiny_cases, official_tiny_ckpt_path, "model_ema1")
    for case in official_tiny_cases["sampler"]:
        out = reference_sample(denoiser, case["labels"], case["z0"], case["steps"], case["method"],
                               case["cfg_scale"], case["interval"], case["t_eps"])
        assert (out - case["expected"]).abs().max().item() <= 1e-3


# float32 times that land exactly on a bound: t = 0.2 (5 steps), t = 0.7 (10 steps, high only)
# and both (10 steps). float32(0.2) > 0.2 and float32(0.7) < 0.7, so a float64 comparison
# would put both inside the interval.
@pytest.mark.parametrize("method, steps, interval", [
    ("euler", 5, (0.2, 0.9)), ("heun", 5, (0.2, 0.9)), ("euler", 10, (0.15, 0.7)), ("heun", 10, (0.2, 0.7)),
])
def test_cfg_interval_bounds_match_the_official_comparison(official_tiny_cases, official_tiny_ckpt_path,
                                                           method, steps, interval):
    times = torch.linspace(0.0, 1.0, steps + 1)
    assert any(bool((times == torch.tensor(b)).any()) for b in interval)
    denoiser = tiny_denoiser(official_tiny_cases, official_tiny_ckpt_path, "model_ema1")
    case = official_tiny_cases["sampler"][0]
    expected = reference_sample(denoiser, case["labels"], case["z0"], steps, method, 2.9, interval,
                                denoiser.t_eps)
    out = denoiser.generate(case["labels"], noise=case["z0"], steps=steps, method=method, cfg_scale=2.9,
                            interval=interval)
    assert (out - expected).abs().max().item() <= 1e-5


def test_guidance_mask_excludes_float32_bounds():
    times = torch.linspace(0.0, 1.0, 11)
    mask = Denoiser.guidance_mask(times, (0.2, 0.7))
    assert mask.tolist() == [False, False, False, True, True, True, True, False, False, False, False]
    assert Denoiser.guidance_mask(times, (0.0, 0.7))[0]


def test_denoiser_state_dict_is_the_official_wrappers(official_tiny_ckpt_path, official_tiny_cases):
    state, _ = load_jit_checkpoint(official_tiny_ckpt_path, "model")
    denoiser = Denoiser(JiT(**official_tiny_cases["config"]), 10)
    assert list(denoiser.state_dict()) == list(state)
    # rotary tables are derived, never stored
    assert not any("rope" in k for k in denoiser.state_dict())


def official_key_shapes(depth, hidden, heads, bottleneck, ctx_len, patch, img, classes, mlp_ratio=4.0, chans=3):
    """The official parameter table, written out from the official module tree."""
    ffn = int(int(hidden * mlp_ratio) * 2 / 3)
    n = (img // patch) ** 2
    table = {
        "net.pos_embed": (1, n, hidden),
        "net.t_embedder.mlp.0.weight": (hidden, 256), "net.t_embedder.mlp.0.bias": (hidden,),
        "net.t_embedder.mlp.2.weight": (hidden, hidden), "net.t_embedder.mlp.2.bias": (hidden,),
        "net.y_embedder.embedding_table.weight": (classes + 1, hidden),
        "net.x_embedder.proj1.weight": (bottleneck, chans, patch, patch),
        "net.x_embedder.proj2.weight": (hidden, bottleneck, 1, 1), "net.x_embedder.proj2.bias": (hidden,),
        "net.in_context_posemb": (1, ctx_len, hidden),
        "net.final_layer.norm_final.weight": (hidden,),
        "net.final_layer.linear.weight": (patch * patch * chans, hidden),
        "net.final_layer.linear.bias": (patch * patch * chans,),
        "net.final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "net.final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"net.blocks.{i}."
        table.update({
            b + "norm1.weight": (hidden,), b + "norm2.weight": (hidden,),
            b + "attn.q_norm.weight": (hidden // heads,), b + "attn.k_norm.weight": (hidden // heads,),
            b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
            b + "mlp.w12.weight": (2 * ffn, hidden), b + "mlp.w12.bias": (2 * ffn,),
            b + "mlp.w3.weight": (hidden, ffn), b + "mlp.w3.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    return table


OFFICIAL_ARCH = {  # depth, hidden, heads, bottleneck, in-context length, patch (from the paper's code)
    "JiT-B/16": (12, 768, 12, 128, 32, 16), "JiT-B/32": (12, 768, 12, 128, 32, 32),
    "JiT-L/16": (24, 1024, 16, 128, 32, 16), "JiT-L/32": (24, 1024, 16, 128, 32, 32),
    "JiT-H/16": (32, 1280, 16, 256, 32, 16), "JiT-H/32": (32, 1280, 16, 256, 32, 32),
}


@pytest.mark.parametrize("name", OFFICIAL_VARIANTS)
@pytest.mark.parametrize("img", [256, 512])
def test_official_variant_state_dict_layout(name, img):
    with torch.device("meta"):
        denoiser = Denoiser(build_jit(name, input_size=img, num_classes=1000), 1000)
    got = {k: tuple(v.shape) for k, v in denoiser.state_dict().items()}
    assert got == official_key_shapes(*OFFICIAL_ARCH[name], img=img, classes=1000)


def test_official_in_context_starts():
    starts = {name: VARIANTS[name]["in_context_start"] for name in OFFICIAL_VARIANTS}
    assert starts == {"JiT-B/16": 4, "JiT-B/32": 4, "JiT-L/16": 8, "JiT-L/32": 8, "JiT-H/16": 10, "JiT-H/32": 10}


def test_jit_b16_ffn_shapes_and_tokens():
    with torch.device("meta"):
        net = build_jit("JiT-B/16", input_size=256, num_classes=1000)
    assert tuple(net.blocks[0].mlp.w12.weight.shape) == (4096, 768)
    assert tuple(net.blocks[0].mlp.w3.weight.shape) == (768, 2048)
    assert net.x_embedder.num_patches + net.in_context_len == 288


def test_unknown_variant_lists_known():
    with pytest.raises(KeyError, match=r"unknown JiT variant 'JiT-X/8'.*JiT-B/16.*JiT-H/32"):
        build_jit("JiT-X/8")


def test_image_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match=r"image size 250 is not divisible by the patch size 16"):
        build_jit("JiT-B/16", input_size=250)


def test_wrong_input_resolution_is_named():
    net = build_jit("JiT-T/4", input_size=32, num_classes=10)
    with pytest.raises(ValueError, match=r"input image size \(16, 16\) does not match the model's \(32, 32\)"):
        net(torch.zeros(1, 3, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_loss_is_finite_and_backpropagates():
    torch.manual_seed(0)
    denoiser = Denoiser(build_jit("JiT-T/4", input_size=32, num_classes=10), 10).train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    loss = denoiser.loss(x, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in denoiser.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)


def test_generate_with_generator_is_reproducible_and_validates():
    denoiser = Denoiser(build_jit("JiT-T/4", input_size=32, num_classes=10), 10).eval()
    labels = torch.tensor([1, 2])
    a = denoiser.generate(labels, steps=2, generator=torch.Generator().manual_seed(3))
    b = denoiser.generate(labels, steps=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown sampling method 'ddim'"):
        denoiser.generate(labels, steps=2, method="ddim")
    with pytest.raises(ValueError, match=r"initial noise has shape \(1, 3, 32, 32\), expected \(2, 3, 32, 32\)"):
        denoiser.generate(labels, noise=torch.zeros(1, 3, 32, 32), steps=2)


def test_logit_normal_schedule_is_monotone_from_0_to_1():
    denoiser = Denoiser(build_jit("JiT-T/4", input_size=32, num_classes=10), 10)
    ts = denoiser.timesteps(10, "logit_normal")
    assert ts[0] == 0 and ts[-1] == 1 and torch.all(ts[1:] > ts[:-1])
