"""Small synthetic demonstration episodes for tests and benchmarks (no simulator, no dataset on disk)."""

from __future__ import annotations

import numpy as np

from ..data.lerobot import Episode
from ..types import ModalityConfigs

TASKS = ("move to the red square", "move to the mirror image of the red square")


def make_episodes(
    configs: ModalityConfigs,
    state_dims: dict[str, int],
    action_dims: dict[str, int],
    *,
    n_episodes: int = 6,
    length: int = 20,
    image_hw: tuple[int, int] = (32, 32),
    seed: int = 0,
) -> list[Episode]:
    """Episodes where a point moves to a target drawn in every camera (task 0) or to its mirror image (task 1).

    Every action key is a learnable function of the target, the first state key and the task text;
    values are in "physical" ranges far from [-1, 1] so that normalization matters.
    """
    rng = np.random.default_rng(seed)
    h, w = image_hw
    lang_keys = configs["language"].modality_keys if "language" in configs else []
    video_keys = configs["video"].modality_keys if "video" in configs else []
    episodes = []
    for index in range(n_episodes):
        task = index % len(TASKS)
        target = rng.uniform(0.2, 0.8, size=2)
        pos = np.zeros((length, 2), dtype=np.float32)
        pos[0] = rng.uniform(0.0, 1.0, size=2)
        goal = target if task == 0 else 1.0 - target
        for t in range(1, length):
            pos[t] = pos[t - 1] + 0.2 * (goal - pos[t - 1])
        delta = goal - pos
        states = {}
        for i, (key, dim) in enumerate(state_dims.items()):
            base = np.tile(pos, (1, (dim + 1) // 2))[:, :dim]
            states[key] = (base * (i + 1) * 10.0 + 5.0 * i).astype(np.float32)
        actions = {}
        for i, (key, dim) in enumerate(action_dims.items()):
            base = np.tile(delta, (1, (dim + 1) // 2))[:, :dim]
            actions[key] = (base * (i + 2) + 0.5 * i).astype(np.float32)
        videos = {}
        for c, key in enumerate(video_keys):
            frames = np.full((length, h, w, 3), 40 + 30 * c, dtype=np.uint8)
            ty, tx = int(target[0] * (h - 4)), int(target[1] * (w - 4))
            frames[:, ty : ty + 4, tx : tx + 4] = (220, 30, 30)
            for t in range(length):
                py, px = int(pos[t, 0].clip(0, 1) * (h - 3)), int(pos[t, 1].clip(0, 1) * (w - 3))
                frames[t, py : py + 3, px : px + 3] = (30, 220, 30)
            videos[key] = frames
        language = {k: [TASKS[task]] * length for k in lang_keys}
        episodes.append(Episode(index, length, states, actions, language, videos))
    return episodes
