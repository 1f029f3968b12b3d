from conftest import run_cli


def test_trained_fixture_learns(trained_model_dir):
    import json

    metrics = [json.loads(line) for line in (trained_model_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 300
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] < 4.0


def test_cli_help():
    r = run_cli("--help")
    assert r.returncode == 0 and "train" in r.stdout
