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
