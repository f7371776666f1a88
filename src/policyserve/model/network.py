"""The visuomotor flow-matching network: image/state/text encoders, transformer trunk, action head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .rtc import Guidance, guided_velocity


class SpatialSoftmax(nn.Module):
    """Per-channel expected (x, y) image coordinates of a feature map: (N, C, H, W) -> (N, 2C)."""

    def forward(self, features: Tensor) -> Tensor:
        n, c, h, w = features.shape
        attention = torch.softmax(features.reshape(n, c, h * w), dim=-1)
        ys = torch.linspace(-1.0, 1.0, h, device=features.device, dtype=features.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=features.device, dtype=features.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        x = (attention * grid_x.reshape(1, 1, -1)).sum(-1)
        y = (attention * grid_y.reshape(1, 1, -1)).sum(-1)
        return torch.cat([x, y], dim=-1)


class ImageEncoder(nn.Module):
    """Small CNN trained from scratch: RGB in [0, 1], (N, 3, H, W) -> one d_model token per image."""

    def __init__(self, channels: list[int], d_model: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c_out in enumerate(channels):
            stride = 2 if i < len(channels) - 1 else 1
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU()]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        self.keypoints = SpatialSoftmax()
        self.proj = nn.Sequential(nn.Linear(3 * c_in, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, images: Tensor) -> Tensor:
        features = self.conv((images - 0.5) / 0.25)
        pooled = features.mean(dim=(2, 3))
        return self.proj(torch.cat([self.keypoints(features), pooled], dim=-1))


class TextEncoder(nn.Module):
    """Learned word embeddings, mean-pooled over non-padding tokens: (B, L) ids -> (B, d_model)."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(max_len, d_model))
        self.proj = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, ids: Tensor) -> Tensor:
        mask = (ids > 0).unsqueeze(-1).to(self.position.dtype)
        tokens = (self.embed(ids) + self.position[: ids.shape[1]]) * mask
        return self.proj(tokens.sum(1) / mask.sum(1).clamp(min=1.0))


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of flow times ``t`` in [0, 1]: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * 1000.0).unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _mlp(d_in: int, d_model: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, d_model), nn.SiLU(), nn.Linear(d_model, d_model))


