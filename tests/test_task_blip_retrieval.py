"""BLIP retrieval (BlipForImageTextRetrieval): ITC + ITM loss with hard negatives, ITM re-ranking of
the ITC top-k, compress -> evaluate end to end from a Karpathy-format fixture, a local hub folder."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from PIL import Image, ImageDraw

import upop
from upop import pipeline
from upop.data import DataError
from upop.evaluate import run_evaluate
from upop.metrics import recall_at_k
from upop.models.blip import blip_config, blip_tokenizer
from upop.runconfig import load_run_config
from upop.tasks import make_task
from upop.tasks.blip_itm import (
    OTHER_SCORE,
    encoder_ids,
    image_embeddings,
    itc_itm_losses,
    itm_logits,
    rerank_scores,
    sample_hard_negatives,
    text_features,
)

COLORS = ["red", "green", "blue", "orange", "purple", "black"]
SHAPES = ["circle", "square"]


def _draw(path: Path, color: str, shape: str) -> None:
    image = Image.new("RGB", (40, 40), "white")
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)((8, 8, 32, 32), fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory) -> Path:
    """The official COCO/Flickr Karpathy layout: train = one entry per caption with image_id,
    val/test = one entry per image with its caption list."""
    root = tmp_path_factory.mktemp("karpathy_blip")
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    train, evals = [], {"val": [], "test": []}
    for i, (color, shape) in enumerate(pairs * 2):
        rel = f"images/{i:03d}.jpg"
        _draw(root / rel, color, shape)
        captions = [f"a {color} {shape}", f"{shape} in {color}"]
        if i < len(pairs):
            train += [{"image": rel, "caption": c, "image_id": f"img{i}"} for c in captions]
        else:
            evals["val" if i % 2 else "test"].append({"image": rel, "caption": captions})
    (root / "train.json").write_text(json.dumps(train))
    for split, entries in evals.items():
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def _config(root: Path, out: Path, model: dict | None = None, **files) -> dict:
    data = {"format": "karpathy", "root": str(root), "image_size": 32, "max_tokens": 8,
            **{s: str(root / f"{s}.json") for s in ("train", "val", "test")}}
    data.update({k: str(v) for k, v in files.items()})
    return {
        "task": "retrieval", "output_dir": str(out), "model": model or {"preset": "tiny-blip-retrieval"},
        "data": data,
        "upop": {"target": 0.5, "interval": 2},
        "train": {"batch_size": 6, "eval_batch_size": 5, "dense_epochs": 1, "search_epochs": 2,
                  "retrain_epochs": 1, "max_steps_per_epoch": 2, "dense_lr": 1e-3},
        "eval": {"latency_batches": [1, 2], "latency_repeats": 1},
        "retrieval": {"k_test": 3},
    }


def _load(tmp_path: Path, config: dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_run_config(path)


def _tiny_model(seed: int = 0, image_size: int = 16) -> tuple[tf.BlipForImageTextRetrieval, object]:
    torch.manual_seed(seed)
    tok = blip_tokenizer()
    config = blip_config(tok, image_size, 8, 32, 2, 4, 32, 2, 4, projection_dim=16)
    config.vision_config.initializer_range = 0.02  # HF's default 1e-10 leaves the vision tower ~0
    return tf.BlipForImageTextRetrieval(config).eval(), tok


def _batch(tok, n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    captions = [f"a {c} {s}" for c in COLORS for s in SHAPES][:n]
    tokens = tok(captions, padding="longest", return_tensors="pt")
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g), "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"], "image_ids": torch.arange(n) // 2}


# ---- the pieces ---------------------------------------------------------------------------------------
def test_hard_negatives_avoid_the_same_image_and_follow_the_similarity():
    ids = torch.tensor([0, 0, 1, 2, 3])
    sim = torch.zeros(5, 5)
    sim[:, 3] = 5.0  # column 3 is by far the most similar for every row but its own image's
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, ids, g) for _ in range(400)])  # (400, 5)
    same = ids[draws] == ids[None, :]
    assert not same.any(), "a negative of the same image was drawn"
    # rows 0-2 and 4 draw column 3 with probability e^5 / (e^5 + 2 or 3) > 0.97
    for row in (0, 1, 2, 4):
        assert (draws[:, row] == 3).float().mean() > 0.9
    assert set(draws[:, 3].tolist()) == {0, 1, 2, 4}  # row 3: its own column excluded, all others equally likely
    # every example of one image: no valid negative, any other example instead of a crash
    one_image = sample_hard_negatives(torch.randn(4, 4), torch.zeros(4, dtype=torch.long), g)
    assert (one_image != torch.arange(4)).all()


def test_loss_feeds_itm_the_enc_token_and_three_kinds_of_pairs():
    model, tok = _tiny_model()
    batch = _batch(tok)
    seen = []
    hook = model.text_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["input_ids"].clone(), kwargs.get("encoder_hidden_states"))),
        with_kwargs=True)
    model.train()
    itc, itm = itc_itm_losses(model, **batch, enc_token_id=tok.enc_token_id)
    hook.remove()
    (unimodal_ids, no_image), (itm_ids, images) = seen
    assert no_image is None and (unimodal_ids[:, 0] == tok.cls_token_id).all()
    assert itm_ids.shape[0] == 3 * len(batch["input_ids"]) and (itm_ids[:, 0] == tok.enc_token_id).all()
    assert images.shape[0] == 3 * len(batch["input_ids"])
    assert torch.isfinite(itc) and torch.isfinite(itm)
    # ITM with 1 positive per 2 negatives starts near ln 2; ITC near ln(batch / positives)
    (itc + itm).backward()
    for name in ("itm_head.weight", "text_encoder.encoder.layer.0.crossattention.self.query.weight",
                 "vision_proj.weight", "text_proj.weight", "vision_model.embeddings.patch_embedding.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def _reference_scores(model, image_embeds, sim, enc_ids, mask, k):
    """BLIP's evaluation loops, one image (resp. text) at a time."""
    i2t = torch.full_like(sim, OTHER_SCORE)
    for i in range(sim.shape[0]):
        top_sim, top = sim[i].topk(k)
        logits = itm_logits(model, enc_ids[top], mask[top], image_embeds[i].repeat(k, 1, 1))
        i2t[i, top] = logits[:, 1] + top_sim
    t2i = torch.full_like(sim.t(), OTHER_SCORE)
    for t in range(sim.shape[1]):
        top_sim, top = sim[:, t].topk(k)
        logits = itm_logits(model, enc_ids[t].repeat(k, 1), mask[t].repeat(k, 1), image_embeds[top])
        t2i[t, top] = logits[:, 1] + top_sim
    return i2t, t2i


