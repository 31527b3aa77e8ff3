"""The temperature mixture: the paper's rates, seeding per (seed, rank, worker), exact resume."""
from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch

from uio.data.mixture import PAPER_GROUP_RATES, MixtureDataset, MixtureSource, compute_rates
from uio.data.shards import write_examples


def _enc(task, ex, rng):
    return {"task": task, "id": ex["id"], "r": float(rng.random()), "meta": {}}


def _shards(root, specs, maxcount=4):
    """specs: (task, dataset, group, n) -> sources from written manifests."""
    out = []
    for task, ds, group, n in specs:
        write_examples([{"id": f"{ds}:{i}", "x": i} for i in range(n)], root, task, ds, "train", maxcount=maxcount)
        out.append(MixtureSource.from_manifest(root / task / ds, "train", group=group))
    return out


SPECS = [("detection", "a", "sparse_labelling", 30), ("detection", "b", "sparse_labelling", 7),
         ("keypoints", "k", "sparse_labelling", 9), ("vqa", "v", "vision_language", 20),
         ("depth", "n", "dense_labelling", 5)]


def _factory(n):
    return lambda seed, part, num: ({"id": f"f:{i}"} for i in range(part, n, num))


def test_paper_rates_formula():
    sizes = {("image_generation", "coco"): 600, ("image_generation", "cc3m"): 3000,
             ("segmentation_to_image", "coco"): 100, ("detection", "coco"): 120, ("detection", "vg"): 900,
             ("keypoints", "coco"): 50, ("depth", "nyu"): 48, ("image_classification", "imagenet"): 1000,
             ("image_captioning", "coco"): 400, ("vqa", "vqa_v2"): 700, ("relationship", "vg"): 64,
             ("question_answering", "squad"): 88, ("span_corruption", "c4"): 5000}
    groups = {"image_generation": "image_synthesis", "segmentation_to_image": "image_synthesis",
              "detection": "sparse_labelling", "keypoints": "sparse_labelling", "depth": "dense_labelling",
              "image_classification": "image_classification", "image_captioning": "image_captioning",
              "vqa": "vision_language", "relationship": "vision_language", "question_answering": "nlp",
              "span_corruption": "language_modelling"}
    srcs = [MixtureSource(t, d, n, factory=_factory(n), group=groups[t]) for (t, d), n in sizes.items()]
    rows = {(r["task"], r["dataset"]): r for r in compute_rates(srcs)}
    assert math.isclose(sum(r["rate"] for r in rows.values()), 1.0)
    by_group = {}
    for r in rows.values():
        by_group[r["group"]] = by_group.get(r["group"], 0) + r["rate"]
    assert math.isclose(by_group["image_synthesis"], 3 / 16) and math.isclose(by_group["dense_labelling"], 1 / 16)
    for g in ("sparse_labelling", "image_classification", "image_captioning", "vision_language", "nlp",
              "language_modelling"):
        assert math.isclose(by_group[g], 1 / 8)
    # tasks by (task size)^(1/2) inside the group; datasets by size^(1/2) inside the task
    gen, seg = math.sqrt(3600), math.sqrt(100)
    assert math.isclose(rows[("segmentation_to_image", "coco")]["rate"], 3 / 16 * seg / (gen + seg))
    coco, cc3m = math.sqrt(600), math.sqrt(3000)
    assert math.isclose(rows[("image_generation", "cc3m")]["rate"], 3 / 16 * gen / (gen + seg) * cc3m / (coco + cc3m))
    det, kp = math.sqrt(1020), math.sqrt(50)
    assert math.isclose(rows[("detection", "vg")]["rate"], 1 / 8 * det / (det + kp) * 30 / (30 + math.sqrt(120)))


