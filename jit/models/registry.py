"""Named JiT variants: the six official ones plus small ones for tests and the digits demo."""

from .backbone import JiT

# Architecture of each variant; input size, classes and dropout stay free.
VARIANTS: dict[str, dict] = {
    "JiT-B/16": dict(depth=12, hidden_size=768, num_heads=12, bottleneck_dim=128,
                     in_context_len=32, in_context_start=4, patch_size=16),
    "JiT-B/32": dict(depth=12, hidden_size=768, num_heads=12, bottleneck_dim=128,
                     in_context_len=32, in_context_start=4, patch_size=32),
    "JiT-L/16": dict(depth=24, hidden_size=1024, num_heads=16, bottleneck_dim=128,
                     in_context_len=32, in_context_start=8, patch_size=16),
    "JiT-L/32": dict(depth=24, hidden_size=1024, num_heads=16, bottleneck_dim=128,
                     in_context_len=32, in_context_start=8, patch_size=32),
    "JiT-H/16": dict(depth=32, hidden_size=1280, num_heads=16, bottleneck_dim=256,
                     in_context_len=32, in_context_start=10, patch_size=16),
    "JiT-H/32": dict(depth=32, hidden_size=1280, num_heads=16, bottleneck_dim=256,
                     in_context_len=32, in_context_start=10, patch_size=32),
    # The architecture of the parity fixture: fast enough for unit tests.
    "JiT-T/4": dict(depth=4, hidden_size=64, num_heads=4, bottleneck_dim=16,
                    in_context_len=4, in_context_start=2, patch_size=4),
    # The built-in digits model (16 px, 16 patches): trains on two CPU cores in minutes.
    "JiT-S/4": dict(depth=6, hidden_size=128, num_heads=4, bottleneck_dim=32,
                    in_context_len=4, in_context_start=2, patch_size=4),
}

OFFICIAL_VARIANTS = ("JiT-B/16", "JiT-B/32", "JiT-L/16", "JiT-L/32", "JiT-H/16", "JiT-H/32")


def variant_kwargs(name: str) -> dict:
    if name not in VARIANTS:
        raise KeyError(f"unknown JiT variant {name!r}; known variants: {', '.join(VARIANTS)}")
    return dict(VARIANTS[name])


def build_jit(name: str, **overrides) -> JiT:
    """Build a registered variant; `overrides` may set input_size, num_classes, dropout, ...

    Example: `build_jit("JiT-B/16", input_size=256, num_classes=1000)`.
    """
    return JiT(**{**variant_kwargs(name), **overrides})