@torch.no_grad()
def test_rerank_matches_blip_per_row_loops():
    model, tok = _tiny_model()
    batch = _batch(tok, n=7)
    captions = ["a red circle", "green", "blue square in the corner", "black", "a purple thing", "orange",
                "circle", "two red squares and a circle", "x"]
    tokens = tok(captions, padding="longest", return_tensors="pt")
    embeds, image_feat = image_embeddings(model, batch["pixel_values"])
    sim = image_feat @ text_features(model, tokens["input_ids"], tokens["attention_mask"]).t()  # (7, 9)
    enc = encoder_ids(tokens["input_ids"], tok.enc_token_id)
    i2t, t2i = rerank_scores(model, embeds, sim, enc, tokens["attention_mask"], k_test=3, batch_size=4)
    ref_i2t, ref_t2i = _reference_scores(model, embeds, sim, enc, tokens["attention_mask"], 3)
    assert (i2t - ref_i2t).abs().max() <= 1e-5 and (t2i - ref_t2i).abs().max() <= 1e-5
    assert ((i2t != OTHER_SCORE).sum(1) == 3).all() and ((t2i != OTHER_SCORE).sum(1) == 3).all()
    # the re-ranking changes the order that ITC alone gives
    assert not torch.equal(i2t.argmax(1), sim.argmax(1)) or not torch.equal(t2i.argmax(1), sim.t().argmax(1))
    # k_test above the number of candidates: every entry is re-scored
    full_i2t, _ = rerank_scores(model, embeds, sim, enc, tokens["attention_mask"], k_test=100, batch_size=64)
    assert (full_i2t != OTHER_SCORE).all()


