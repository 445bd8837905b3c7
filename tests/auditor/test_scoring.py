"""Zero-shot scoring through a runner equals using open_clip directly on the same inputs."""

from __future__ import annotations

import numpy as np
import open_clip
import torch

from auditor.data import iter_batches, load_image, open_dataset
from auditor.models import load_model
from auditor.scoring import DEFAULT_TEMPLATES, make_scorer, torch_runners


def test_scores_match_direct_open_clip(random_checkpoint, tiny_arch, test_data):
    loaded = load_model(random_checkpoint, tiny_arch)
    dataset = open_dataset(test_data)
    dataset.samples[:] = dataset.samples[::7]  # a spread of classes, kept small

    image_runner, text_runner = torch_runners(loaded)
    with image_runner, text_runner:
        scorer = make_scorer(loaded, dataset.classes, image_runner, text_runner)
        scores = scorer.score_batches(iter_batches(dataset, loaded.preprocess, batch_size=8))

    model = loaded.model
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            model,
            tokenizer=loaded.tokenizer,
            classnames=dataset.classes,
            templates=[t.format for t in DEFAULT_TEMPLATES],
            device="cpu",
            use_tqdm=False,
        )
        pixels = torch.stack([loaded.preprocess(load_image(dataset.absolute(s))) for s in dataset.samples])
        features = model.encode_image(pixels, normalize=True)
        probs = (model.logit_scale.exp() * features @ weights).softmax(dim=-1).numpy()

    assert scores.indices.tolist() == list(range(len(dataset.samples)))
    assert np.allclose(scores.embeddings, features.numpy(), atol=1e-5)
    assert np.allclose(scorer.class_weights, weights.T.numpy(), atol=1e-5)
    expected_top = np.argsort(-probs, axis=1, kind="stable")[:, : scores.topk.shape[1]]
    assert (scores.topk == expected_top).all()
    assert np.allclose(scores.probs, np.take_along_axis(probs, expected_top, axis=1), atol=1e-5)
    assert np.allclose(
        scores.margin, np.sort(probs, axis=1)[:, -1] - np.sort(probs, axis=1)[:, -2], atol=1e-5
    )


def test_batched_pixels_are_bit_for_bit_what_the_models_preprocess_gives(random_checkpoint, tiny_arch):
    """Any image size (resized and centre-cropped by the PIL steps), then the table lookup that
    stands for ToTensor + Normalize: equal to torchvision's own float32 arithmetic, exactly."""
    from PIL import Image

    from auditor.scoring import batch_pixels

    loaded = load_model(random_checkpoint, tiny_arch)
    rng = np.random.default_rng(3)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(64, 64, 3), (90, 41, 3), (7, 300, 3)]
    ]
    expected = torch.stack([loaded.preprocess(Image.fromarray(image)) for image in images]).numpy()
    assert np.array_equal(batch_pixels(images, loaded.preprocess), expected)


def test_a_preprocess_without_the_tensor_tail_is_run_as_it_is():
    """A transform that does not end in ToTensor + Normalize (here: its own scaling) is called
    per image, unchanged."""
    from auditor.scoring import batch_pixels

    def preprocess(picture):
        return torch.from_numpy(np.asarray(picture, np.float32).transpose(2, 0, 1) / 100.0)

    image = np.random.default_rng(4).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(batch_pixels([image], preprocess)[0], image.transpose(2, 0, 1) / np.float32(100.0))
