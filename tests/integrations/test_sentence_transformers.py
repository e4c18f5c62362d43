"""MarginSoftmaxLoss in SentenceTransformerTrainer: the loss, where the class weight is saved, resuming.

Skipped without sentence-transformers (and its training extras, ``datasets``/``accelerate``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from datasets import Dataset  # noqa: E402
from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,  # noqa: E402
                                   SentenceTransformerTrainingArguments)
from sentence_transformers.sentence_transformer.modules import StaticEmbedding  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: E402

import marginops as mo  # noqa: E402
from marginops.integrations.sentence_transformers import (ClassCentres, MarginSoftmaxLoss,  # noqa: E402
                                                          without_centres)

GROUPS = 40


def corpus():
    """Texts of ``GROUPS`` paraphrase groups: each group shares two made-up words."""
    g = torch.Generator().manual_seed(0)
    words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (5,), generator=g)) for _ in range(2 * GROUPS)]
    texts, labels = [], []
    for i in range(8 * GROUPS):
        c = i % GROUPS
        texts.append(f"{words[2 * c]} {words[(7 * i) % len(words)]} {words[2 * c + 1]}")
        labels.append(c)
    return texts, labels


def tokenizer(texts):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    return tok


def make_model(tok, seed: int) -> SentenceTransformer:
    torch.manual_seed(seed)
    return SentenceTransformer(modules=[StaticEmbedding(tok, embedding_dim=16)], device="cpu")


def trainer(model, loss, out, epochs=2, seed=0):
    texts, labels = corpus()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=0.05,
        save_strategy="epoch", logging_steps=5, report_to="none", seed=seed, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0)
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(
        {"text": texts, "label": labels}), loss=loss)


@pytest.fixture(scope="module")
def tok():
    return tokenizer(corpus()[0])


def test_loss_is_the_margin_cross_entropy_of_the_embeddings(tok):
    model = make_model(tok, 0)
    loss = MarginSoftmaxLoss(model, GROUPS, margin=mo.ArcFace(0.3), scale=20.0, backend="torch")
    assert isinstance(model[-1], ClassCentres) and loss.centres is model[-1]
    texts, labels = corpus()
    features = model.preprocess(texts[:24])
    y = torch.tensor(labels[:24])
    got = loss([features], y)
    emb = model(model.preprocess(texts[:24]))["sentence_embedding"]
    expect = mo.margin_cross_entropy(emb, model[-1].weight, y, mo.ArcFace(0.3), 20.0, backend="reference")
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    # two text columns: each column is a sample of the row's class
    got2 = loss([model.preprocess(texts[:12]), model.preprocess(texts[12:24])], y[:12])
    emb2 = torch.cat([model(model.preprocess(texts[:12]))["sentence_embedding"],
                      model(model.preprocess(texts[12:24]))["sentence_embedding"]])
    expect2 = mo.margin_cross_entropy(emb2, model[-1].weight, y[:12].repeat(2), mo.ArcFace(0.3), 20.0,
                                      backend="reference")
    torch.testing.assert_close(got2, expect2, rtol=1e-5, atol=1e-6)


def test_checkpoints_hold_the_centres_and_training_resumes_with_them(tok, tmp_path):
    # an uninterrupted run of two epochs, a checkpoint after each
    model_a = make_model(tok, 0)
    loss_a = MarginSoftmaxLoss(model_a, GROUPS)
    trainer(model_a, loss_a, tmp_path / "a").train()
    ckpts = sorted((tmp_path / "a").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(ckpts) == 2
    saved = SentenceTransformer(str(ckpts[-1]), device="cpu", trust_remote_code=True)
    assert isinstance(saved[-1], ClassCentres)
    assert (ckpts[-1] / "1_ClassCentres" / "model.safetensors").exists()
    torch.testing.assert_close(saved[-1].weight, model_a[-1].weight, rtol=0, atol=0)
    # a fresh process's view: another initialization (another seed), resumed from the first checkpoint
    model_b = make_model(tok, 1)
    loss_b = MarginSoftmaxLoss(model_b, GROUPS)
    assert not torch.allclose(model_b[-1].weight, model_a[-1].weight)
    trainer(model_b, loss_b, tmp_path / "a").train(resume_from_checkpoint=str(ckpts[0]))
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-7)


def test_saved_model_reloads_with_the_centres(tok, tmp_path):
    model = make_model(tok, 0)
    loss = MarginSoftmaxLoss(model, GROUPS, sub_centers=2)
    with torch.no_grad():
        model[-1].weight.normal_()
    model.save(str(tmp_path / "m"))
    again = SentenceTransformer(str(tmp_path / "m"), device="cpu", trust_remote_code=True)
    assert isinstance(again[-1], ClassCentres) and again[-1].sub_centers == 2
    torch.testing.assert_close(again[-1].weight, model[-1].weight, rtol=0, atol=0)
    texts = corpus()[0][:5]
    torch.testing.assert_close(torch.as_tensor(again.encode(texts)), torch.as_tensor(model.encode(texts)))
    # a second loss on the reloaded model reuses its centres; a different shape is refused
    assert MarginSoftmaxLoss(again, GROUPS, sub_centers=2).centres is again[-1]
    with pytest.raises(ValueError, match="without_centres"):
        MarginSoftmaxLoss(again, GROUPS + 1)
    answers, cos = again[-1].answer_or_abstain(torch.as_tensor(again.encode(texts)), threshold=-1.0)
    assert answers.shape == (5,) and (answers >= 0).all()
    assert len(without_centres(again)) == 1 and loss.num_classes == GROUPS


def test_bad_options(tok):
    model = make_model(tok, 0)
    with pytest.raises(TypeError, match="unknown option"):
        MarginSoftmaxLoss(model, GROUPS, return_stats=True)
    with pytest.raises(ValueError, match="scalar"):
        MarginSoftmaxLoss(model, GROUPS, reduction="none")
