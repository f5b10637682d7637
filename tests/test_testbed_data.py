"""The testbed's procedural videos, prompt vocabulary, conditioning and PNG strips."""

import math

import numpy as np
import pytest
import torch

from sparse_vdit.testbed import data
from sparse_vdit.testbed.adherence import Adherence, check_video, check_videos
from sparse_vdit.testbed.strips import LABEL_HEIGHT, video_strip


def test_vocabulary_split_is_disjoint_and_covers_every_word():
    assert len(data.ALL_PROMPTS) == 2 * 6 * 4 * 6 - 2 * 6  # no spinning circles
    assert len(data.HELD_OUT) >= 8
    assert not set(data.HELD_OUT) & set(data.TRAIN_PROMPTS)
    assert set(data.HELD_OUT) | set(data.TRAIN_PROMPTS) == set(data.ALL_PROMPTS)
    train_words = {w for p in data.TRAIN_PROMPTS for w in p.text.split()}
    assert {w for p in data.HELD_OUT for w in p.text.split()} <= train_words


@pytest.mark.parametrize("text, word", [("huge red circle moving left", "huge"), ("small pink circle moving left", "pink"),
                                        ("small red star moving left", "star"), ("small red circle jumping", "jumping"),
                                        ("small red circle spinning", "circle"), ("red circle", "size colour shape motion")])
def test_bad_prompts_are_rejected_by_name(text, word):
    with pytest.raises(ValueError, match=word):
        data.Prompt.parse(text)


def test_prompt_embeddings_are_word_vectors_then_zeros():
    texts = ["small red circle moving left", "", "large cyan cross spinning"]
    emb = data.prompt_embeddings(texts)
    assert emb.shape == (3, data.TEXT_TOKENS, data.TEXT_DIM) and emb.dtype == torch.float32
    assert torch.equal(emb[0, 1], data.word_embedding("red"))
    assert torch.equal(emb[0, 4], data.word_embedding("left"))
    assert torch.count_nonzero(emb[0, 5:]) == 0 and torch.count_nonzero(emb[1]) == 0
    assert torch.count_nonzero(emb[2, 4:]) == 0 and torch.count_nonzero(emb[2, 3]) > 0
    assert torch.equal(emb, data.prompt_embeddings(texts))
    assert not torch.allclose(data.word_embedding("red"), data.word_embedding("blue"))
    with pytest.raises(ValueError, match="pink"):
        data.prompt_embeddings(["small pink circle moving left"])


def test_videos_are_seeded_and_in_range():
    prompts = [data.HELD_OUT[i] for i in (0, 3, 7)]
    a = data.render_videos(prompts, torch.Generator().manual_seed(5))
    b = data.render_videos(prompts, torch.Generator().manual_seed(5))
    c = data.render_videos(prompts, torch.Generator().manual_seed(6))
    assert a.shape == (3, 3, data.FRAMES, data.SIZE, data.SIZE)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.2
    with pytest.raises(ValueError, match="at least one"):
        data.render_videos([], torch.Generator())


def _red_centroids(video: torch.Tensor) -> torch.Tensor:
    """[F, 2] (x, y) centroid of the strongly red pixels of one video."""
    rgb = (video + 1) / 2
    red = (rgb[0] > 0.6) & (rgb[1] < 0.4) & (rgb[2] < 0.4)  # [F, H, W]
    ys, xs = torch.meshgrid(torch.arange(data.SIZE), torch.arange(data.SIZE), indexing="ij")
    count = red.sum((1, 2)).clamp_min(1)
    return torch.stack([(red * xs).sum((1, 2)) / count, (red * ys).sum((1, 2)) / count], 1)


@pytest.mark.parametrize("motion, axis, sign", [("moving left", 0, -1), ("moving right", 0, 1), ("moving up", 1, -1), ("moving down", 1, 1)])
def test_shapes_move_as_prompted(motion, axis, sign):
    prompts = [f"large red square {motion}"] * 6
    videos = data.render_videos(prompts, torch.Generator().manual_seed(11))
    for video in videos:
        c = _red_centroids(video)
        assert sign * (c[-2, axis] - c[1, axis]) > 5  # inner frames: the shape may touch the border


def test_spinning_shapes_rotate_in_place():
    videos = data.render_videos(["large red cross spinning"] * 4, torch.Generator().manual_seed(2))
    for video in videos:
        c = _red_centroids(video)
        assert (c - c.mean(0)).norm(dim=1).max() < 4
        red = ((video[0] + 1) / 2 > 0.6)
        assert (red[0] != red[4]).sum() > 10  # the silhouette changes


def _fitted_angle(mask: torch.Tensor, shape: str, period: float) -> float:
    """The rotation in [-period/2, period/2) of `shape`'s silhouette, centred at a `[H, W]` mask's
    centroid and sized from its area, that overlaps the mask best (steps of 0.02 rad)."""
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    area = float(mask.sum())
    dx, dy = xs - float((mask * xs).sum()) / area, ys - float((mask * ys).sum()) / area
    angles = torch.arange(-period / 2, period / 2, 0.02)
    c, s = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    u, v = (c * dx + s * dy)[:, None], (-s * dx + c * dy)[:, None]
    index = torch.full((len(angles),), data.SHAPES.index(shape))
    iou = []
    for scale in torch.linspace(0.8, 1.6, 9):
        inside = data.shape_sdf(index, u, v, (scale * math.sqrt(area / math.pi)).view(1, 1, 1, 1))[:, 0] < 0
        iou.append((inside & mask).sum((1, 2)) / (inside | mask).sum((1, 2)))
    return float(angles[int(torch.stack(iou).amax(0).argmax())])


