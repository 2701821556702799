"""The paper's retrieval recipe (retrieval: momentum_distill, learn_temperature): the momentum copy
(EMA rule, kept outside the model, unmasked during the search, sliced after compression), the
feature queue, the ramped alpha, the distillation loss by hand, the learnable temperature saved
with the model, CLIP's clamped logit_scale, and the resumable extra state."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import upop
from test_task_blip_retrieval import _config, _load, karpathy  # noqa: F401  (karpathy is a fixture)
from upop.masks import is_masked
from upop.models import PRESETS
from upop.models.blip import BlipForRetrievalWithTemp
from upop.plan import compose
from upop.tasks import make_task
from upop.tasks.retrieval import LOGIT_SCALE_MAX, features
from upop.tasks.retrieval_momentum import (
    FeatureQueue,
    Momentum,
    distillation_itc,
    ramped_alpha,
    relative_plan,
)


def _task(karpathy_root, tmp_path, preset: str = "tiny-dual", train: dict | None = None, **options):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = _config(karpathy_root, tmp_path / "out", model={"preset": preset})
    config["train"].update(train or {})
    config["retrieval"] = {"k_test": 3, "momentum_distill": True, "queue_size": 4, **options}
    config["data"]["image_size"] = 16
    return make_task(_load(tmp_path, config))


def _batches(task, size: int, count: int):
    ds = task.train_dataset()
    return [task.collate([ds[i] for i in range(k * size, (k + 1) * size)]) for k in range(count)]


# ---- pieces ------------------------------------------------------------------------------------------
def test_queue_fills_from_zero_and_wraps():
    q = FeatureQueue(5)
    feats = torch.arange(14, dtype=torch.float32).view(7, 2)
    for k in range(3):  # 6 entries into 5 slots: the 6th overwrites slot 0
        q.enqueue(feats[2 * k:2 * k + 2], -feats[2 * k:2 * k + 2], torch.tensor([2 * k, 2 * k + 1]))
        image, text, ids = q.entries(torch.device("cpu"), 2)
        assert len(ids) == min(5, 2 * k + 2)
    assert q.pointer == 1 and q.count == 5
    assert ids.tolist() == [5, 1, 2, 3, 4]
    assert torch.equal(image, feats[[5, 1, 2, 3, 4]]) and torch.equal(text, -feats[[5, 1, 2, 3, 4]])
    q.enqueue(feats, feats, torch.arange(7))  # a batch above the size: its last 5 entries
    assert sorted(q.entries(torch.device("cpu"), 2)[2].tolist()) == [2, 3, 4, 5, 6]
    again = FeatureQueue(5)
    again.load_state_dict(q.state_dict())
    assert (again.pointer, again.count) == (q.pointer, q.count) and torch.equal(again.ids, q.ids)
    with pytest.raises(ValueError, match="queue_size is 6"):
        FeatureQueue(6).load_state_dict(q.state_dict())


def test_momentum_update_rule_and_copy_outside_the_model():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    mom = Momentum(0.9, queue_size=0)
    teacher = mom.ensure(online)
    assert teacher is not online and not any(p.requires_grad for p in teacher.parameters())
    assert all(t is not o for t, o in zip(teacher.parameters(), online.parameters(), strict=True))
    assert not any("momentum" in n for n, _ in online.named_modules())  # not in the model's tree
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher.parameters()]
    mom.update(online)
    for old, new, p in zip(before, teacher.parameters(), online.parameters(), strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * p, atol=1e-7, rtol=0)
    assert not torch.equal(teacher[0].weight, online[0].weight)


def test_alpha_ramps_over_the_first_epoch_of_each_phase():
    assert ramped_alpha(0.4, 0, 0, 10) == 0.0
    assert ramped_alpha(0.4, 0, 5, 10) == pytest.approx(0.2)
    assert ramped_alpha(0.4, 0, 9, 10) == pytest.approx(0.36)
    assert ramped_alpha(0.4, 1, 0, 10) == pytest.approx(0.4)


def test_distillation_loss_by_hand():
    """B = 2 (image ids 7, 8), a queue of one entry of image id 7, D = 2, scale 2, alpha 0.25."""
    v = [torch.tensor(x) / math.hypot(*x) for x in ([1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6],
                                                     [1.0, 1.0], [1.0, -1.0], [-1.0, 0.5])]
    img, txt, img_m, txt_m = torch.stack(v[0:2]), torch.stack(v[2:4]), torch.stack(v[4:6]), torch.stack([v[6], v[0]])
    q_img, q_txt, q_ids = v[1][None], v[2][None], torch.tensor([7])
    ids, scale, alpha = torch.tensor([7, 8]), 2.0, 0.25
    got = distillation_itc(img, txt, img_m, txt_m, ids, q_img, q_txt, q_ids, scale, alpha)

    def soft_ce(queries, queries_m, keys):  # keys: [momentum batch..., queue...]
        total = 0.0
        for b in range(2):
            logits = [scale * float(queries[b] @ k) for k in keys]
            logits_m = [scale * float(queries_m[b] @ k) for k in keys]
            key_ids = [7, 8, 7]
            pos = [1.0 if key_ids[j] == int(ids[b]) else 0.0 for j in range(3)]
            z, z_m = sum(math.exp(x) for x in logits), sum(math.exp(x) for x in logits_m)
            targets = [alpha * math.exp(logits_m[j]) / z_m + (1 - alpha) * pos[j] / sum(pos) for j in range(3)]
            total += -sum(t * (x - math.log(z)) for t, x in zip(targets, logits, strict=True))
        return total / 2

    i2t = soft_ce(img, img_m, [txt_m[0], txt_m[1], q_txt[0]])
    t2i = soft_ce(txt, txt_m, [img_m[0], img_m[1], q_img[0]])
    assert float(got) == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    # alpha 0, no queue: cross-entropy of each online feature against the momentum batch
    plain = distillation_itc(img, txt, img_m, txt_m, ids, q_img[:0], q_txt[:0], q_ids[:0], scale, 0.0)
    expected = (-(torch.log_softmax(scale * img @ txt_m.t(), 1).diag()).mean()
                - (torch.log_softmax(scale * txt @ img_m.t(), 1).diag()).mean()) / 2
    assert float(plain) == pytest.approx(float(expected), rel=1e-6)


def test_relative_plan_inverts_compose():
    model = PRESETS["tiny-dual"].build(16, None).model
    search = upop.UPopSearch(model, upop.UPopConfig(target=0.5, total_steps=1, interval=1))
    base = _finished_plan(search)
    search.compress()
    second = upop.UPopSearch(model, upop.UPopConfig(target=0.3, total_steps=1, interval=1))
    rel = _finished_plan(second, relative=True)
    absolute = compose(base, rel)
    back = relative_plan(base, absolute)
    assert {n: sp.kept for n, sp in back.structures.items()} == {n: sp.kept for n, sp in rel.structures.items()}


def _finished_plan(search, relative: bool = False):
    model = search.model
    batch = {"input_ids": torch.randint(0, 1000, (4, 6)), "pixel_values": torch.randn(4, 3, 16, 16)}
    out = model(**batch, return_loss=True)
    (out.loss + search.sparsity_loss()).backward()
    search.step()
    return search._relative_plan() if relative else search.plan()


# ---- through the task --------------------------------------------------------------------------------
def test_queue_holds_momentum_features_and_ids(karpathy, tmp_path):  # noqa: F811
    task = _task(karpathy, tmp_path, queue_size=4)
    model = task.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = _batches(task, 3, 3)
    for k, batch in enumerate(batches):
        task.before_step("search", 0, k, 3)
        if k == 2:  # the teacher as the last loss sees it
            teacher = copy.deepcopy(task.momentum.model).eval()
            with torch.no_grad():
                expect_img = nn.functional.normalize(features(teacher.get_image_features(
                    pixel_values=batch["pixel_values"])), dim=-1)
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        task.after_optimizer_step(model)
    assert task.alpha == pytest.approx(0.4 * 2 / 3)
    q = task.momentum.queue
    # 9 entries through 4 slots: slot 0 holds entry 8, slots 1-3 entries 5-7
    ids = torch.cat([b["image_ids"] for b in batches])
    assert q.pointer == 1 and q.count == 4
    assert q.ids.tolist() == ids[[8, 5, 6, 7]].tolist()
    assert torch.allclose(q.image[[2, 3, 0]], expect_img, atol=1e-5)  # momentum, not online, features
    assert not is_masked(task.momentum.model)


def test_momentum_unmasked_during_search_and_sliced_after_compress(karpathy, tmp_path):  # noqa: F811
    for mode in ("slice", "copy"):
        task = _task(karpathy, tmp_path / mode, preset="tiny-blip-retrieval", momentum_after_compress=mode,
                     learn_temperature=True, negative_all_rank=True)
        model = task.model.train()
        assert isinstance(model, BlipForRetrievalWithTemp)
        search = upop.UPopSearch(model, upop.UPopConfig(target=0.5, total_steps=4, interval=1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for k, batch in enumerate(_batches(task, 4, 4)):
            task.before_step("search", 0, k, 4)
            (task.loss(model, batch) + search.sparsity_loss()).backward()
            opt.step()
            opt.zero_grad()
            task.after_optimizer_step(model)
            search.step()
        teacher = task.momentum.model
        assert not is_masked(teacher) and is_masked(model)
        embeddings = teacher.vision_model.embeddings.patch_embedding.weight.clone()
        plan = search.plan()
        search.compress()
        task.after_compress(model, plan)
        ours, theirs = dict(teacher.named_parameters()), dict(model.named_parameters())
        assert ours.keys() == theirs.keys()
        assert all(ours[n].shape == theirs[n].shape for n in ours)
        assert upop.count_params(teacher) == upop.count_params(model)
        same = torch.equal(ours["vision_model.embeddings.patch_embedding.weight"],
                           theirs["vision_model.embeddings.patch_embedding.weight"])
        if mode == "slice":  # the EMA teacher survives compression
            assert torch.equal(ours["vision_model.embeddings.patch_embedding.weight"], embeddings) and not same
        else:  # the paper: copy_params() after compression
            assert all(torch.equal(ours[n], theirs[n]) for n in ours)
        batch = _batches(task, 4, 1)[0]
        task.loss(model, batch).backward()  # retraining goes on with the sliced teacher
        task.after_optimizer_step(model)


def test_temperature_learned_clamped_and_saved(karpathy, tmp_path):  # noqa: F811
    task = _task(karpathy, tmp_path, preset="tiny-blip-retrieval", learn_temperature=True, momentum_distill=False)
    model = task.model.train()
    with torch.no_grad():
        model.temp.fill_(5.0)
    loss = task.loss(model, _batches(task, 4, 1)[0])
    assert model.temp.item() == pytest.approx(0.5)  # clamped before use, as BLIP does
    loss.backward()
    assert model.temp.grad is not None and float(model.temp.grad) != 0.0
    with torch.no_grad():
        model.temp.fill_(0.0001)
    task.after_optimizer_step(model)
    assert model.temp.item() == pytest.approx(0.001)
    with torch.no_grad():
        model.temp.fill_(0.123)
    upop.save_pretrained(model, tmp_path / "saved")
    again = upop.from_pretrained(tmp_path / "saved")
    assert type(again) is BlipForRetrievalWithTemp and again.temp.item() == pytest.approx(0.123)
    # a plain BLIP retrieval model keeps the fixed 0.07 (the default, learn_temperature off)
    plain = _task(karpathy, tmp_path / "plain", preset="tiny-blip-retrieval", momentum_distill=False)
    assert not hasattr(plain.model, "temp")


def test_logit_scale_clamped_with_learn_temperature(karpathy, tmp_path):  # noqa: F811
    for learn in (True, False):
        task = _task(karpathy, tmp_path / str(learn), preset="tiny-clip", learn_temperature=learn)
        model = task.model.train()
        with torch.no_grad():
            model.logit_scale.fill_(6.0)
        loss = task.loss(model, _batches(task, 3, 1)[0])
        expected = LOGIT_SCALE_MAX if learn else 6.0
        assert model.logit_scale.item() == pytest.approx(expected)
        loss.backward()
        assert model.logit_scale.grad is not None
        with torch.no_grad():
            model.logit_scale.fill_(-1.0)
        task.after_optimizer_step(model)
        assert model.logit_scale.item() == pytest.approx(0.0 if learn else -1.0)
    assert pytest.approx(4.6052, abs=1e-4) == LOGIT_SCALE_MAX


def test_extra_state_resumes_momentum_and_queue(karpathy, tmp_path):  # noqa: F811
    task = _task(karpathy, tmp_path / "a", queue_size=5)
    model = task.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in _batches(task, 3, 2):
        task.loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        task.after_optimizer_step(model)
    save_file(task.extra_state(), tmp_path / "extra.safetensors")
    state = load_file(tmp_path / "extra.safetensors")
    assert {"momentum.queue.image", "momentum.queue.text", "momentum.queue.ids", "momentum.queue.pointer"} <= set(state)
    fresh = _task(karpathy, tmp_path / "b", queue_size=5)
    fresh.load_extra_state(state)
    fresh.model.load_state_dict(model.state_dict())
    teacher = fresh.momentum.ensure(fresh.model)  # made at the first loss, with the saved weights
    saved = task.momentum.model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())
    assert (fresh.momentum.queue.pointer, fresh.momentum.queue.count) == (1, 5)
    assert torch.equal(fresh.momentum.queue.ids, task.momentum.queue.ids)
    other = _task(karpathy, tmp_path / "c", queue_size=7)
    with pytest.raises(ValueError, match="queue_size is 7"):
        other.load_extra_state(state)


def test_teacher_has_neither_masks_nor_drop_path(karpathy, tmp_path):  # noqa: F811
    """train.drop_path adds stochastic depth hooks to the model (kept when learn_temperature turns
    it into a BlipForRetrievalWithTemp, in place); the momentum copy has none, as the paper's."""
    from upop.augment import DropPathHook

    def drop_paths(m):
        return sum(isinstance(h, DropPathHook) for mod in m.modules() for h in mod._forward_hooks.values())

    task = _task(karpathy, tmp_path, preset="tiny-blip-retrieval", train={"drop_path": 0.1}, learn_temperature=True)
    model = task.model.train()
    assert isinstance(model, BlipForRetrievalWithTemp) and drop_paths(model) > 0
    task.loss(model, _batches(task, 4, 1)[0])
    assert drop_paths(task.momentum.model) == 0
