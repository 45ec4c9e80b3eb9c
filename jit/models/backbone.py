"""JiT: a plain Vision Transformer that predicts the clean image from a noisy one.

Parameter names and shapes equal the official release (`net.` prefix inside the
Denoiser), so official checkpoints load with `strict=True`.
"""

import torch
import torch.nn as nn

from .layers import (
    BottleneckPatchEmbed,
    FinalLayer,
    JiTBlock,
    LabelEmbedder,
    TimestepEmbedder,
    VisionRotaryEmbeddingFast,
    sincos_pos_embed_2d,
)


class JiT(nn.Module):
    def __init__(
        self,
        input_size=256,
        patch_size=16,
        in_channels=3,
        hidden_size=1024,
        depth=24,
        num_heads=16,
        mlp_ratio=4.0,
        attn_drop=0.0,
        proj_drop=0.0,
        num_classes=1000,
        bottleneck_dim=128,
        in_context_len=32,
        in_context_start=8,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(
                f"image size {input_size} is not divisible by the patch size {patch_size}; "
                f"use a multiple of {patch_size} (e.g. {max(patch_size, input_size // patch_size * patch_size)})"
            )
        if hidden_size % num_heads or (hidden_size // num_heads) % 4:
            raise ValueError(
                f"hidden_size {hidden_size} must split into {num_heads} heads whose size is a multiple of 4 (2-D RoPE)"
            )
        if in_context_len > 0 and not 0 <= in_context_start < depth:
            raise ValueError(f"in_context_start={in_context_start} must lie in [0, depth={depth})")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.input_size = input_size
        self.in_context_len = in_context_len
        self.in_context_start = in_context_start
        self.num_classes = num_classes

        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.x_embedder = BottleneckPatchEmbed(input_size, patch_size, in_channels, bottleneck_dim, hidden_size)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        if in_context_len > 0:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
            nn.init.normal_(self.in_context_posemb, std=0.02)

        half_head_dim = hidden_size // num_heads // 2
        grid = input_size // patch_size
        self.feat_rope = VisionRotaryEmbeddingFast(half_head_dim, pt_seq_len=grid, num_cls_token=0)
        self.feat_rope_incontext = VisionRotaryEmbeddingFast(half_head_dim, pt_seq_len=grid,
                                                             num_cls_token=in_context_len)

        # Dropout only in the middle half of the blocks, as in the official recipe.
        def in_middle(i):
            return depth // 4 <= i < depth // 4 * 3

        self.blocks = nn.ModuleList([
            JiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio,
                     attn_drop=attn_drop if in_middle(i) else 0.0,
                     proj_drop=proj_drop if in_middle(i) else 0.0)
            for i in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def xavier_linear(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier_linear)
        grid = self.input_size // self.patch_size
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, grid).unsqueeze(0))
        # The patch projections are initialised like linear layers, not convolutions.
        for conv in (self.x_embedder.proj1, self.x_embedder.proj2):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj2.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x, p):
        """[N, T, p*p*C] tokens -> [N, C, H, W] image."""
        c = self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        """x: [N, C, H, W] noisy image, t: [N] time in [0, 1], y: [N] labels (num_classes = null)."""
        t_emb = self.t_embedder(t)
        y_emb = self.y_embedder(y)
        c = t_emb + y_emb

        x = self.x_embedder(x) + self.pos_embed
        for i, block in enumerate(self.blocks):
            if self.in_context_len > 0 and i == self.in_context_start:
                # class tokens join the sequence part-way through the network
                in_context = y_emb.unsqueeze(1).expand(-1, self.in_context_len, -1) + self.in_context_posemb
                x = torch.cat([in_context, x], dim=1)
            rope = self.feat_rope if i < self.in_context_start else self.feat_rope_incontext
            x = block(x, c, rope)
        x = x[:, self.in_context_len:]
        x = self.final_layer(x, c)
        return self.unpatchify(x, self.patch_size)