def test_missing_groups_redistributed_and_zero_groups():
    srcs = [MixtureSource("depth", "nyu", 10, factory=_factory(10), group="dense_labelling"),
            MixtureSource("vqa", "v", 1000, factory=_factory(10), group="vision_language"),
            MixtureSource("masked_image_denoising", "x", 99, factory=_factory(10), group="pretraining")]
    rows = compute_rates(srcs)
    assert math.isclose(rows[0]["rate"], (1 / 16) / (1 / 16 + 1 / 8))
    assert math.isclose(rows[1]["rate"], (1 / 8) / (1 / 16 + 1 / 8))
    assert rows[2]["rate"] == 0.0 and PAPER_GROUP_RATES["pretraining"] == 0.0
    rows = compute_rates(srcs, group_rates={"pretraining": 1 / 16})
    assert math.isclose(rows[2]["rate"], 1 / 4)
    with pytest.raises(ValueError, match=r"no rate for task group\(s\) \['mystery'\]"):
        compute_rates([MixtureSource("t", "d", 3, factory=_factory(3), group="mystery")])
    with pytest.raises(ValueError, match="every source is empty or in a group with rate 0"):
        compute_rates([srcs[2]])
    with pytest.raises(ValueError, match="duplicate mixture sources"):
        MixtureDataset([srcs[0], srcs[0]], encode=False)
    with pytest.raises(ValueError, match="needs a processor"):
        MixtureDataset(srcs[:1])
    with pytest.raises(ValueError, match="exactly one of urls or factory"):
        MixtureSource("t", "d", 3)


def test_empirical_rates_match_formula():
    srcs = [MixtureSource(t, d, n, factory=_factory(n), group=g) for t, d, g, n in SPECS]
    ds = MixtureDataset(srcs, encode=False, seed=11)
    n = 200_000
    counts = np.bincount(ds.choices(0, 0, 0, n), minlength=len(srcs))
    for c, p in zip(counts, ds.probs):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(c - n * p) < 5 * sigma, (c, n * p)
    # and through real iteration (yields per source)
    got = [s["_mixture"]["source"] for s in itertools.islice(iter(MixtureDataset(srcs, encode=False, seed=5,
                                                                                  rank=0, world_size=1)), 4000)]
    for src, p in zip(srcs, ds.probs):
        k = got.count(src.name)
        assert abs(k - 4000 * p) < 5 * math.sqrt(4000 * p * (1 - p)), (src.name, k, 4000 * p)


def _seq(ds, n):
    return [s["id"] for s in itertools.islice(iter(ds), n)]


def test_seeding_same_and_different(tmp_path):
    srcs = _shards(tmp_path, SPECS)
    mk = lambda seed, rank=0: MixtureDataset(srcs, encode_fn=_enc, seed=seed, shuffle_buffer=3, rank=rank,
                                             world_size=2)
    a = _seq(mk(1), 150)
    assert a == _seq(mk(1), 150)
    assert a != _seq(mk(2), 150)
    assert a != _seq(mk(1, rank=1), 150)
    # encode rngs follow the same seeding
    r1 = [s["r"] for s in itertools.islice(iter(mk(1)), 20)]
    assert r1 == [s["r"] for s in itertools.islice(iter(mk(1)), 20)]
    # different DataLoader workers give different streams
    dl = torch.utils.data.DataLoader(mk(1), batch_size=10, num_workers=2, collate_fn=lambda x: x)
    b0, b1 = itertools.islice(iter(dl), 2)
    assert [s["meta"]["mixture"]["worker"] for s in b0 + b1] == [0] * 10 + [1] * 10
    assert [s["id"] for s in b0] != [s["id"] for s in b1]


def test_ranks_split_each_source_exactly_once(tmp_path):
    srcs = _shards(tmp_path, [("vqa", "v", "vision_language", 23)], maxcount=3)  # 8 shards
    seen = []
    for rank in range(2):
        ds = MixtureDataset(srcs, encode=False, seed=0, rank=rank, world_size=2, shuffle_buffer=4)
        part = _seq(ds, 24)
        first_epoch = 12 if rank == 0 else 11
        seen += part[:first_epoch]
        # the next epoch cycles through the same part of the data, in a new order
        assert set(part[first_epoch:2 * first_epoch]) == set(part[:first_epoch])
        assert part[first_epoch:2 * first_epoch] != part[:first_epoch]
    assert sorted(seen) == sorted(f"v:{i}" for i in range(23))