@pytest.mark.parametrize("shape, period", [("square", math.pi / 2), ("triangle", 2 * math.pi / 3), ("cross", math.pi / 2)])
def test_shapes_stand_upright_unless_spinning(shape, period):
    # a random orientation would make each shape a mixture over rotation (see data.TILT)
    videos = data.render_videos([f"large red {shape} moving right"] * 8, torch.Generator().manual_seed(5))
    upright = 0
    for video in videos:
        red = ((video[0] + 1) / 2 > 0.6) & ((video[1] + 1) / 2 < 0.4)  # [F, H, W]
        upright += abs(_fitted_angle(red[data.FRAMES // 2], shape, period)) <= data.TILT + 0.05
    assert upright >= 6  # a passing bar may hide part of a shape


def test_training_batch_draws_training_prompts_only():
    videos, prompts = data.training_batch(16, torch.Generator().manual_seed(0))
    assert videos.shape[0] == 16 and all(p in data.TRAIN_PROMPTS for p in prompts)
    with pytest.raises(ValueError, match="batch"):
        data.training_batch(0, torch.Generator())


def test_strip_lays_frames_left_to_right():
    videos = torch.rand(2, 3, 5, 4, 6) * 2 - 1
    image = np.asarray(video_strip(videos, ["a", "b"], scale=2))
    assert image.shape == (2 * (8 + LABEL_HEIGHT), 5 * 6 * 2, 3)
    expected = ((videos[1, :, 3, 2, 5] + 1) * 127.5).round().to(torch.uint8).numpy()
    row = 8 + LABEL_HEIGHT + LABEL_HEIGHT + 2 * 2
    assert (image[row, (3 * 6 + 5) * 2] == expected).all()
    with pytest.raises(ValueError, match="labels"):
        video_strip(videos, ["a"])
    with pytest.raises(ValueError, match="B, 3, F, H, W"):
        video_strip(videos[0])


def test_adherence_accepts_the_procedural_videos():
    prompts = list(data.ALL_PROMPTS[::3])
    results = check_videos(data.render_videos(prompts, torch.Generator().manual_seed(1)), prompts)
    assert all(r.colour_right for r in results)
    assert sum(bool(r.motion_right) for r in results) >= len(prompts) - 1
    # the shape fit recognises the rendered shapes (a passing bar may hide part of one)
    assert sum(bool(r.shape_right) for r in results) >= len(prompts) - 3


def test_shape_fit_tells_the_four_shapes_apart():
    from sparse_vdit.testbed.adherence import shape_scores

    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for index, name in enumerate(data.SHAPES):
        for angle, radius in ((0.3, 7.0), (1.1, 5.0)):  # rotated, off-centre, two sizes
            c, s = math.cos(angle), math.sin(angle)
            u, v = c * (xs - 13.4) + s * (ys - 17.8), -s * (xs - 13.4) + c * (ys - 17.8)
            mask = data.shape_sdf(torch.tensor([index]), u[None, None], v[None, None],
                                  torch.tensor([radius])[:, None, None, None])[0] < 0  # [1, H, W]
            scores = shape_scores(mask.expand(3, 32, 32))
            assert data.SHAPES[int(scores.argmax())] == name, (name, angle, scores)
            assert scores[index] > 0.8
    assert shape_scores(torch.zeros(2, 32, 32, dtype=torch.bool)) is None  # nothing to fit
    blob = (xs - 16) ** 2 / 40 + (ys - 16) ** 2 / 6 < 1  # an ellipse: no shape fits it well
    assert float(shape_scores(blob[None]).max()) < 0.85


def test_adherence_rejects_wrong_colour_and_motion():
    video = data.render_videos(["large red square moving left"], torch.Generator().manual_seed(3))[0]
    assert check_video(video, "large red square moving left").motion_right
    assert not check_video(video, "large red square moving right").motion_right
    assert not check_video(video, "large blue square moving left").colour_right
    assert check_video(video, "large red square moving left").shape_right
    assert not check_video(video, "large red cross moving left").shape_right
    static = video[:, :1].expand_as(video)  # the first frame held still
    assert not check_video(static, "large red square moving left").motion_right
    assert check_video(static, "large red square spinning").motion_right
    blank = torch.full_like(video, -1.0)
    assert check_video(blank, "large red square moving left") == Adherence(False, None, (0.0, 0.0))
    with pytest.raises(ValueError, match="3, F, H, W"):
        check_video(video[None], "large red square moving left")
    with pytest.raises(ValueError, match="2 prompts"):
        check_videos(video[None], ["large red square moving left"] * 2)


def test_report_samples_training_prompts_only():
    from sparse_vdit.testbed.report import TRAIN_SAMPLE_PROMPTS

    assert len(TRAIN_SAMPLE_PROMPTS) == 8 and set(TRAIN_SAMPLE_PROMPTS) <= set(data.TRAIN_PROMPTS)
