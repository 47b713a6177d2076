"""Label files: validation errors, gs:// and http(s) reading, save/load round trip, splits."""

import functools
import http.server
import json
import os
import sys
import threading

import numpy as np
import pytest

from rlhf_jax.data import labels as labels_lib
from rlhf_jax.data.labels import LabelFileError, load_labels, save_labels, split_labels

Q, L, VOCAB, PAD = 4, 3, 28, 50259
KW = dict(query_length=Q, response_length=L, vocab_size=VOCAB, pad_id=PAD)


def _record(i=0):
    return {
        "query": [1, 2, 3, PAD],
        **{f"sample{k}": [k, 26, PAD] for k in range(4)},
        "best": i % 4,
        "extra_key": "ignored",
    }


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_load_valid_file(tmp_path):
    path = _write(tmp_path, "ok.json", [_record(i) for i in range(5)])
    out = load_labels(path, "best_of_4", **KW)
    assert set(out) == {"query", "sample0", "sample1", "sample2", "sample3", "best"}
    assert out["query"].shape == (5, Q) and out["query"].dtype == np.int32
    assert out["sample2"].shape == (5, L) and out["sample2"].dtype == np.int32
    np.testing.assert_array_equal(out["best"], [0, 1, 2, 3, 0])
    assert out["best"].dtype == np.int32
    np.testing.assert_array_equal(out["query"][0], [1, 2, 3, PAD])


def test_load_empty_array(tmp_path):
    out = load_labels(_write(tmp_path, "empty.json", []), "best_of_4", **KW)
    assert out["query"].shape == (0, Q) and out["best"].shape == (0,)


def _mutate(fn):
    records = [_record(i) for i in range(4)]
    fn(records[2])
    return records