def test_compressed_model_scores_like_the_masked_one():
    """Train a few search steps with the task's own loss, then compare ITC features, ITM logits and
    the re-ranked scores of the masked model with those of the compressed one."""
    model, tok = _tiny_model(seed=1)
    batch = _batch(tok, n=6, seed=1)
    enc = encoder_ids(batch["input_ids"], tok.enc_token_id)

    @torch.no_grad()
    def outputs():
        embeds, image_feat = image_embeddings(model, batch["pixel_values"])
        text_feat = text_features(model, batch["input_ids"], batch["attention_mask"])
        sim = image_feat @ text_feat.t()
        i2t, t2i = rerank_scores(model, embeds, sim, enc, batch["attention_mask"], k_test=4, batch_size=8)
        return torch.cat([image_feat.reshape(-1), text_feat.reshape(-1), i2t.reshape(-1), t2i.reshape(-1)])

    search = upop.UPopSearch(model, upop.UPopConfig(target=0.5, total_steps=12, interval=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(12):
        itc, itm = itc_itm_losses(model, **batch, enc_token_id=tok.enc_token_id)
        (itc + itm + search.sparsity_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
        search.step()
    assert search.finished
    model.eval()
    masked = outputs()
    plan = search.plan()
    search.remove()  # the masks off: the trained dense model
    assert (outputs() - masked).abs().max() > 1e-4, "the masks must change the scores"
    params = upop.count_params(model)
    upop.apply_plan(model, plan)  # what search.compress() does after removing the masks
    assert upop.count_params(model) < params
    assert (outputs() - masked).abs().max() <= 1e-5


# ---- the task, end to end ------------------------------------------------------------------------------
def test_compress_then_evaluate_end_to_end(karpathy, tmp_path):
    out = tmp_path / "run"
    cfg = _load(tmp_path, _config(karpathy, out))
    metrics = pipeline.run_compress(cfg)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["task"] == "retrieval" and saved["metric"] == "r_mean"
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]
    assert metrics["compressed"]["flops"] < metrics["dense"]["flops"]
    assert abs(metrics["achieved"] - 0.5) <= 0.02
    for phase in ("dense", "compressed"):
        m = metrics[phase]["metrics"]
        for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
            assert 0 <= m[key] <= 100, (phase, key)
        assert m["txt_r1"] <= m["txt_r5"] <= m["txt_r10"] and m["img_r1"] <= m["img_r5"] <= m["img_r10"]
        assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)
    assert json.loads((out / "model" / "upop_model.json").read_text())["class"] == "BlipForImageTextRetrieval"
    # `upop evaluate` on the saved model measures what the run measured
    again = run_evaluate(cfg, out / "model")
    assert again["metrics"] == pytest.approx(metrics["compressed"]["metrics"], abs=1e-6)
    assert again["params"] == metrics["compressed"]["params"]


def test_evaluation_reranks_with_itm(karpathy, tmp_path):
    """The task's recalls come from ITM logit[1] + ITC similarity over the ITC top-k_test: with a
    silenced ITM head and every candidate kept they equal plain ITC recalls; with k_test = 1 the
    re-ranking cannot move the first candidate, so R@1 is ITC's whatever the head says."""
    cfg = _load(tmp_path, _config(karpathy, tmp_path / "unused"))
    task = make_task(cfg)
    model = task.model.eval()
    ds = task._eval["test"]
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    tokens = task._tokens(ds.texts)
    with torch.no_grad():
        _, image_feat = image_embeddings(model, images)
        sim = image_feat @ text_features(model, tokens["input_ids"], tokens["attention_mask"]).t()
    itc_only = recall_at_k(sim, ds.img2txt, ds.txt2img)
    cpu = torch.device("cpu")
    task.options.k_test = 1
    top1 = task.evaluate(model, "test", cpu)
    assert top1["txt_r1"] == pytest.approx(itc_only["txt_r1"]) and top1["img_r1"] == pytest.approx(itc_only["img_r1"])
    task.options.k_test = 1000
    with torch.no_grad():
        model.itm_head.weight.zero_()
        model.itm_head.bias.zero_()
    assert task.evaluate(model, "test", cpu) == pytest.approx(itc_only)


def test_malformed_annotation_files_are_rejected(karpathy, tmp_path):
    bad_val = tmp_path / "val_bad.json"
    bad_val.write_text(json.dumps([{"image": "images/000.jpg", "caption": "a string, not a list"}]))
    with pytest.raises(DataError, match="val_bad.json: entry 0: caption must be a list") as err:
        make_task(_load(tmp_path, _config(karpathy, tmp_path / "o", val=bad_val)))
    assert "\n" not in str(err.value)
    missing = tmp_path / "train_missing.json"
    missing.write_text(json.dumps([{"image": "images/nope.jpg", "caption": "red", "image_id": "1"}]))
    with pytest.raises(DataError, match="train_missing.json: entry 0: image file not found"):
        make_task(_load(tmp_path, _config(karpathy, tmp_path / "o", train=missing)))
    not_json = tmp_path / "test_broken.json"
    not_json.write_text('[{"image": "images/000.jpg", "caption": [')
    with pytest.raises(DataError, match="test_broken.json"):
        make_task(_load(tmp_path, _config(karpathy, tmp_path / "o", test=not_json)))


def test_local_blip_folder_loads_as_blip_retrieval(karpathy, tmp_path):
    """A BLIP retrieval checkpoint saved with save_pretrained (offline) takes the ITC + ITM path."""
    model, tok = _tiny_model(image_size=32)
    folder = tmp_path / "blip-local"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = _load(tmp_path, _config(karpathy, tmp_path / "o", model={"name": str(folder)}))
    task = make_task(cfg)
    assert type(task.model) is tf.BlipForImageTextRetrieval and task.blip
    assert task.enc_token_id == tok.enc_token_id
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in task.model.state_dict().items())
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    assert torch.isfinite(task.loss(task.model, batch))
    assert "forward" not in vars(task.model)  # the loss's temporary forward is removed again
    assert 0 <= task.evaluate(task.model, "val", torch.device("cpu"))["r_mean"] <= 100


