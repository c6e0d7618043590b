import json

from glm.core.metrics import MetricsLog, read_metrics


def test_a_torn_last_line_is_skipped_by_the_reader_and_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in (1, 2, 3):
            log.write({"step": step, "loss": 1.0 / step})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 4, "lo')  # a crash mid-write
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    MetricsLog(path).truncate_after(2)  # resuming from the step-2 checkpoint
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_fresh_starts_anew_and_keyword_fields_are_records(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 9}\n')
    with MetricsLog(path, fresh=True) as log:
        log.write(kind="eval", step=1, val_accuracy=0.5)
    assert read_metrics(path) == [{"kind": "eval", "step": 1, "val_accuracy": 0.5}]
    MetricsLog(path, enabled=False).write(step=2)  # ranks other than 0 write nothing
    assert len(read_metrics(path)) == 1
