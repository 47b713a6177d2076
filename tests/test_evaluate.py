"""Summary evaluation CLI: hand-computed novelty and copying, ROUGE, plot, malformed input."""

import json
import os
import subprocess
import sys

import pytest

from rlhf_jax import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLES = [
    # Words: the cat sat a dog ran. Sentences: "the cat sat" (copied), "a dog ran" (novel).
    {"query": "The cat sat on the mat.", "response": "The cat sat. A dog ran.", "step": 3},
    # Words: the cat sat on the (5 words, all the article's opening): copies from the start.
    {"query": "The cat sat on the mat.", "response": "The cat sat on the", "step": 3},
]


def write(tmp_path, rows, name="samples.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_novelty_and_copying_match_hand_counts(tmp_path):
    out = str(tmp_path / "report.json")
    report = evaluate.evaluate_samples(write(tmp_path, SAMPLES), out, str(tmp_path / "r.png"))
    # Pooled over both summaries. Unigrams: 3 novel of 6 + 0 of 5. Bigrams: "sat a", "a dog",
    # "dog ran" of 5 + 0 of 4. Trigrams: 3 of 4 + 0 of 3. 4-grams: 3 of 3 + 0 of 2.
    # Sentences: "a dog ran" of 3 (the second summary is one copied sentence).
    want = {"novel_1gram_pct": 300 / 11, "novel_2gram_pct": 300 / 9, "novel_3gram_pct": 300 / 7,
            "novel_4gram_pct": 300 / 5, "novel_sentence_pct": 100 / 3}
    assert report["novelty"] == pytest.approx(want)
    # Only the second opens with >= 5 words of the article's start (the first has "a dog").
    assert report["copy_from_start_rate"] == 0.5
    assert report["n"] == 2 and report["mean_words"] == 5.5 and "rouge" not in report
    assert json.load(open(out)) == json.loads(json.dumps(report))
    assert open(tmp_path / "r.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_references_give_rouge_and_reference_novelty(tmp_path):
    rows = [dict(r, reference="The cat sat on the mat.") for r in SAMPLES]
    report = evaluate.evaluate_samples(write(tmp_path, rows), str(tmp_path / "out.json"),
                                       str(tmp_path / "r.png"))
    assert set(report["rouge"]) == {"rouge1", "rouge2", "rougeL", "rouge_avg"}
    assert 0 < report["rouge"]["rouge1"] < 1
    # The references are the articles themselves: nothing in them is novel.
    assert set(report["reference_novelty"].values()) == {0.0}


def test_step_filter_and_nan_as_null(tmp_path):
    rows = SAMPLES + [{"query": "x y z", "response": "Hi.", "step": 7}]
    report = evaluate.evaluate_samples(write(tmp_path, rows), str(tmp_path / "o.json"),
                                       str(tmp_path / "p.png"), step=7)
    # One one-word summary: no bigrams at all, so those percentages are null, not NaN.
    assert report["n"] == 1 and report["step"] == 7
    assert report["novelty"]["novel_1gram_pct"] == 100.0
    assert report["novelty"]["novel_2gram_pct"] is None
    assert "NaN" not in open(tmp_path / "o.json").read()
    with pytest.raises(evaluate.SamplesError, match="no samples with step 9"):
        evaluate.read_samples(write(tmp_path, rows), step=9)


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"samples.jsonl:2: malformed JSON"),
    ("[1, 2]", r"samples.jsonl:2: expected a JSON object, got list"),
    ('{"query": "a"}', r"samples.jsonl:2: missing field 'response'"),
    ('{"query": "a", "response": 3}', r"samples.jsonl:2: field 'response' is int"),
    ('{"query": "a", "response": "b", "reference": "c"}', r"line 2 has a 'reference' but line 1"),
])
def test_malformed_rows_name_file_and_line(tmp_path, bad, message):
    path = write(tmp_path, [SAMPLES[0], bad])
    with pytest.raises(evaluate.SamplesError, match=message):
        evaluate.read_samples(path)


def test_empty_file_and_missing_step(tmp_path):
    with pytest.raises(evaluate.SamplesError, match="no samples"):
        evaluate.read_samples(write(tmp_path, ["", "  "]))
    path = write(tmp_path, [{"query": "a", "response": "b"}])
    with pytest.raises(evaluate.SamplesError, match=r":1: no 'step' field"):
        evaluate.read_samples(path, step=0)


def test_command_line(tmp_path):
    out, png = str(tmp_path / "report.json"), str(tmp_path / "report.png")
    cmd = [sys.executable, "-m", "rlhf_jax.evaluate", "--samples", write(tmp_path, SAMPLES),
           "--output", out, "--plot", png]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.load(open(out))["copy_from_start_rate"] == 0.5 and os.path.getsize(png) > 1000
    assert json.loads(res.stdout.strip().splitlines()[-1])["n"] == 2
    bad = subprocess.run(cmd[:4] + [write(tmp_path, ["{oops"], "bad.jsonl"), "--output", out],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "bad.jsonl:1: malformed JSON" in bad.stderr


def test_lead3_baseline(tmp_path):
    """Lead-3: the first three sentences of each distinct article, scored like the samples."""
    article = "Storm hits coast. Roads closed.\n\nSchools shut on Monday! Power is back."
    rows = [{"query": article, "response": r, "reference": "Storm closes roads and schools."}
            for r in ("A storm came.", "Roads closed. Schools shut.")]
    report = evaluate.evaluate_samples(write(tmp_path, rows), str(tmp_path / "o.json"),
                                       str(tmp_path / "p.png"))
    lead3 = report["lead3"]
    # One distinct article (two samples of it), its lead across the paragraph break.
    assert lead3["n"] == 1
    assert lead3["mean_words"] == len("Storm hits coast Roads closed Schools shut on Monday".split())
    assert set(lead3["novelty"].values()) == {0.0} and lead3["copy_from_start_rate"] == 1.0
    want = evaluate.summary_metrics.rouge_scores(
        ["Storm hits coast. Roads closed. Schools shut on Monday!"],
        ["Storm closes roads and schools."])
    assert lead3["rouge"] == pytest.approx(want)
    assert "lead3" not in evaluate.evaluate_samples(
        write(tmp_path, rows), str(tmp_path / "o2.json"), lead3=False)
    # Without references (not a summarization task) there is no baseline to score.
    assert "lead3" not in evaluate.evaluate_samples(write(tmp_path, SAMPLES),
                                                    str(tmp_path / "o3.json"))
