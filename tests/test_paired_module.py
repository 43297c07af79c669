"""The module on batches of paired fields: query-document, scored pairs, image-text."""

import pytest
import pytorch_lightning as pl
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_metric import losses
from lightning_metric.callbacks import SimilarityCorrelation
from lightning_metric.module import MetricLearningModule
from lightning_metric.paired import predicted_similarity
from lightning_metric.towers import TwoTowerEncoder


class ScoredPairs(Dataset):
    """Pairs of 6-d vectors whose gold score is their (noisy) cosine similarity, in [0, 1]."""

    def __init__(self, n, seed, with_target=True, fields=2):
        generator = torch.Generator().manual_seed(seed)
        self.a = torch.randn(n, 6, generator=generator)
        self.others = [self.a + torch.randn(n, 6, generator=generator) for _ in range(fields - 1)]
        cosine = torch.cosine_similarity(self.a, self.others[0], dim=1)
        self.target = ((cosine + 1) / 2) if with_target else None

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        item = {"inputs": [self.a[i], *(other[i] for other in self.others)]}
        if self.target is not None:
            item["target"] = self.target[i]
        return item


def fit(module, train, val, epochs=2, callbacks=()):
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, DataLoader(train, batch_size=16, shuffle=True),
                DataLoader(val, batch_size=32))
    return trainer


def test_a_scored_pair_loss_trains_and_its_correlation_is_logged_through_a_trainer():
    pl.seed_everything(0)
    module = MetricLearningModule(nn.Linear(6, 4), losses.CosineSimilarityLoss())
    before = module.encoder.weight.detach().clone()
    trainer = fit(module, ScoredPairs(64, 0), ScoredPairs(48, 1),
                  callbacks=[SimilarityCorrelation()])
    assert not torch.equal(before, module.encoder.weight)
    val = ScoredPairs(48, 1)
    with torch.no_grad():
        similarity = predicted_similarity([module.encoder(val.a), module.encoder(val.others[0])])
    metrics = trainer.callback_metrics
    assert metrics["val/spearman"].item() == pytest.approx(
        spearmanr(similarity, val.target).statistic, abs=1e-5)
    assert metrics["val/pearson"].item() == pytest.approx(
        pearsonr(similarity, val.target).statistic, abs=1e-5)
    assert torch.isfinite(metrics["val/loss"]) and torch.isfinite(metrics["train/loss_epoch"])


def test_in_batch_negative_and_three_field_losses_take_their_fields_in_order():
    pl.seed_everything(0)
    seen = []

    class Spy(losses.MultipleNegativesRankingLoss):
        loss_inputs = "pair"    # a subclass is outside the registry: it says its shape

        def forward(self, *fields):
            seen.append([f.detach() for f in fields])
            return super().forward(*fields)

    module = MetricLearningModule(nn.Identity(), Spy())
    batch = ScoredPairs(8, 0, with_target=False, fields=3)[slice(0, 8)]
    module._paired_loss(batch)
    assert [f.tolist() for f in seen[0]] == [f.tolist() for f in batch["inputs"]]


def test_a_margin_is_predicted_as_the_difference_of_two_similarities():
    query, pos, neg = torch.tensor([[1.0, 0]]), torch.tensor([[1.0, 1]]), torch.tensor([[0, 1.0]])
    assert predicted_similarity([query, pos, neg]).item() == pytest.approx(2 ** -0.5 - 0)


def test_a_batch_that_does_not_fit_the_loss_says_so():
    scored = ScoredPairs(4, 0)[slice(0, 4)]
    plain = ScoredPairs(4, 0, with_target=False)[slice(0, 4)]
    mnrl = MetricLearningModule(nn.Identity(), losses.MultipleNegativesRankingLoss())
    with pytest.raises(ValueError, match=r"MultipleNegativesRankingLoss takes 'pair' batches "
                                         r"\(at least 2 fields, no target\), got a batch of 2 "
                                         r"fields with a target"):
        mnrl._paired_loss(scored)
    cosine = MetricLearningModule(nn.Identity(), losses.CosineSimilarityLoss())
    with pytest.raises(ValueError, match="takes 'pair_score' batches .* without a target"):
        cosine._paired_loss(plain)
    with pytest.raises(ValueError, match="got \\(x, label\\) batches: use data=pairs"):
        cosine._training_loss(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]))
    triplet = MetricLearningModule(nn.Identity(), losses.TripletMarginLoss())
    with pytest.raises(ValueError, match="takes \\(x, label\\) batches .* got a batch of paired"):
        triplet._paired_loss(plain)


class Tokenizer:
    """Stands in for a Hugging Face tokenizer: only its presence is checked."""


class TextTower(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.tokenizer, self.embedding_size = Tokenizer(), size
        self.embed = nn.EmbeddingBag(10, size)

    def forward(self, batch):
        return self.embed(batch["input_ids"])


def test_two_towers_send_images_and_texts_to_their_own_tower():
    image = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    image.embedding_size = 4
    towers = TwoTowerEncoder(image, TextTower(4))
    images, texts = torch.randn(3, 3, 2, 2), {"input_ids": torch.tensor([[1, 2], [3, 4]])}
    assert torch.equal(towers(images), image(images))
    assert torch.equal(towers(texts), towers.text(texts))
    assert towers.tokenizer is towers.text.tokenizer and towers.embedding_size == 4
    with pytest.raises(ValueError, match="4-d and the text tower 8-d"):
        TwoTowerEncoder(image, TextTower(8))
    with pytest.raises(ValueError, match="has no .tokenizer"):
        TwoTowerEncoder(image, image)


def test_clip_trains_its_logit_scale_through_the_loss_optimizer():
    pl.seed_everything(0)
    image = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    image.embedding_size = 4
    towers = TwoTowerEncoder(image, TextTower(4))

    class ImageText(Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"inputs": [torch.randn(3, 2, 2), {"input_ids": torch.tensor([i % 10, 1])}]}

    module = MetricLearningModule(towers, losses.CLIPLoss())
    scale = module.loss.logit_scale.detach().clone()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(ImageText(), batch_size=8))
    assert len(trainer.optimizers) == 2 and not torch.equal(scale, module.loss.logit_scale)
    assert trainer.global_step == 4                    # steps count batches, not optimizers


def test_the_recipe_refuses_labelled_data_for_a_pair_loss_of_the_registry_or_the_users():
    from lightning_metric.builders import check_batch_shape
    from lightning_metric.data import DigitsDataModule

    class MyPairLoss(nn.Module):
        loss_inputs = "pair"     # outside the registry: the same rule as the module's

        def forward(self, query, doc):
            return (query - doc).pow(2).mean()

    for loss in (losses.MultipleNegativesRankingLoss(), MyPairLoss()):
        with pytest.raises(ValueError, match="gives \\(x, label\\) items: use data=pairs"):
            check_batch_shape(loss, DigitsDataModule())
    check_batch_shape(losses.TripletMarginLoss(), DigitsDataModule())   # labelled: fine
