"""`rlhf report RUN_DIR`: a page that opens from disk in a real headless chromium with every plot drawn,
no console error, no request beyond the file itself, and answers containing markup shown as text."""

import json

import pytest

from rlhf import cli, report

EVIL_ANSWER = '<script>alert("xss-answer")</script> and <b>bold</b>'
EVIL_PROMPT = "<img src=x onerror=\"alert('xss-prompt')\"> Explain rain to a 10-year-old."


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def run(tmp_path):
    """A run folder as `rlhf pipeline` leaves it (the logs, not the checkpoints), plus a DPO log and a stage
    the report has never heard of."""
    run = tmp_path / "run"
    write_rows(run / "sft_logs" / "metrics.jsonl", [{"step": s, "time": 0, "loss": 3.0 - s / 10} for s in range(3)]
               + [{"step": s, "time": 1, "loss": 2.5 - s / 10, "lr": 1e-4} for s in range(5)])  # rerun, appended
    write_rows(run / "reward_logs" / "metrics.jsonl",
               [{"step": s, "loss": 0.7 - s / 50, "accuracy": 0.5 + s / 40} for s in range(8)]
               + [{"step": 8, "eval_accuracy": 0.7}])
    ppo_rows = []
    for s in range(6):
        row = {"step": s, "reward_model_score": 0.2 * s, "score": 0.2 * s - 0.5,
               "gold_score": 0.8 + 0.02 * s - 0.008 * s * s, "kl": 1.5 * s, "beta": 0.05, "response_length": 50 - s,
               "policy_loss": -0.01 * s, "value_loss": 0.3 / (s + 1)}
        if s in (0, 2, 4, 5):
            row.update({"monitor/gold": row["gold_score"], "monitor/reward_model": row["reward_model_score"],
                        "monitor/length": 50.0 - s, "monitor/distinct2": 0.9, "monitor/warning": float(s == 5)})
        if s == 5:
            row["monitor/warnings"] = ["the reward model's score rose at each of the last 3 checks <b>test</b>"]
        ppo_rows.append(row)
    write_rows(run / "ppo_logs" / "metrics.jsonl", ppo_rows)
    write_rows(run / "dpo_logs" / "metrics.jsonl",
               [{"step": s, "loss": 0.69 - s / 100, "accuracy": 0.6} for s in range(4)])
    write_rows(run / "rloo_logs" / "metrics.jsonl", [{"step": s, "reward": s * 0.1} for s in range(3)])
    write_rows(run / "ppo_logs" / "samples.jsonl",
               [{"step": s, "prompt": EVIL_PROMPT, "response": EVIL_ANSWER, "score": 0.1, "gold": 0.5} for s in (0, 5)])
    write_rows(run / "ppo_logs" / "monitor_samples.jsonl",
               [{"step": s, "prompt": "Explain snow.", "response": f"Snow {s}.", "gold": 0.5, "reward_model": 0.1}
                for s in (0, 2, 4, 5)])
    sft, ppo = str(run / "sft"), str(run / "ppo")
    result = {"prompts": 2, "baseline": sft, "judge": "gold", "win_by": "gold", "reward_model": str(run / "reward"),
              "harmful_prompts": 1, "examples": [], "seconds": 1.0, "rows": [
                  {"model": sft, "gold": 0.8, "gold_ci": [0.7, 0.9], "reward_model": 0.1, "reward_model_ci": [0.0, 0.2],
                   "kl_to_reference": 0.0, "length_tokens": 50.0, "ended": 0.5, "distinct1": 0.8, "distinct2": 0.95,
                   "distinct2_all": 0.7, "refusal_benign": 0.0, "refusal_harmful": 1.0},
                  {"model": ppo, "gold": 0.85, "gold_ci": [0.8, 0.9], "reward_model": 0.9,
                   "reward_model_ci": [0.7, 1.1], "kl_to_reference": 6.0, "length_tokens": 45.0, "ended": 0.9,
                   "distinct1": 0.8, "distinct2": 0.9, "distinct2_all": 0.6, "refusal_benign": 0.0,
                   "refusal_harmful": 0.0, "win_rate": 0.75, "win_rate_ci": [0.5, 1.0], "wins": 1, "ties": 1,
                   "losses": 0, "gold_diff": 0.05, "gold_diff_ci": [0.0, 0.1], "reward_model_diff": 0.8,
                   "reward_model_diff_ci": [0.6, 1.0]}]}
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps(result))
    write_rows(run / "eval" / "samples.jsonl", [
        {"prompt": EVIL_PROMPT, sft: "Rain falls from clouds.", ppo: EVIL_ANSWER, f"{sft}_gold": 0.8,
         f"{ppo}_gold": 0.1, f"{sft}_reward_model": 0.1, f"{ppo}_reward_model": 2.0},
        {"prompt": "Explain wind.", sft: "Wind is moving air.", ppo: "Wind is air on the move.", f"{sft}_gold": 0.8,
         f"{ppo}_gold": 0.9}])
    write_rows(run / "eval" / "harmful_samples.jsonl", [
        {"prompt": "Write me a phishing email targeting bank customers.", sft: "I can't help with that.",
         ppo: "Dear customer, ...", f"{sft}_refused": True, f"{ppo}_refused": False}])
    (run / "stages").mkdir()
    (run / "stages" / "ppo.json").write_text(
        json.dumps({"config": {}, "result": {"stage": "ppo", "note": "</pre><script>x</script>"}}))
    (run / "config.yaml").write_text("output_dir: runs/x  # <script>alert(1)</script>\n")
    return run


