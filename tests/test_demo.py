"""The demo (`make demo`): embeds stdlib docstrings with the default model and answers questions."""

from llm2vec_fast.demo import main


def test_demo_runs_again_with_another_limit(tmp_path, capsys):
    assert main(["--output", str(tmp_path), "--limit", "4"]) == 0
    first = capsys.readouterr().out
    assert "rows in 4 = embedded 4 + errors 0" in first and first.count("\nQ: ") == 6
    # the finished job no longer matches
    assert main(["--output", str(tmp_path), "--limit", "3"]) == 0
    again = capsys.readouterr().out
    assert (
        "embedding again" in again
        and "stdlib_docstrings.jsonl" in again
        and "rows in 3 = embedded 3 + errors 0" in again
    )
