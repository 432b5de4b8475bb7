"""Evaluation metrics on hand-made embeddings with known answers, and zero-shot end to end."""

import pytest
import torch

from pipeline.evaluate import evaluate_val, retrieval_recall, topk_accuracy


def test_topk_accuracy_known():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.0, 0.3, 0.2]])
    labels = torch.tensor([0, 1, 1, 0])
    acc = topk_accuracy(logits, labels, ks=(1, 2))
    assert acc[1] == pytest.approx(1 / 4)  # only row 0
    assert acc[2] == pytest.approx(3 / 4)  # rows 0, 1 and 2


def test_retrieval_recall_known():
    img = torch.eye(4)
    # text 0 and 1 match their images; text 2 is closest to image 3; text 3 to image 2
    txt = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0.4, 0.6], [0, 0, 0.6, 0.4]])
    r = retrieval_recall(img, txt, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(0.5) and r["t2i_r1"] == pytest.approx(0.5)
    assert r["i2t_r2"] == pytest.approx(1.0) and r["t2i_r2"] == pytest.approx(1.0)


def test_retrieval_ties_do_not_inflate():
    # every caption identical: the true one is tied with all others, so R@1 must not be 1
    img = torch.eye(3)
    txt = torch.ones(3, 3) / 3**0.5
    r = retrieval_recall(img, txt, ks=(1, 3))
    assert r["i2t_r1"] == 0.0 and r["i2t_r3"] == 1.0


def test_retrieval_with_repeated_captions_counts_the_same_text():
    # class captions: images 0, 1 show "cat", 2, 3 "dog"; a perfect class encoder maps every cat
    # image and text to one point. Asking for exactly text i is chance (ties, pessimistic: 0);
    # any text equal to the query's own caption is a hit.
    captions = ["a cat.", "a cat.", "a dog.", "a dog."]
    img = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    txt = img.clone()
    assert retrieval_recall(img, txt, ks=(1,))["i2t_r1"] == 0.0
    r = retrieval_recall(img, txt, ks=(1, 2), captions=captions)
    assert r["i2t_r1"] == r["t2i_r1"] == 1.0
    # an encoder that swaps the classes is not rescued by the repeats
    r = retrieval_recall(img, txt.flip(1), ks=(1, 2), captions=captions)
    assert r["i2t_r2"] == r["t2i_r2"] == 0.0
    # unique captions: the same numbers as without them
    uniq = [f"caption {i}" for i in range(4)]
    noisy = img + 0.1 * torch.arange(8.0).view(4, 2).sin()
    assert retrieval_recall(noisy, txt, captions=uniq) == retrieval_recall(noisy, txt)


def test_evaluate_val_passes_the_captions_to_retrieval():
    def encode(images, tokens):
        feats = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])
        return feats if images is not None else None, feats if tokens is not None else None

    batch = {
        "images": torch.zeros(3, 3, 2, 2),
        "tokens": torch.zeros(3, 1, dtype=torch.int64),
        "label": torch.tensor([0, 0, 1]),
        "captions": ["a cat.", "a cat.", "a dog."],
    }
    m = evaluate_val(encode, [batch], tokenizer=None)
    assert m["eval/i2t_r1"] == 1.0 and m["eval/samples"] == 3


def test_zero_shot_with_a_perfect_encoder():
    """An encoder that maps image i and any text naming class c to one-hot vectors."""
    classes = ["cat", "dog", "bird"]

    def tokenizer(texts):
        return torch.tensor([[next(i for i, c in enumerate(classes) if c in t)] for t in texts])

    def encode(images, tokens):
        img = (
            torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), 3).float()
            if images is not None
            else None
        )
        txt = torch.nn.functional.one_hot(tokens[:, 0], 3).float() if tokens is not None else None
        return img, txt

    labels = torch.tensor([0, 1, 2, 2, 1])
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    wrong = torch.tensor([1, 1, 2, 0, 1])  # captions: 3 of 5 right
    batch = {"images": images, "tokens": wrong.view(-1, 1), "label": labels}
    m = evaluate_val(encode, [batch], tokenizer, zeroshot=(classes, ["a {}.", "photo of {}"]))
    assert m["eval/zeroshot_top1"] == 1.0
    assert m["eval/samples"] == 5