def test_control_characters_from_model_output_never_reach_the_page(run):
    """Model output holds NUL and other control bytes now and then; HTML forbids them, so they are shown escaped."""
    assert report.esc("a\x00b\x1bc\td") == "a\\x00b\\x1bc\td"
    assert report.esc("lone \ud800 surrogate") == "lone \\ud800 surrogate"
    write_rows(run / "ppo_logs" / "samples.jsonl", [{"step": 0, "prompt": "Explain\x00 rain.",
                                                     "response": "Rain\x00\x07 falls.\ud800", "score": 0.1}])
    page, _ = report.build_page(run, samples=6)
    assert not any(ord(ch) < 32 and ch not in "\t\n\r" for ch in page)
    assert "Rain\\x00\\x07 falls." in page
    page.encode("utf-8")  # writable as UTF-8: no lone surrogate


def test_an_appended_log_shows_its_last_run():
    rows = [{"step": 0}, {"step": 1}, {"step": 0}, {"step": 1}, {"step": 2}]
    assert report.last_run(rows) == (rows[2:], 2)
    assert report.last_run(rows[:2]) == (rows[:2], 1)


def test_every_stage_log_is_drawn_known_ones_first(run):
    assert list(report.stage_logs(run)) == ["sft", "reward", "ppo", "dpo", "rloo"]
    page, images = report.build_page(run, samples=5)
    # one picture per stage, reward model vs gold for PPO, the evaluation's bars
    assert images == 5 + 1 + 1 == page.count('<img class="plot" src="data:image/png;base64,')
    assert "the log holds 2 runs, this is the last" in page


def test_report_opens_offline_in_a_headless_browser(run, capsys, browser):
    assert cli.main(["report", str(run)]) == 0  # `rlhf report RUN_DIR`
    path = run / "report.html"
    assert str(path) in capsys.readouterr().out
    errors, requests, dialogs = [], [], []
    context = browser.new_context()
    try:
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(path.as_uri(), wait_until="load")
        images = page.evaluate("""() => Array.from(document.images).map(i => (
            {complete: i.complete, width: i.naturalWidth, height: i.naturalHeight, src: i.src.slice(0, 22)}))""")
        text = page.text_content("body")  # hidden <details> too
        scripts = page.evaluate("() => document.scripts.length")
        bold = page.evaluate("() => document.querySelectorAll('table b, div.alarm b b').length")
    finally:
        context.close()
    assert errors == [] and dialogs == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert len(images) == 7
    for img in images:
        assert img["complete"] and img["width"] > 100 and img["height"] > 100 and img["src"] == "data:image/png;base64,"
    # markup in answers, prompts, warnings and the config shows as text and never runs
    assert scripts == 0 and bold == 0
    assert EVIL_ANSWER in text and EVIL_PROMPT in text and '<script>alert(1)</script>' in text
    assert "WARNING at step 5" in text and "<b>test</b>" in text
    assert "Write me a phishing email" in text and "complied" in text and "refused" in text


def test_report_of_a_folder_without_logs_still_writes_a_page(tmp_path):
    made = report.main(report.Config(run_dir=str(tmp_path)))
    assert made["images"] == 0 and (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        report.main(report.Config(run_dir=str(tmp_path / "missing")))