def test_resume_single_process_exact(tmp_path):
    srcs = _shards(tmp_path, SPECS) + [MixtureSource("vqa", "gen", 6, factory=_factory(6), group="vision_language")]
    # a url source without shard sizes (plain pattern): replayed on resume
    write_examples([{"id": f"p:{i}"} for i in range(9)], tmp_path, "keypoints", "plain", "train", maxcount=2)
    srcs.append(MixtureSource("keypoints", "plain", 9, urls=str(tmp_path / "keypoints/plain/train-{000000..000004}.tar"),
                              group="sparse_labelling"))
    mk = lambda: MixtureDataset(srcs, encode_fn=_enc, seed=7, shuffle_buffer=3, rank=0, world_size=1)
    full = list(itertools.islice(iter(mk()), 400))  # several epochs of every source
    for cut in (1, 77, 250):
        a = mk()
        for s in itertools.islice(iter(a), cut):
            a.observe(s)
        b = mk()
        b.load_state_dict(a.state_dict())
        rest = list(itertools.islice(iter(b), 400 - cut))
        assert [s["id"] for s in full] == [s["id"] for s in full[:cut]] + [s["id"] for s in rest]
        assert [s["r"] for s in full[cut:]] == [s["r"] for s in rest]


def _run_loader(ds, batches, workers=2, bs=4):
    dl = torch.utils.data.DataLoader(ds, batch_size=bs, num_workers=workers, collate_fn=lambda x: x)
    out = []
    for i, b in enumerate(dl):
        if i == batches:
            break
        out.append([s["id"] for s in b])
        ds.observe([s["meta"] for s in b])  # what the data module does for each batch the model sees
    return out


@pytest.mark.parametrize("cut", [3, 4])
def test_resume_with_workers_exact(tmp_path, cut):
    # 2 ranks x 2 workers = 4 readers > some sources' shard counts: mixed shard/sample splitting
    srcs = _shards(tmp_path, SPECS, maxcount=3)
    mk = lambda: MixtureDataset(srcs, encode_fn=_enc, seed=3, shuffle_buffer=3, rank=1, world_size=2)
    full = _run_loader(mk(), 9)
    a = mk()
    part = _run_loader(a, cut)
    state = a.state_dict()
    assert state["next_worker"] == {"1": cut % 2} and state["num_workers"] == 2
    b = mk()
    b.load_state_dict(state)
    assert part + _run_loader(b, 9 - cut) == full


def test_resume_with_other_worker_count_is_fresh_and_logged(tmp_path, caplog):
    srcs = _shards(tmp_path, SPECS[:2])
    a = MixtureDataset(srcs, encode_fn=_enc, seed=3, rank=0, world_size=1)
    seq = _seq(a, 10)
    for s in itertools.islice(iter(a), 10):
        a.observe(s)
    b = MixtureDataset(srcs, encode_fn=_enc, seed=3, rank=0, world_size=1)
    st = a.state_dict()
    st["num_workers"] = 3
    b.load_state_dict(st)
    with caplog.at_level(logging.WARNING, logger="uio.data.mixture"):
        other = _seq(b, 10)
    assert other != seq and "exact resume is impossible" in caplog.text


def test_corrupt_sample_skipped_counted_and_resume_stays_exact(tmp_path):
    srcs = _shards(tmp_path, SPECS[:2])
    # corrupt one sample of source "a" in place: rewrite shard 0 with bad json for its 2nd sample
    import io
    import tarfile

    path = tmp_path / "detection/a/train-000000.tar"
    members = [(m.name, tarfile.open(path).extractfile(m).read()) for m in tarfile.open(path).getmembers()]
    members = [(n, b"{broken" if n == "000000001.json" else d) for n, d in members]
    with tarfile.open(path, "w") as tar:
        for n, d in members:
            info = tarfile.TarInfo(n)
            info.size = len(d)
            tar.addfile(info, io.BytesIO(d))
    mk = lambda: MixtureDataset(srcs, encode_fn=_enc, seed=1, shuffle_buffer=2, rank=0, world_size=1)
    full = list(itertools.islice(iter(mk()), 120))
    ids = [s["id"] for s in full]
    assert "a:1" not in ids and "a:2" in ids
    corrupt = [s["meta"]["mixture"]["corrupt"] for s in full]
    assert corrupt[-1] >= 2 and corrupt == sorted(corrupt)  # running count, several epochs
    draws = [s["meta"]["mixture"]["draw"] for s in full]
    assert draws[-1] == len(full) - 1 + corrupt[-1]  # a corrupt draw yields nothing
    a = mk()
    for s in itertools.islice(iter(a), 50):
        a.observe(s)
    b = mk()
    b.load_state_dict(a.state_dict())
    assert ids[50:] == _seq(b, 70)