class FlowMatchingPolicyNet(nn.Module):
    """Observation tokens -> transformer trunk -> flow-matching transformer head over the action chunk.

    Inputs are normalized: ``video[key]`` float (B, T, 3, S, S) in [0, 1], ``state[key]`` (B, T, D),
    ``text`` int64 (B, L). Actions are the normalized, concatenated chunk (B, action_horizon, action_dim).
    Flow time runs from 0 (noise) to 1 (data): ``x_t = (1 - t) noise + t action``, velocity ``action - noise``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.image_encoders = nn.ModuleDict({k: ImageEncoder(config.conv_channels, d) for k in config.video_keys})
        self.state_encoders = nn.ModuleDict({k: _mlp(dim, d) for k, dim in config.state_dims.items()})
        self.text_encoder = TextEncoder(config.text_vocab_size, config.text_max_len, d)
        n_obs_types = len(config.video_keys) + len(config.state_dims) + 1
        self.type_embed = nn.Parameter(torch.randn(n_obs_types, d) * 0.02)
        self.obs_time_embed = nn.Parameter(torch.randn(max(config.video_horizon, config.state_horizon), d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, config.n_heads, d * config.ff_mult, config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.trunk = nn.TransformerEncoder(layer, config.trunk_layers, enable_nested_tensor=False)
        self.trunk_norm = nn.LayerNorm(d)
        self.action_in = nn.Linear(config.action_dim, d)
        self.action_pos = nn.Parameter(torch.randn(config.action_horizon, d) * 0.02)
        self.time_mlp = _mlp(d, d)
        head_layer = nn.TransformerDecoderLayer(
            d, config.n_heads, d * config.ff_mult, config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.head = nn.TransformerDecoder(head_layer, config.head_layers)
        self.action_out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, config.action_dim))

    def encode(self, video: dict[str, Tensor], state: dict[str, Tensor], text: Tensor) -> Tensor:
        """Observation memory tokens (B, N, d_model)."""
        tokens: list[Tensor] = []
        type_id = 0
        for key, encoder in self.image_encoders.items():
            frames = video[key]
            b, t = frames.shape[:2]
            emb = encoder(frames.flatten(0, 1)).reshape(b, t, -1)
            tokens.append(emb + self.type_embed[type_id] + self.obs_time_embed[:t])
            type_id += 1
        for key, encoder in self.state_encoders.items():
            values = state[key]
            tokens.append(encoder(values) + self.type_embed[type_id] + self.obs_time_embed[: values.shape[1]])
            type_id += 1
        tokens.append((self.text_encoder(text) + self.type_embed[type_id]).unsqueeze(1))
        return self.trunk_norm(self.trunk(torch.cat(tokens, dim=1)))

    def velocity(self, memory: Tensor, noisy_actions: Tensor, t: Tensor) -> Tensor:
        """Predicted flow velocity (B, H, A) for noisy chunks at flow times ``t``: one per chunk (B,) or one per
        action step (B, H) (training-time RTC gives a committed prefix time 1)."""
        if t.dim() == 1:
            time = self.time_mlp(timestep_embedding(t, self.config.d_model)).unsqueeze(1)
        else:
            time = self.time_mlp(timestep_embedding(t.flatten(), self.config.d_model)).view(*t.shape, -1)
        x = self.action_in(noisy_actions) + self.action_pos + time
        return self.action_out(self.head(x, memory))

    def sample_time(self, batch: int, device: torch.device | None = None) -> Tensor:
        """Training flow times, skewed towards the noisy end (GR00T's Beta schedule)."""
        c = self.config
        beta = torch.distributions.Beta(torch.tensor(c.noise_beta_alpha), torch.tensor(c.noise_beta_beta))
        return ((c.noise_s - beta.sample((batch,))) / c.noise_s).clamp(0.0, 1.0).to(device)

    def loss(self, video: dict[str, Tensor], state: dict[str, Tensor], text: Tensor, actions: Tensor,
             delays: Tensor | None = None) -> Tensor:
        """Flow-matching MSE between predicted and true velocity on a batch of normalized chunks.

        Noise, flow times and (with ``rtc_max_delay``) each chunk's committed prefix length come from torch's
        global RNG (seeded by the trainer); ``delays`` (B,) sets the prefix lengths instead.
        """
        memory = self.encode(video, state, text)
        b = actions.shape[0]
        noise = torch.randn(actions.shape).to(actions.device)
        t = self.sample_time(b, actions.device)
        tt = t.view(b, 1, 1)
        noisy = (1.0 - tt) * noise + tt * actions
        if not self.config.rtc_max_delay and delays is None:
            return F.mse_loss(self.velocity(memory, noisy, t), actions - noise)
        # Training-time RTC: a committed prefix of d steps is given clean, at flow time 1, and not scored.
        if delays is None:
            delays = torch.randint(0, self.config.rtc_max_delay + 1, (b,), device=actions.device)
        prefix = torch.arange(actions.shape[1], device=actions.device).unsqueeze(0) < delays.view(b, 1)  # (B, H)
        noisy = torch.where(prefix.unsqueeze(-1), actions, noisy)
        times = torch.where(prefix, torch.ones_like(noisy[..., 0]), t.view(b, 1).expand(-1, actions.shape[1]))
        error = (self.velocity(memory, noisy, times) - (actions - noise)).square().mean(-1)
        scored = (~prefix).to(error.dtype)
        return (error * scored).sum() / scored.sum()

    @torch.no_grad()
    def sample(
        self, video: dict[str, Tensor], state: dict[str, Tensor], text: Tensor, noise: Tensor, steps: int | None = None,
        guidance: Guidance | None = None,
    ) -> Tensor:
        """Integrate the flow from ``noise`` (B, H, A) with ``steps`` Euler steps; normalized chunk out.

        With ``guidance`` the chunk inpaints the guidance targets (real-time chunking, see :mod:`.rtc`): its
        held steps (``guidance.held``, models trained with ``rtc_max_delay``) stay at the target at flow time 1,
        its weighted steps are guided.
        """
        steps = steps or self.config.num_inference_steps
        memory = self.encode(video, state, text)
        x = noise
        held = None if guidance is None else guidance.held  # (B, H) bool, or None
        guided = guidance is not None and guidance.guides
        for i in range(steps):
            t = torch.full((x.shape[0],), i / steps, device=x.device)
            if held is not None:
                x = torch.where(held.unsqueeze(-1), guidance.target, x)
                t = torch.where(held, torch.ones_like(held, dtype=t.dtype), t.unsqueeze(1))
            if not guided:
                v = self.velocity(memory, x, t)
            else:
                v = guided_velocity(lambda a, t=t: self.velocity(memory, a, t), x, i / steps, guidance)
            x = x + v / steps
        return x if held is None else torch.where(held.unsqueeze(-1), guidance.target, x)

