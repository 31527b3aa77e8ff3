"""Collate (contract 2 -> 3) and UIODataModule: batches, validation sets, exact resume under Lightning."""
from __future__ import annotations

import itertools
import logging

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from uio.data.collate import Collator, collate
from uio.data.datamodule import UIODataModule
from uio.data.shards import write_examples
from uio.processing import Processor


@pytest.fixture(scope="module")
def processor(text_tokenizer):
    return Processor(text_tokenizer, image_input_size=(32, 32), patch_size=16, image_target_size=(16, 16),
                     image_target_grid=(4, 4), max_input_len=48, max_target_len=40)


def _img(rng, h=24, w=32):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_world(root, n_train=12, n_val=5):
    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue"]
    for split, n in (("train", n_train), ("val", n_val)):
        write_examples([{"id": f"{split}{i}", "dataset": "toy", "image": _img(rng), "question": "what color is it?",
                         "answers": [colors[i % 3]] * 10} for i in range(n)], root, "vqa", "toy", split,
                       maxcount=4, lossless=True)
        write_examples([{"id": f"{split}{i}", "dataset": "toy", "image": _img(rng),
                         "boxes": [[2.0, 3.0, 20.0, 18.0]], "labels": ["cube"]} for i in range(n)], root,
                       "detection", "toy", split, maxcount=4, lossless=True)
        write_examples([{"id": f"{split}{i}", "dataset": "toy", "image": _img(rng), "caption": f"a {colors[i % 3]} cube"}
                        for i in range(n)], root, "image_generation", "toy", split, maxcount=4, lossless=True)
        write_examples([{"id": f"{split}{i}", "dataset": "wiki", "text": "the quick brown fox jumps over the lazy "
                         f"dog number {i} and keeps running far away"} for i in range(n)], root, "span_corruption",
                       "wiki", split, maxcount=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    _write_world(root)
    return root


# ---- collate -----------------------------------------------------------------------------------------
def _sample(task, n_in, n_out, target=False, codes=False, hw=(32, 32), ni=16):
    s = {"text_inputs": list(range(3, 3 + n_in - 1)) + [1], "image_input": np.ones((3, *hw), np.float32),
         "image_input_mask": np.ones(4, bool), "text_targets": list(range(5, 5 + n_out - 1)) + [1],
         "image_target": np.full((3, 16, 16), 0.5, np.float32) if target else None,
         "image_target_mask": np.full(ni, target), "task": task, "meta": {"k": task}}
    if codes:
        s["image_target_codes"] = np.arange(ni)
    return s


def test_collate_pads_and_omits_image_targets():
    b = collate([_sample("vqa", 3, 2), _sample("detection", 5, 4)])
    assert set(b) == {"text_inputs", "image_inputs", "image_input_masks", "text_targets", "tasks", "meta"}
    assert b["text_inputs"].dtype == torch.int64 and b["text_inputs"].shape == (2, 5)
    assert b["text_inputs"][0].tolist() == [3, 4, 1, 0, 0] and b["text_targets"][0].tolist() == [5, 1, 0, 0]
    assert b["image_inputs"].shape == (2, 3, 32, 32) and b["image_input_masks"].dtype == torch.bool
    assert b["tasks"] == ["vqa", "detection"] and b["meta"] == [{"k": "vqa"}, {"k": "detection"}]


def test_collate_image_targets_codes_and_caps():
    b = collate([_sample("vqa", 3, 2), _sample("image_generation", 4, 1, target=True)])
    assert b["image_targets"].shape == (2, 3, 16, 16) and b["image_target_masks"].shape == (2, 16)
    assert b["image_targets"][0].abs().sum() == 0 and torch.all(b["image_targets"][1] == 0.5)
    assert b["image_target_masks"][1].all() and not b["image_target_masks"][0].any()
    b = collate([_sample("depth", 3, 1, target=True, codes=True), _sample("vqa", 3, 2)])
    assert "image_targets" not in b and b["image_target_codes"][0].tolist() == list(range(16))
    b = Collator(max_input_len=4, max_target_len=3)([_sample("vqa", 9, 7)])
    assert b["text_inputs"].tolist() == [[3, 4, 5, 1]] and b["text_targets"].tolist() == [[5, 6, 1]]  # EOS kept


def test_collate_errors_are_clear():
    with pytest.raises(KeyError, match=r"sample 1 \(task 'x'\) is missing \['text_targets'\]"):
        s = _sample("x", 2, 2)
        del s["text_targets"]
        collate([_sample("vqa", 2, 2), s])
    with pytest.raises(ValueError, match="image_input must have the same shape"):
        collate([_sample("vqa", 2, 2), _sample("vqa", 2, 2, hw=(16, 16))])
    with pytest.raises(ValueError, match="empty list"):
        collate([])


# ---- data module -------------------------------------------------------------------------------------
def test_train_batches_and_rates_printed(world, processor, caplog):
    dm = UIODataModule(processor, roots=str(world), batch_size=6, num_workers=0, seed=1)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "training mixture rates" in caplog.text and "span_corruption" in caplog.text
    groups = {r["group"] for r in dm.train_dataset.rates()}
    assert groups == {"vision_language", "sparse_labelling", "image_synthesis", "language_modelling"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["text_inputs"].shape[0] == 6 and batch["image_inputs"].shape == (6, 3, 32, 32)
    assert batch["image_input_masks"].shape == (6, 4) and len(batch["tasks"]) == 6
    assert all(m["mixture"]["rank"] == 0 for m in batch["meta"])
    if "image_generation" in batch["tasks"]:
        assert batch["image_targets"].shape == (6, 3, 16, 16)
    # task filter
    only = UIODataModule(processor, roots=str(world), tasks=["vqa"], batch_size=2, num_workers=0)
    only.setup("fit")
    assert [r["task"] for r in only.train_dataset.rates()] == ["vqa"]


def test_val_loaders_per_task_fixed_order(world, processor):
    dm = UIODataModule(processor, roots=str(world), val_examples_per_task=3, val_batch_size=2, num_workers=0)
    dm.setup("validate")
    assert dm.val_task_names == ["detection", "image_generation", "span_corruption", "vqa"]
    loaders = dm.val_dataloader()
    ids = [[m["id"] for b in dl for m in b["meta"]] for dl in loaders]
    assert ids == [["val0", "val1", "val2"]] * 4
    assert ids == [[m["id"] for b in dl for m in b["meta"]] for dl in dm.val_dataloader()]  # same every time
    # split across 2 ranks: disjoint, together the same examples
    parts = []
    for rank in range(2):
        d = UIODataModule(processor, roots=str(world), val_tasks=["vqa"], val_examples_per_task=5, num_workers=0)
        d.setup("validate")
        d._val_sets[0].rank, d._val_sets[0].world_size = rank, 2
        parts.append([m["id"] for b in d.val_dataloader()[0] for m in b["meta"]])
    assert parts == [["val0", "val2", "val4"], ["val1", "val3"]]


def test_missing_data_errors(tmp_path, processor, world):
    with pytest.raises(FileNotFoundError, match="no training data"):
        UIODataModule(processor, roots=str(tmp_path), num_workers=0).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"no 'val' split for val task\(s\) \['depth'\]"):
        UIODataModule(processor, roots=str(world), val_tasks=["depth"], num_workers=0).setup("validate")
    with pytest.raises(ValueError, match="needs processor"):
        UIODataModule(roots=str(world))


class _Recorder(pl.LightningModule):
    """Trains one scalar and records the ids of every batch it sees."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append([f"{m['mixture']['source']}:{m['id']}" for m in batch["meta"]])
        return (self.w - batch["text_inputs"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(world, processor, tmp_path, steps, ckpt=None, save_at=None):
    dm = UIODataModule(processor, roots=str(world), batch_size=3, num_workers=2, seed=5, shuffle_buffer=3,
                       val_examples_per_task=1)
    model = _Recorder()
    callbacks = []
    if save_at:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_at,
                                                      save_top_k=-1, filename="{step}"))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                         enable_checkpointing=bool(save_at), num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model.seen, dm


def test_exact_resume_through_lightning_checkpoint(world, processor, tmp_path):
    full, _ = _fit(world, processor, tmp_path / "a", 7)
    first, dm = _fit(world, processor, tmp_path / "b", 3, save_at=3)
    assert first == full[:3]
    state = torch.load(tmp_path / "b" / "step=3.ckpt", weights_only=False)["UIODataModule"]
    assert state["draws"] == {"0": [6, 3]} and state["next_worker"] == {"0": 1}
    rest, _ = _fit(world, processor, tmp_path / "c", 7, ckpt=str(tmp_path / "b" / "step=3.ckpt"))
    assert first + rest == full
    assert len(set(itertools.chain(*full))) > 10


def test_state_gathers_every_rank_and_each_rank_resumes_its_own_stream(world, processor, monkeypatch):
    """Under DDP only rank 0 writes the checkpoint: state_dict() gathers the progress of all ranks."""
    dms, seen = [], []
    for rank in range(2):
        dm = UIODataModule(processor, roots=str(world), batch_size=2, num_workers=0, seed=4)
        dm.trainer = type("T", (), {"global_rank": rank, "world_size": 2})()
        dm.setup("fit")
        batches = list(itertools.islice(iter(dm.train_dataloader()), 3 + rank))
        for b in batches:
            dm.on_before_batch_transfer(b, 0)
        dms.append(dm)
        seen.append([m["id"] + m["mixture"]["source"] for b in batches for m in b["meta"]])
    states = [dm.train_dataset.progress.state_dict() for dm in dms]
    with monkeypatch.context() as mp:  # what all_gather_object does on 2 ranks
        mp.setattr(torch.distributed, "is_initialized", lambda: True)
        mp.setattr(torch.distributed, "get_world_size", lambda: 2)
        mp.setattr(torch.distributed, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), states))
        merged = dms[0].state_dict()
    assert merged["draws"] == {"0": [6], "1": [8]} and merged["world_size"] == 2
    for rank in range(2):  # a fresh run of each rank continues exactly after what that rank consumed
        full = UIODataModule(processor, roots=str(world), batch_size=2, num_workers=0, seed=4)
        full.trainer = type("T", (), {"global_rank": rank, "world_size": 2})()
        full.setup("fit")
        ref = [m["id"] + m["mixture"]["source"] for b in itertools.islice(iter(full.train_dataloader()), 6)
               for m in b["meta"]]
        dm = UIODataModule(processor, roots=str(world), batch_size=2, num_workers=0, seed=4)
        dm.trainer = type("T", (), {"global_rank": rank, "world_size": 2})()
        dm.load_state_dict(merged)
        dm.setup("fit")
        rest = [m["id"] + m["mixture"]["source"] for b in itertools.islice(iter(dm.train_dataloader()), 6 - 3 - rank)
                for m in b["meta"]]
        assert seen[rank] + rest == ref
    assert seen[0][:4] != seen[1][:4]
