"""The demo (`make demo`): embeds stdlib docstrings with an embedded model and answers questions.

Gemma 3 270M is converted into the model cache the session starts with, as in
test_gemma3_270m.py (read at collection, before conftest's ``default_model_folder`` points the
cache at a session folder): once per machine.
"""

from llm2vec_fast.default_model import CACHE_ENV, model_cache_dir
from llm2vec_fast.demo import main

SESSION_CACHE = model_cache_dir()


def test_demo_runs_again_with_another_limit(tmp_path, capsys):
    assert main(["--output", str(tmp_path), "--limit", "4"]) == 0
    first = capsys.readouterr().out
    assert "rows in 4 = embedded 4 + errors 0" in first and first.count("\nQ: ") == 6
    # the package's LLM2Vec encoder: the shipped adapters, bidirectional attention
    assert "+ adapters mntp, simcse: mean pooling" in first and "bidirectional attention" in first
    # the finished job no longer matches
    assert main(["--output", str(tmp_path), "--limit", "3"]) == 0
    again = capsys.readouterr().out
    assert (
        "embedding again" in again
        and "stdlib_docstrings.jsonl" in again
        and "rows in 3 = embedded 3 + errors 0" in again
    )


def test_demo_on_gemma_writes_beside_the_default_models_output(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(SESSION_CACHE))
    monkeypatch.chdir(tmp_path)
    assert main(["--model", "gemma3-270m", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model: Gemma 3 270M (embedded, causal) at ")
    assert "rows in 3 = embedded 3 + errors 0" in out and out.count("\nQ: ") == 6
    assert (tmp_path / "demo_output" / "gemma3-270m" / "stdlib_docstrings.jsonl").is_file()
    assert (tmp_path / "demo_output" / "gemma3-270m" / "embeddings").is_dir()
    assert not (tmp_path / "demo_output" / "embeddings").exists()
