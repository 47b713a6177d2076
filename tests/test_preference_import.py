"""`python -m rlhf_jax.label import`: text preferences (JSONL, Parquet) into label files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax import metrics, train_reward
from rlhf_jax.data import labels as labels_lib
from rlhf_jax.data import preference_import as pi
from rlhf_jax.tokenizer import PAD_ID, get_tokenizer
from tests.test_train_reward import load_config
from tests.test_wandb_logging import (  # noqa: F401 - wandb_offline is a fixture
    read_offline_runs,
    rows_by_step,
    wandb_offline,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POS = "good great love happy wonderful excellent nice beautiful best amazing joy fun".split()
NEG = "bad terrible hate sad awful horrible worst ugly angry pain fear poor".split()
NEU = "the table walked window river paper house stone car door street tree".split()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sentiment_pairs(n, seed=0):
    """Prompts with a positive (chosen) and a negative (rejected) continuation."""
    rng = np.random.default_rng(seed)

    def text(words):
        return " " + " ".join(rng.choice(words + NEU, size=rng.integers(4, 9))) + "."

    return [{"prompt": f"The day began. {text(NEU)}", "chosen": text(POS), "rejected": text(NEG)}
            for _ in range(n)]


def do_import(path, fmt, out, **kw):
    kw.setdefault("tokenizer", get_tokenizer())
    return pi.import_preferences(path, fmt, str(out), query_length=kw.pop("q", 64),
                                 response_length=kw.pop("r", 24), vocab_size=50257,
                                 pad_id=PAD_ID, **kw)


def load(path, n=2, q=64, r=24):
    return labels_lib.load_labels(path, f"best_of_{n}", query_length=q, response_length=r,
                                  vocab_size=50257)


def test_pairs_shuffled_deterministic_truncated_and_deduplicated(tmp_path):
    rows = sentiment_pairs(40)
    rows[3]["rejected"] = rows[3]["chosen"]  # no preference: dropped
    rows[5]["chosen"] = " joy" * 30 + "."  # 31 tokens > 24: truncated and counted
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    summary = do_import(src, "pairs", tmp_path / "a.json", seed=3)
    assert summary["records_read"] == 40 and summary["labels_written"] == 39
    assert summary["dropped_identical"] == 1 and summary["truncated_responses"] == 1
    assert summary["records_truncated"] == 1 and summary["label_type"] == "best_of_2"
    labels = load(tmp_path / "a.json")
    tok = get_tokenizer()
    kept = [r for i, r in enumerate(rows) if i != 3]
    for i, row in enumerate(kept):
        best = labels["best"][i]
        chosen = tok.decode([t for t in labels[f"sample{best}"][i] if t != PAD_ID])
        rejected = tok.decode([t for t in labels[f"sample{1 - best}"][i] if t != PAD_ID])
        query = tok.decode([t for t in labels["query"][i] if t != PAD_ID])
        assert query == row["prompt"] and rejected == row["rejected"]
        assert chosen == (row["chosen"] if i != 4 else tok.decode(tok.encode(row["chosen"])[:24]))
    # Not always sample 0, and the same seed gives the same file.
    assert 8 <= labels["best"].sum() <= 30, labels["best"]
    do_import(src, "pairs", tmp_path / "b.json", seed=3)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    do_import(src, "pairs", tmp_path / "c.json", seed=4)
    assert not np.array_equal(load(tmp_path / "c.json")["best"], labels["best"])


def test_hh_rlhf_implicit_prompt_and_identical_after_truncation(tmp_path):
    long = " stone" * 30
    rows = [{"chosen": "\n\nHuman: Hi there\n\nAssistant: Sure thing.",
             "rejected": "\n\nHuman: Hi there\n\nAssistant: Surely not."},
            {"prompt": "A tree.", "chosen": long + " good.", "rejected": long + " bad."}]
    summary = do_import(write_jsonl(tmp_path / "hh.jsonl", rows), "pairs", tmp_path / "o.json")
    assert summary["labels_written"] == 1
    assert summary["dropped_identical_after_truncation"] == 1
    labels, tok = load(tmp_path / "o.json"), get_tokenizer()
    texts = {tok.decode([t for t in labels[k][0] if t != PAD_ID]) for k in ("sample0", "sample1")}
    assert texts == {" Sure thing.", " Surely not."}
    assert tok.decode([t for t in labels["query"][0] if t != PAD_ID]) == \
        "\n\nHuman: Hi there\n\nAssistant:"


def test_on_long_error_lists_every_long_record_and_writes_nothing(tmp_path):
    rows = sentiment_pairs(6)
    rows[1]["prompt"] = " ".join(["word"] * 80)
    rows[4]["rejected"] = " bad" * 30
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(pi.PreferenceImportError) as err:
        do_import(src, "pairs", tmp_path / "o.json", on_long="error")
    msg = str(err.value)
    assert "2 of 6 records exceed" in msg
    assert f"{src}:2: query has 80 tokens > 64" in msg
    assert f"{src}:5: response" in msg and "30 tokens > 24" in msg
    assert not (tmp_path / "o.json").exists()


def test_bad_input_names_file_line_and_field(tmp_path):
    rows = sentiment_pairs(3)
    del rows[1]["chosen"]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(pi.PreferenceImportError, match=r"p.jsonl:2: missing field 'chosen'"):
        do_import(src, "pairs", tmp_path / "o.json")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(pi.PreferenceImportError, match="empty.jsonl: the file holds no records"):
        do_import(str(empty), "pairs", tmp_path / "o.json")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(pi.PreferenceImportError, match=r"bad.jsonl:2: malformed JSON"):
        do_import(str(tmp_path / "bad.jsonl"), "pairs", tmp_path / "o.json")
    bon = [{"query": "Q.", "samples": [" a", " b", " c"], "best": 1},
           {"query": "Q.", "samples": [" a", " b"], "best": 0}]
    with pytest.raises(pi.PreferenceImportError, match="b.jsonl:2: 2 different sample counts"):
        do_import(write_jsonl(tmp_path / "b.jsonl", bon), "best_of_n", tmp_path / "o.json")
    bon = [{"query": "Q.", "samples": [" a", " b", " c"], "best": 3}]
    with pytest.raises(pi.PreferenceImportError, match=r"b.jsonl:1: field 'best'.*\[0, 3\), got 3"):
        do_import(write_jsonl(tmp_path / "b.jsonl", bon), "best_of_n", tmp_path / "o.json")
    conv = [{"prompt": "Q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}]
    with pytest.raises(pi.PreferenceImportError, match="field 'chosen'.*conversation lists"):
        do_import(write_jsonl(tmp_path / "c.jsonl", conv), "pairs", tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()


def test_best_of_n_keeps_order(tmp_path):
    rows = [{"query": f"Query {i}.", "samples": [f" s{k}" for k in range(4)], "best": i % 4}
            for i in range(8)]
    summary = do_import(write_jsonl(tmp_path / "b.jsonl", rows), "best_of_n", tmp_path / "o.json")
    assert summary["label_type"] == "best_of_4" and summary["best_counts"] == [2, 2, 2, 2]
    labels = load(tmp_path / "o.json", n=4)
    assert labels["best"].tolist() == [i % 4 for i in range(8)]


def sff_rows():
    """Comparisons in the schema of openai/summarize-from-feedback."""
    rows = []
    for i in range(6):
        rows.append({
            "info": {"id": f"t3_{i}", "post": f"My cat knocked over plant {i} today.",
                     "title": "cat", "subreddit": "pets"},
            "summaries": [{"text": f" Cat broke plant {i}.", "policy": "sup1", "note": None},
                          {"text": f" A post {i}.", "policy": "ref", "note": None}],
            "choice": i % 2, "worker": "w", "batch": "b1",
            "split": "train" if i < 4 else "valid1", "extra": {"confidence": 7}})
    return rows


def test_summarize_from_feedback_jsonl_and_parquet_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sff_rows()
    src = write_jsonl(tmp_path / "comparisons.jsonl", rows)
    summary = do_import(src, "summarize_from_feedback", tmp_path / "a.json", split="train")
    assert summary["labels_written"] == 4 and summary["records_read"] == 6
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "comparisons.parquet")
    do_import(str(tmp_path / "comparisons.parquet"), "summarize_from_feedback",
              tmp_path / "b.json", split="train")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    labels, tok = load(tmp_path / "a.json"), get_tokenizer()
    assert labels["best"].tolist() == [0, 1, 0, 1]  # the labeller's order is kept
    assert tok.decode([t for t in labels["query"][2] if t != PAD_ID]) == rows[2]["info"]["post"]
    del rows[1]["summaries"][0]["text"]
    with pytest.raises(pi.PreferenceImportError, match=r"x.jsonl:2: missing field 'summaries\[0\]"):
        do_import(write_jsonl(tmp_path / "x.jsonl", rows), "summarize_from_feedback",
                  tmp_path / "c.json")


@pytest.mark.slow
def test_cli_import_then_train_reward(tmp_path, wandb_offline):
    """The command line writes a file that train_reward (configs/sentiment.py:runlocal) trains on.

    The run also logs to W&B (offline): the trainer hands its config to the metrics writer."""
    src = write_jsonl(tmp_path / "pairs.jsonl", sentiment_pairs(320, seed=1))
    out, report = tmp_path / "labels.json", tmp_path / "report.json"
    cmd = [sys.executable, "-m", "rlhf_jax.label", "import", "--task",
           "configs/sentiment.py:runlocal", "--input", src, "--format", "pairs", "--output",
           str(out), "--report", str(report), "--seed", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == json.loads(report.read_text())
    assert json.loads(report.read_text())["labels_written"] == 320
    cfg = load_config()
    cfg.labels.path, cfg.labels.type = str(out), "best_of_2"
    cfg.labels.num_train, cfg.labels.num_valid = 256, 64
    cfg.rewards.batch_size = 16
    cfg.rewards.normalize_before = cfg.rewards.normalize_after = False
    cfg.rewards.verify_samples = 0
    cfg.wandb.project, cfg.wandb.mode = "rlhf-test", "offline"
    final = train_reward.train_reward(cfg, str(tmp_path / "rm"))
    assert final["valid/num_labels"] == 64
    assert final["valid/accuracy"] > 0.6, final
    ((_, history, config),) = read_offline_runs(str(tmp_path / "rm"))
    assert config["labels"]["path"] == str(out) and config["labels"]["type"] == "best_of_2"
    rows = metrics.read_jsonl(str(tmp_path / "rm" / metrics.METRICS_FILE))
    assert rows_by_step(rows) == history
    # Bad input through the command line: a clear error and exit status 1.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "rejected": "y"}])
    proc = subprocess.run(cmd[:7] + [bad] + cmd[8:], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "bad.jsonl:1: missing field 'chosen'" in proc.stderr
