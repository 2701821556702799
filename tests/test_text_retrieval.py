"""Text-to-text retrieval: the emoji_text builder and the text_pairs reader, the bi-encoder loss
(one forward per step, duplicate documents), the recall path, compressed == masked on a BertModel,
and compress -> evaluate through the command line on a tiny local model."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
import yaml
from torch import nn

import upop
from upop import cli
from upop.data import DataError, read_text_pairs
from upop.data.emoji_text import build_emoji_text, emoji_names, emoji_pairs, normalise, split_pairs
from upop.data.text_pairs import TextPairs, text_pair_splits
from upop.models import PRESETS, minilm_tokenizer
from upop.runconfig import ConfigError, load_run_config
from upop.tasks import make_task
from upop.tasks.text_retrieval import TextRetrievalOptions, TextRetrievalTask, pair_loss, pool, retrieval_recalls

WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum", "lime", "kiwi"]


# ---- data -----------------------------------------------------------------------------------------
def test_emoji_pairs_normalise_and_skip():
    fq = 2
    data = {
        "\U0001F44D": {"en": ":thumbs_up:", "status": fq, "alias": [":thumbsup:", ":+1:", ":thumbs_up:"]},
        "\U0001F44D\U0001F3FD": {"en": ":thumbs_up_medium_skin_tone:", "status": fq, "alias": [":tup_tone3:"]},
        "\u263A": {"en": ":smiling_face:", "status": 3, "alias": [":relaxed:"]},  # minimally qualified
        "\U0001F1E6\U0001F1E9": {"en": ":Andorra:", "status": fq, "alias": [":flag_for_Andorra:", ":andorra:"]},
        "\U0001F600": {"en": ":grinning_face:", "status": fq},  # no alias: no pair
        "\U0001F606": {"en": ":grinning_squinting_face:", "status": fq, "alias": [":satisfied:", ":laughing:"]},
    }
    pairs = emoji_pairs(data, fq)
    assert normalise(":flag_for_Andorra:") == "flag for andorra"
    # ':+1:' has no letter, ':thumbs_up:' / ':andorra:' equal their names, the skin tone and the
    # minimally-qualified entry are skipped
    assert sorted(pairs) == sorted([("thumbsup", "thumbs up"), ("flag for andorra", "andorra"),
                                    ("satisfied", "grinning squinting face"),
                                    ("laughing", "grinning squinting face")])
    # the candidates: every kept name, with or without aliases, in code point order
    assert emoji_names(data, fq) == ["andorra", "thumbs up", "grinning face", "grinning squinting face"]


def test_split_pairs_keeps_each_document_in_one_split():
    pairs = [(f"{w} {k}", f"doc {w}") for w in WORDS * 3 for k in range(3)]
    splits = split_pairs(pairs, seed=0)
    assert sum(len(v) for v in splits.values()) == len(pairs)
    docs = {s: {d for _, d in v} for s, v in splits.items()}
    assert all(docs.values())  # no split left empty
    assert not docs["train"] & docs["val"] and not docs["train"] & docs["test"] and not docs["val"] & docs["test"]
    assert split_pairs(pairs, seed=0) == splits  # fixed by the hash and the seed


def test_emoji_text_build_is_disjoint_and_cached(tmp_path):
    folder = build_emoji_text(tmp_path / "emoji_text")
    meta = json.loads((folder / "meta.json").read_text())
    splits = {s: read_text_pairs(folder / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert {s: len(p) for s, p in splits.items()} == meta["pairs"]
    assert meta["pairs"]["train"] > 500 and meta["pairs"]["val"] > 50
    docs = {s: set(p.documents) for s, p in splits.items()}
    assert not docs["train"] & docs["val"] and not docs["train"] & docs["test"] and not docs["val"] & docs["test"]
    assert all(q != d and q == q.lower() for p in splits.values() for q, d, _ in p)
    # val / test: every other emoji name as a distractor, none a document of its split; train: none
    assert {s: len(p.distractors) for s, p in splits.items()} == meta["distractors"]
    assert not splits["train"].distractors
    for s in ("val", "test"):
        distractors = splits[s].distractors
        assert len(distractors) > 1000 and len(set(distractors)) == len(distractors)
        assert not set(distractors) & docs[s]
        assert docs["train"] <= set(distractors)  # the other splits' documents are candidates too
    assert set(splits["val"].candidates) == set(splits["test"].candidates)  # ~all emoji names, both splits
    stamp = (folder / "BUILD_COMPLETE.json").stat().st_mtime_ns
    assert build_emoji_text(tmp_path / "emoji_text") == folder
    assert (folder / "BUILD_COMPLETE.json").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_text_pairs_reader(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": " a b ", "document": "D1"}\n\n{"query": "c", "document": "D2"}\n'
                    '{"query": "e", "document": "D1"}\n')
    pairs = read_text_pairs(path)
    assert pairs.queries == ["a b", "c", "e"] and pairs.documents == ["D1", "D2"]
    assert pairs.doc_of_query == [0, 1, 0] and pairs.queries_of_doc == [[0, 2], [1]]
    assert pairs[2] == ("e", "D1", 0)
    assert pairs.first_documents(1).queries == ["a b", "e"]
    assert pairs.distractors == [] and pairs.candidates == ["D1", "D2"]


def test_text_pairs_distractor_lines(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text('{"document": "X1"}\n{"query": "a", "document": "D1"}\n{"query": null, "document": " X2 "}\n'
                    '{"document": "D1"}\n{"document": "X1"}\n{"query": "b", "document": "D2"}\n')
    ds = read_text_pairs(path)
    # a distractor equal to a document (D1) or repeated (X1) is one candidate
    assert ds.queries == ["a", "b"] and ds.documents == ["D1", "D2"] and ds.distractors == ["X1", "X2"]
    assert ds.candidates == ["D1", "D2", "X1", "X2"] and len(ds) == 2 and ds[1] == ("b", "D2", 1)
    cut = ds.first_documents(1)  # data.limit_eval: the first documents' queries, every distractor kept
    assert cut.queries == ["a"] and cut.documents == ["D1"] and cut.distractors == ["X1", "X2"]
    # training's file refuses them, naming the line; val and test accept them
    with pytest.raises(DataError) as err:
        read_text_pairs(path, distractors=False)
    assert str(err.value).startswith(f"{path}: line 1: a \"document\" without a \"query\" (a distractor) "
                                     "is for val and test only")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "q", "document": "d"}\n')
    with pytest.raises(DataError, match="train.jsonl: line 1: a \"document\" without a \"query\""):
        text_pair_splits({"train": path.rename(tmp_path / "train.jsonl"), "val": pairs, "test": pairs})
    assert text_pair_splits({"train": pairs, "val": pairs, "test": tmp_path / "train.jsonl"})["test"].distractors


@pytest.mark.parametrize(("line", "problem"), [
    ('{"query": "a", "document": "b"', "line 2: invalid JSON"),
    ('["a", "b"]', 'line 2: expected an object with "query" and "document", got list'),
    ('{"query": "a"}', 'line 2: "document" missing'),
    ('{"query": "  ", "document": "b"}', 'line 2: "query" is empty'),
    ('{"query": 3, "document": "b"}', 'line 2: "query" must be a string, got int'),
    ('{"query": null}', 'line 2: neither "query" nor "document" (a pair needs both, a distractor a "document")'),
    ('{"text": "a"}', 'line 2: neither "query" nor "document"'),
    ('{"document": "  "}', 'line 2: "document" is empty'),
    ('{"document": 5}', 'line 2: "document" must be a string, got int'),
])
def test_text_pairs_bad_line_is_one_line_naming_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "ok", "document": "ok doc"}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        read_text_pairs(path)
    assert str(err.value).startswith(f"{path}: {problem}") and "\n" not in str(err.value)


def test_text_pairs_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="text pairs file not found"):
        read_text_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="contains no query-document pairs"):
        read_text_pairs(tmp_path / "empty.jsonl")


# ---- the loss -------------------------------------------------------------------------------------
def _write_pairs(folder: Path, n_docs: int, queries_per_doc: int, offset: int = 0) -> dict[str, str]:
    """Split files of synthetic pairs: document 'the <word> <k>', queries '<word> <k> q<j>'."""
    files = {}
    for split, start in (("train", 0), ("val", 100), ("test", 200)):
        lines = [json.dumps({"query": f"{WORDS[(k + j) % len(WORDS)]} {start + k} q{j}",
                             "document": f"the {WORDS[k % len(WORDS)]} {start + k}"})
                 for k in range(offset, offset + (n_docs if split == "train" else max(2, n_docs // 4)))
                 for j in range(queries_per_doc)]
        path = folder / f"{split}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        files[split] = str(path)
    return files


def _task(tmp_path: Path, *overrides: str) -> TextRetrievalTask:
    files = _write_pairs(tmp_path, 12, 2)
    cfg = load_run_config(None, ["task=text_retrieval", "model.preset=tiny-text", "data.format=text_pairs",
                                 f"data.train={files['train']}", f"data.val={files['val']}",
                                 f"data.test={files['test']}", "data.max_tokens=12", *overrides])
    return make_task(cfg)


def test_loss_runs_one_forward_on_queries_and_documents(tmp_path):
    task = _task(tmp_path)
    task.model.eval()  # no dropout: the loss's forward and the one below compute the same
    ds = task.train_dataset()
    items = [ds[0], ds[1], ds[2], ds[4]]  # items 0 and 1 are two queries of one document
    batch = task.collate(items)
    assert batch["input_ids"].shape[0] == 8 and batch["doc_ids"].tolist() == [0, 0, 1, 2]
    calls = []
    handle = task.model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    try:
        loss = task.loss(task.model, batch)
    finally:
        handle.remove()
    assert len(calls) == 1 and set(calls[0]) == {"input_ids", "attention_mask"}
    assert torch.equal(calls[0]["input_ids"], batch["input_ids"])
    loss.backward()
    assert torch.isfinite(loss) and task.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # the distillation views of that forward: (B, B) logits and the 2B pooled embeddings
    with torch.no_grad():
        out = task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    views = task.distill_views(out, batch)
    assert views["logits"].shape == (4, 4) and views["embeds"].shape == (8, 32)
    assert torch.allclose(views["embeds"].norm(dim=-1), torch.ones(8))
    assert torch.allclose(views["logits"], 20.0 * views["embeds"][:4] @ views["embeds"][4:].t())
    assert torch.allclose(pair_loss(views["logits"], batch["doc_ids"]), loss.detach(), atol=1e-5)


def test_duplicate_documents_are_all_positives():
    logits = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.5, -1.0], [0.5, 0.0, 1.0]])
    ids = torch.tensor([7, 7, 9])
    lq = torch.log_softmax(logits, 1)
    q2d = -((lq[0, 0] + lq[0, 1]) / 2 + (lq[1, 0] + lq[1, 1]) / 2 + lq[2, 2]) / 3
    ld = torch.log_softmax(logits.t(), 1)
    d2q = -((ld[0, 0] + ld[0, 1]) / 2 + (ld[1, 0] + ld[1, 1]) / 2 + ld[2, 2]) / 3
    assert torch.allclose(pair_loss(logits, ids, symmetric=False), q2d)
    assert torch.allclose(pair_loss(logits, ids), (q2d + d2q) / 2)
    # distinct ids: plain cross-entropy on the diagonal
    assert torch.allclose(pair_loss(logits, torch.arange(3), symmetric=False),
                          torch.nn.functional.cross_entropy(logits, torch.arange(3)))


def test_pooling_follows_the_attention_mask():
    hidden = torch.tensor([[[1.0, 0.0], [5.0, 8.0], [100.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(pool(hidden, mask), torch.tensor([[0.6, 0.8]]))  # mean (3, 4): padding ignored
    assert torch.allclose(pool(hidden, mask, "cls"), torch.tensor([[1.0, 0.0]]))


def test_options_are_checked():
    with pytest.raises(ConfigError, match="text_retrieval.pooling must be mean or cls"):
        TextRetrievalOptions(pooling="max").validate()
    with pytest.raises(ConfigError, match="text_retrieval.scale must be a finite number > 0"):
        TextRetrievalOptions(scale=0).validate()


# ---- evaluation -----------------------------------------------------------------------------------
def test_recalls_on_a_known_similarity():
    # documents D0 (queries 0, 1), D1 (query 2), D2 (query 3); rows documents, columns queries
    ds = TextPairs.from_pairs([("q0", "D0"), ("q1", "D0"), ("q2", "D1"), ("q3", "D2")])
    sim = torch.tensor([[0.9, 0.1, 0.0, 0.0],
                        [0.0, 0.5, 0.8, 0.0],
                        [0.0, 0.0, 0.9, 0.7]])
    r = retrieval_recalls(sim, ds)
    # query -> document: q0 D0 first; q1 D1 (0.5) above D0 (0.1): rank 2; q2 D1 (0.8) below D2 (0.9); q3 first
    assert r["q2d_r1"] == pytest.approx(50.0) and r["q2d_r5"] == 100.0
    # document -> query: D0 -> q0 first; D1 -> q2 first; D2 -> q2 (0.9) above q3 (0.7): rank 2
    assert r["d2q_r1"] == pytest.approx(200 / 3) and r["d2q_r10"] == 100.0
    assert r["r_mean"] == pytest.approx((r["q2d_r_mean"] + r["d2q_r_mean"]) / 2)


def test_recalls_with_distractors():
    # documents D0 (q0), D1 (q1, q2); distractors X0, X1, then 8 more far below everything
    ds = TextPairs.from_pairs([("q0", "D0"), ("q1", "D1"), ("q2", "D1")], distractors=[f"X{i}" for i in range(10)])
    sim = torch.full((12, 3), -1.0)
    sim[:4] = torch.tensor([[0.9, 0.0, 0.1],    # D0
                            [0.1, 0.5, 0.7],    # D1
                            [0.95, 0.6, 0.0],   # X0: above D0 for q0, above D1 for q1
                            [0.99, 0.0, 0.0]])  # X1: also above D0 for q0
    r = retrieval_recalls(sim, ds)
    # q -> d over all 12 candidates: q0 rank 3 (X1, X0, D0), q1 rank 2 (X0, D1), q2 rank 1
    assert r["q2d_r1"] == pytest.approx(100 / 3) and r["q2d_r5"] == 100.0 and r["q2d_r10"] == 100.0
    # the same pairs without distractors: every query first
    assert retrieval_recalls(sim[:2], TextPairs.from_pairs([("q0", "D0"), ("q1", "D1"), ("q2", "D1")]))["q2d_r1"] == 100
    # d -> q over the 2 documents only (the distractors have no queries to rank): D0 -> q0, D1 -> q2 first
    assert r["d2q_r1"] == 100.0 and r["d2q_r_mean"] == 100.0
    assert r["q2d_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert r["r_mean"] == pytest.approx((r["q2d_r_mean"] + 100.0) / 2)
    with pytest.raises(ValueError, match="for 2 documents \\+ 10 distractors and 3 queries"):
        retrieval_recalls(sim[:2], ds)
    # a distractor ranked above a document's best query does not change d2q; a distractor row
    # with a high score against a query is not counted as a d2q row either (it has no ground truth)
    sim[3, 0] = 5.0
    assert retrieval_recalls(sim, ds)["d2q_r1"] == 100.0


class _WordVectors(nn.Module):
    """A stub encoder: each token's hidden state is a fixed vector ([CLS], [SEP], padding: 0), so a
    one-word text's mean-pooled embedding is that word's vector."""

    main_input_name = "input_ids"

    def __init__(self, vectors: dict[int, list[float]], vocab: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, 2)
        with torch.no_grad():
            self.table.weight.zero_()
            for token, v in vectors.items():
                self.table.weight[token] = torch.tensor(v)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.table(input_ids))


def test_evaluate_ranks_by_the_pooled_embeddings(tmp_path):
    task = _task(tmp_path)
    tok = task.built.tokenizer
    words = ["apple", "banana", "cherry", "red", "yellow", "dark"]
    ids = {w: tok.convert_tokens_to_ids(w) for w in words}
    # documents apple / banana / cherry; queries red -> apple, yellow -> banana, dark -> cherry;
    # "dark" is closer to apple than to cherry
    vectors = {ids["apple"]: [1, 0], ids["banana"]: [0, 1], ids["cherry"]: [-1, 0.2],
               ids["red"]: [1, 0.1], ids["yellow"]: [0.1, 1], ids["dark"]: [1, -0.5]}
    task.splits["val"] = TextPairs.from_pairs([("red", "apple"), ("yellow", "banana"), ("dark", "cherry")])
    stub = _WordVectors(vectors, tok.vocab_size)
    r = task.evaluate(stub, "val", torch.device("cpu"))
    assert r["q2d_r1"] == pytest.approx(200 / 3)  # dark -> apple first (cherry third)
    assert r["d2q_r1"] == pytest.approx(200 / 3)  # cherry -> yellow ([0.1, 1]: 0.2 - 0.1) above dark
    # a distractor "grape" next to "red" ([1, 0.05]: closer to red than apple is) takes red's first place
    vectors[tok.convert_tokens_to_ids("grape")] = [1, 0.05]
    stub = _WordVectors(vectors, tok.vocab_size)
    task.splits["val"] = TextPairs.from_pairs([("red", "apple"), ("yellow", "banana"), ("dark", "cherry")],
                                              distractors=["grape"])
    r = task.evaluate(stub, "val", torch.device("cpu"))
    assert r["q2d_r1"] == pytest.approx(100 / 3)  # yellow -> banana only
    assert r["d2q_r1"] == pytest.approx(200 / 3)  # unchanged: the distractor is no d2q query
    # the real tiny BertModel: every recall a percentage of the split's 3 documents / 6 queries
    real = task.evaluate(task.model, "test", torch.device("cpu"))
    assert set(real) >= {"q2d_r1", "q2d_r5", "q2d_r10", "d2q_r1", "d2q_r5", "d2q_r10", "r_mean"}
    assert all(0 <= v <= 100 for v in real.values()) and real["q2d_r5"] == 100.0


def test_example_inputs_are_max_tokens_long(tmp_path):
    task = _task(tmp_path)
    inputs = task.example_inputs(3)
    assert inputs["input_ids"].shape == (3, 12) and inputs["attention_mask"].all()
    assert upop.count_flops(task.model, task.example_inputs(1)) > 0


def test_check_model_refuses_a_non_text_model(tmp_path):
    task = _task(tmp_path)
    clip = PRESETS["tiny-clip"].build(16, None).model
    with pytest.raises(ConfigError, match="task text_retrieval needs a text encoder .* got CLIPModel"):
        task.check_model(clip)


# ---- the engine on BertModel ----------------------------------------------------------------------
def test_minilm_has_six_attention_and_six_mlp_structures():
    model = PRESETS["minilm-text"].build(64, None).model
    kinds = [s.kind for s in upop.discover(model)]
    assert kinds.count("attention") == 6 and kinds.count("mlp") == 6 and len(kinds) == 12


@pytest.mark.parametrize("granularity", ["head_dim", "head"])
def test_compressed_equals_masked_on_bert(granularity):
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=32)).eval()
    ids = torch.randint(0, 100, (6, 10))
    mask = torch.ones_like(ids)
    mask[3:, 7:] = 0  # padded rows
    doc_ids = torch.tensor([0, 1, 2])
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).last_hidden_state
    config = upop.UPopConfig(target=0.5, total_steps=12, interval=3, granularity=granularity)
    search = upop.UPopSearch(model, config)
    for _ in range(config.total_steps):
        emb = pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        loss = pair_loss(20 * emb[:3] @ emb[3:].t(), doc_ids) + search.sparsity_loss()
        loss.backward()
        search.step()
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (masked - dense).abs().max() > 1e-4, "the masks must change the output"
    plan = search.plan()
    compressed = search.compress()
    assert type(compressed) is tf.BertModel
    with torch.no_grad():
        got = compressed(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got - masked).abs().max() <= 1e-5
    assert abs(plan.stats["achieved"] - 0.5) <= 0.02


# ---- the command line -----------------------------------------------------------------------------
def test_compress_then_evaluate_from_a_local_folder(tmp_path, capsys):
    folder = tmp_path / "encoder"
    tok = minilm_tokenizer()
    tf.BertModel(tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=32)).save_pretrained(folder)
    tok.save_pretrained(folder)
    files = _write_pairs(tmp_path, 16, 2)
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "task": "text_retrieval", "output_dir": str(out), "model": {"name": str(folder)},
        "data": {"format": "text_pairs", **files, "max_tokens": 12},
        "text_retrieval": {"pooling": "mean", "scale": 20.0, "symmetric": True},
        "upop": {"target": 0.5, "interval": 2},
        "train": {"batch_size": 8, "eval_batch_size": 8, "dense_epochs": 1, "search_epochs": 2,
                  "retrain_epochs": 1, "lr": 1e-3, "dense_lr": 1e-3, "search_lr": 1e-3},
        "eval": {"latency_batches": [1, 2], "latency_repeats": 1},
    }))
    assert cli.main(["compress", "--config", str(config)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "text_retrieval" and metrics["metric"] == "r_mean"
    for column in ("dense", "compressed"):
        assert 0 <= metrics[column]["metrics"]["r_mean"] <= 100
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]
    assert abs(metrics["achieved"] - 0.5) <= 0.02
    assert cli.main(["evaluate", "--model", str(out / "model"), "--config", str(config)]) == 0
    assert "r_mean" in capsys.readouterr().out
    assert type(upop.from_pretrained(out / "model")) is tf.BertModel