def test_two_processes_train_through_the_ddp_wrapper(karpathy, tmp_path):
    """Under torchrun the loss runs inside DistributedDataParallel's forward: the run completes and
    both ranks take the same pruning decision. With the paper's recipe on: the momentum queue
    gathers every process's features, ITM negatives come from both processes' batches (a
    gather with gradient inside DDP's forward) and the learnable temperature gets its gradient."""
    out = tmp_path / "ddp"
    config = _config(karpathy, out)
    config["train"].update(batch_size=3, dense_epochs=0)
    config["retrieval"].update(momentum_distill=True, queue_size=12, learn_temperature=True, negative_all_rank=True)
    config["eval"]["skip_latency"] = True
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as sock:  # torchrun's port 0 does not pick a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "upop.cli", "compress", "--config", str(path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    plans = [json.loads((out / f"plan.rank{r}.json").read_text())["structures"] for r in (0, 1)]
    assert plans[0] == plans[1]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2


def test_text_encoder_initialised_from_bert_computes_what_bert_computes():
    """The MiniLM-initialised preset's mechanism: a BERT of the same shape copied into BLIP's text
    encoder (type-0 row folded into the positions) gives BERT's outputs on the unimodal path."""
    import transformers as tf

    from upop.models.blip import blip_config, blip_tokenizer, init_text_from_bert

    tok = blip_tokenizer()
    bert = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64)).eval()
    with torch.no_grad():  # a non-zero type-0 row, so that forgetting to fold it fails the test
        bert.embeddings.token_type_embeddings.weight.normal_()
    blip = tf.BlipForImageTextRetrieval(blip_config(tok, 32, 8, 32, 2, 4, 32, 2, 4, projection_dim=16)).eval()
    init_text_from_bert(blip.text_encoder, bert, tok.cls_token_id)
    tokens = tok(["a red heart", "person surfing medium skin tone"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = bert(**tokens).last_hidden_state
        got = blip.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert (expected - got).abs().max() < 1e-5
    words = blip.text_encoder.embeddings.word_embeddings.weight
    assert torch.equal(words[tok.enc_token_id], bert.embeddings.word_embeddings.weight[tok.cls_token_id])


# ---- the paper's recipe: ITM negatives from every process, the options end to end ----------------------
_VARIED = ["a red circle", "green", "a big blue square in the corner", "black", "purple thing",
           "an orange circle next to a small square"]


def _argmax_negatives(sim, image_ids, generator=None, column_ids=None, offset=0):
    """The most similar column of another image: the draw made deterministic, so that one and two
    processes pick the same negatives."""
    columns = image_ids if column_ids is None else column_ids
    return sim.float().masked_fill(image_ids[:, None] == columns[None, :], float("-inf")).argmax(1)


def _itm_loss_and_grads(rank: int, world: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ITM loss (negative_all_rank) and gradients of this process's share of one 6-pair batch;
    each share is padded to its own longest caption, as the collate function does."""
    model, tok = _tiny_model(seed=3)
    tokens = tok(_VARIED, padding="longest", return_tensors="pt")
    g = torch.Generator().manual_seed(3)
    batch = {"pixel_values": torch.randn(6, 3, 16, 16, generator=g), "input_ids": tokens["input_ids"],
             "attention_mask": tokens["attention_mask"], "image_ids": torch.arange(6) // 2}
    share = slice(rank * 6 // world, (rank + 1) * 6 // world)
    part = {k: v[share] for k, v in batch.items()}
    length = int(part["attention_mask"].sum(1).max())
    part["input_ids"], part["attention_mask"] = part["input_ids"][:, :length], part["attention_mask"][:, :length]
    _, itm = itc_itm_losses(model, **part, enc_token_id=tok.enc_token_id, negative_all_rank=True)
    itm.backward()
    return itm.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _gathered_negatives_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from upop.tasks import blip_itm

    torch.set_num_threads(1)
    blip_itm.sample_hard_negatives = _argmax_negatives
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loss, grads = _itm_loss_and_grads(rank, world)
        for tensor in [loss, *grads.values()]:  # what DistributedDataParallel averages
            dist.all_reduce(tensor)
            tensor /= world
        if rank == 0:
            save_file({"loss": loss.reshape(1), **grads}, out)
    finally:
        dist.destroy_process_group()


def test_itm_negatives_from_every_process_match_one_process(tmp_path, monkeypatch):
    """negative_all_rank: two processes with half the batch each (captions padded differently)
    give the ITM loss and gradients of one process with the whole batch, given the same
    negatives: image states are gathered with their gradient, captions gathered and padded."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from upop.tasks import blip_itm

    out = tmp_path / "two.safetensors"
    mp.spawn(_gathered_negatives_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    two = load_file(out)
    monkeypatch.setattr(blip_itm, "sample_hard_negatives", _argmax_negatives)
    loss, grads = _itm_loss_and_grads(0, 1)
    assert float(two.pop("loss")) == pytest.approx(float(loss), abs=1e-5)
    assert two.keys() == grads.keys() and "vision_model.embeddings.patch_embedding.weight" in grads
    for name, grad in grads.items():
        assert torch.allclose(two[name], grad, atol=1e-5, rtol=1e-4), name


def test_paper_recipe_end_to_end(karpathy, tmp_path):
    """momentum_distill + learn_temperature + negative_all_rank through compress -> evaluate: the
    model saved is a BlipForRetrievalWithTemp and reloads to the same recalls."""
    out = tmp_path / "run"
    config = _config(karpathy, out)
    config["retrieval"].update(momentum_distill=True, queue_size=8, learn_temperature=True, negative_all_rank=True)
    config["train"].update(dense_epochs=0)
    config["eval"]["skip_latency"] = True
    cfg = _load(tmp_path, config)
    metrics = pipeline.run_compress(cfg)
    assert json.loads((out / "model" / "upop_model.json").read_text())["class"] == "BlipForRetrievalWithTemp"
    reloaded = upop.from_pretrained(out / "model")
    assert 0.001 <= float(reloaded.temp.detach()) <= 0.5
    again = run_evaluate(cfg, out / "model")
    assert again["metrics"] == pytest.approx(metrics["compressed"]["metrics"], abs=1e-6)
    # the pipeline ran the task's hooks: the momentum copy and its queue are saved with the last
    # checkpoint, the copy sliced with the same plan as the model, the queue filled by the steps
    from safetensors.torch import load_file

    progress = json.loads((out / "state" / "progress.json").read_text())
    extra = load_file(str(out / "state" / progress["checkpoint"] / "task.safetensors"))
    shapes = {f"momentum.model.{k}": tuple(v.shape) for k, v in reloaded.state_dict().items()}
    copied = {k: tuple(v.shape) for k, v in extra.items() if k.startswith("momentum.model.")}
    assert copied and all(shapes[k] == shape for k, shape in copied.items() if k in shapes)
    assert int(extra["momentum.queue.pointer"][1]) > 0  # entries enqueued


def test_local_folder_with_learned_temperature_keeps_it(karpathy, tmp_path):
    from upop.models.blip import with_learned_temperature

    model, tok = _tiny_model(image_size=32)
    model = with_learned_temperature(model)
    with torch.no_grad():
        model.temp.fill_(0.2)
    folder = tmp_path / "blip-temp"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    task = make_task(_load(tmp_path, _config(karpathy, tmp_path / "o", model={"name": str(folder)})))
    assert type(task.model).__name__ == "BlipForRetrievalWithTemp" and task.model.temp.item() == pytest.approx(0.2)