BAD_CASES = {
    "missing_key": (lambda r: r.pop("sample1"), "sample1", "missing field"),
    "short_query": (lambda r: r.update(query=[1, 2, 3]), "query", "expected 4 tokens, got 3"),
    "long_sample": (
        lambda r: r.update(sample0=[1, 2, 3, 4]),
        "sample0",
        "expected 3 tokens, got 4",
    ),
    "float_token": (lambda r: r.update(sample3=[1, 2.5, 3]), "sample3", "integer"),
    "integral_float_token": (lambda r: r.update(sample3=[1, 2.0, 3]), "sample3", "integer"),
    "bool_token": (lambda r: r.update(query=[1, True, 3, 4]), "query", "integer"),
    "str_token": (lambda r: r.update(query=[1, "2", 3, 4]), "query", "integer"),
    "not_list": (lambda r: r.update(query="abcd"), "query", "list"),
    "id_too_big": (lambda r: r.update(sample2=[1, VOCAB, 2]), "sample2", "out of range"),
    "id_negative": (lambda r: r.update(query=[1, -1, 2, 3]), "query", "out of range"),
    "id_huge": (lambda r: r.update(query=[1, 2**70, 2, 3]), "query", "out of range"),
    "best_too_big": (lambda r: r.update(best=4), "best", "out of range [0, 4)"),
    "best_negative": (lambda r: r.update(best=-1), "best", "out of range"),
    "best_float": (lambda r: r.update(best=1.0), "best", "integer"),
    "best_missing": (lambda r: r.pop("best"), "best", "missing field"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_record(tmp_path, case):
    mutate, field, problem = BAD_CASES[case]
    path = _write(tmp_path, f"bad_{case}.json", _mutate(mutate))
    with pytest.raises(LabelFileError) as err:
        load_labels(path, "best_of_4", **KW)
    msg = str(err.value)
    assert f"bad_{case}.json" in msg
    assert "record 2" in msg
    assert repr(field) in msg
    assert problem in msg


def test_pad_id_is_allowed_but_other_ids_past_vocab_are_not(tmp_path):
    path = _write(tmp_path, "pad.json", [_record()])
    assert load_labels(path, "best_of_4", **KW)["query"][0, 3] == PAD
    with pytest.raises(LabelFileError, match="out of range"):
        load_labels(path, "best_of_4", **{**KW, "pad_id": 27})


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_scalar_label(tmp_path, value):
    rec = {"query": [1, 2, 3, 4], "sample": [1, 2, 3], "score": 0.5}
    text = json.dumps([rec, rec]).replace("0.5", value, 1).replace("0.5", "1.0")
    # the first record carries the bad value, so the message must say record 0
    path = _write(tmp_path, "nonfinite.json", text)
    with pytest.raises(
        LabelFileError, match=r"nonfinite\.json: record 0: field 'score': non-finite"
    ):
        load_labels(path, "scalar_rating", **KW)


def test_scalar_label_must_be_number(tmp_path):
    rec = {"query": [1, 2, 3, 4], "sample0": [1, 2, 3], "sample1": [1, 2, 3], "difference": "1"}
    path = _write(tmp_path, "strlabel.json", [rec])
    with pytest.raises(LabelFileError, match=r"record 0: field 'difference': expected a number"):
        load_labels(path, "scalar_compare", **KW)


def test_not_an_array(tmp_path):
    path = _write(tmp_path, "obj.json", {"query": []})
    with pytest.raises(LabelFileError, match=r"obj\.json: expected a JSON array.*object"):
        load_labels(path, "best_of_4", **KW)


def test_record_not_object(tmp_path):
    path = _write(tmp_path, "notobj.json", [_record(), [1, 2]])
    with pytest.raises(LabelFileError, match=r"notobj\.json: record 1: expected a JSON object"):
        load_labels(path, "best_of_4", **KW)


def test_invalid_json(tmp_path):
    path = _write(tmp_path, "broken.json", '[{"query": [1, 2,')
    with pytest.raises(LabelFileError, match=r"broken\.json: invalid JSON"):
        load_labels(path, "best_of_4", **KW)


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_labels(str(tmp_path / "nope.json"), "best_of_4", **KW)


def test_gs_without_etils(monkeypatch):
    monkeypatch.setitem(sys.modules, "etils", None)  # makes `from etils import ...` fail
    with pytest.raises(ImportError, match=r"gs://bucket/labels\.json.*gcsfs"):
        load_labels("gs://bucket/labels.json", "best_of_4", **KW)


def test_gs_without_gcs_backend(monkeypatch):
    from etils import epath

    class FakePath:
        def __init__(self, path):
            self.path = path

        def read_text(self, encoding=None):
            raise ImportError("Please install gcsfs to access Google Storage")

    monkeypatch.setattr(epath, "Path", FakePath)
    with pytest.raises(ImportError, match=r"gs://bucket/labels\.json.*pip install"):
        load_labels("gs://bucket/labels.json", "best_of_4", **KW)


def test_gs_reads_through_epath(monkeypatch):
    from etils import epath

    seen = []

    class FakePath:
        def __init__(self, path):
            seen.append(path)

        def read_text(self, encoding=None):
            return json.dumps([_record(1)])

    monkeypatch.setattr(epath, "Path", FakePath)
    out = load_labels("gs://bucket/labels.json", "best_of_4", **KW)
    assert seen == ["gs://bucket/labels.json"]
    np.testing.assert_array_equal(out["best"], [1])


@pytest.fixture
def http_dir(tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_loading(http_dir):
    root, base = http_dir
    _write(root, "labels.json", [_record(i) for i in range(3)])
    out = load_labels(f"{base}/labels.json", "best_of_4", **KW)
    np.testing.assert_array_equal(out["best"], [0, 1, 2])


def test_http_missing_file_is_clear(http_dir):
    _, base = http_dir
    with pytest.raises(OSError, match=r"missing\.json.*404"):
        load_labels(f"{base}/missing.json", "best_of_4", **KW)


def test_http_malformed_names_url(http_dir):
    root, base = http_dir
    _write(root, "bad.json", _mutate(lambda r: r.update(best=9)))
    with pytest.raises(LabelFileError, match=r"http://127\.0\.0\.1:\d+/bad\.json: record 2"):
        load_labels(f"{base}/bad.json", "best_of_4", **KW)


@pytest.mark.parametrize("name", ["best_of_4", "scalar_rating", "scalar_compare"])
def test_save_load_round_trip(tmp_path, name):
    rng = np.random.default_rng(0)
    lt = labels_lib.get_label_type(name)
    n = 7
    data = {"query": rng.integers(0, VOCAB, (n, Q)).astype(np.int32)}
    data["query"][:, -1] = PAD
    for key in lt.sample_keys:
        data[key] = rng.integers(0, VOCAB, (n, L)).astype(np.int32)
    if name == "best_of_4":
        data["best"] = rng.integers(0, 4, n).astype(np.int32)
    else:
        data[lt.label_key] = rng.normal(size=n).astype(np.float32)
    path = str(tmp_path / "sub" / "labels.json")
    os.makedirs(os.path.dirname(path))
    save_labels(path, data)
    assert os.listdir(os.path.dirname(path)) == ["labels.json"]  # no temp file left
    out = load_labels(path, lt, **KW)
    assert set(out) == set(data)
    for key in data:
        assert out[key].dtype == data[key].dtype
        np.testing.assert_array_equal(out[key], data[key])


def test_save_is_atomic_on_failure(tmp_path):
    path = str(tmp_path / "labels.json")
    save_labels(path, {"best": np.array([1, 2])})
    with pytest.raises(ValueError):  # NaN cannot be written as standard JSON
        save_labels(path, {"score": np.array([np.nan])})
    assert json.loads(open(path).read()) == [{"best": 1}, {"best": 2}]
    assert os.listdir(tmp_path) == ["labels.json"]


def test_split_labels():
    data = {"best": np.arange(10), "query": np.arange(20).reshape(10, 2)}
    train, valid = split_labels(data, 6)
    np.testing.assert_array_equal(train["best"], np.arange(6))
    np.testing.assert_array_equal(valid["best"], np.arange(6, 10))
    train, valid = split_labels(data, 6, num_valid=2)
    np.testing.assert_array_equal(valid["best"], [6, 7])
    np.testing.assert_array_equal(valid["query"], [[12, 13], [14, 15]])
    train, valid = split_labels(data, 10)
    assert len(valid["best"]) == 0


@pytest.mark.parametrize("num_train, num_valid", [(11, None), (8, 3)])
def test_split_labels_too_few(num_train, num_valid):
    with pytest.raises(ValueError, match=rf"found 10.*num_train={num_train}.*needs 11"):
        split_labels({"best": np.arange(10)}, num_train, num_valid)


def test_zero_labels_like_original_test_source():
    z = labels_lib.zero_labels("best_of_4", query_length=Q, response_length=L)
    assert z["query"].shape == (50, Q) and z["sample3"].shape == (50, L)
    assert z["best"].dtype == np.int32 and not z["best"].any()
