"""A small, fixed slice of ``scripts/load_test.py`` for CI: 4 concurrent ``gradio_client`` users × 2 requests each
against the real app, with the model running two requests at once (``EUREKA_CONCURRENCY=2``) so that answers could
actually get mixed up between sessions if anything were shared.

Every request must succeed and return exactly what a direct in-process call gives for that user's clip (greedy);
the four clips give four different answers, so a response delivered to the wrong user would be caught. The full
run (20 users × 5 requests × 2 rounds, p95 latency, memory growth) is ``scripts/load_test.py``; its numbers are in
``docs/reliability.md``.
"""

from __future__ import annotations

from pathlib import Path

from hostile import serve_app

from scripts.load_test import LoadReport, MemoryWatch, make_clips, reference_answers, run_load, summarise

USERS, REQUESTS, MAX_NEW_TOKENS = 4, 2, 16


def test_concurrent_users_each_get_the_answer_for_their_own_clip(tmp_path: Path) -> None:
    clips = make_clips(tmp_path / "clips", USERS)
    references = reference_answers("tiny-random", clips, "qa", MAX_NEW_TOKENS)
    assert len(set(references)) == USERS, "distinct clips give distinct answers (else a mix-up could hide)"
    env = {"EUREKA_CONCURRENCY": "2", "EUREKA_MAX_QUEUE": "16", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    with serve_app(env, tmp_path / "app.log") as app, MemoryWatch(app.process.pid) as watch:
        started = watch.read()
        done, milestones = run_load(app.url, clips, references, REQUESTS, 1, "qa", MAX_NEW_TOKENS, watch,
                                    warmup_requests=USERS)
        assert app.process.poll() is None, app.log_tail()
    report = summarise(LoadReport(USERS, REQUESTS, 1, "qa", "tiny-random", MAX_NEW_TOKENS), done, milestones, watch,
                       1.0, references)
    assert report.total_requests == USERS * REQUESTS
    assert report.failures == 0, report.errors
    assert report.mismatches == 0, [(r.user, r.index) for r in done if not r.matches]
    assert {r.user for r in done} == set(range(USERS))
    assert 0 < report.latency_p50_s <= report.latency_p95_s <= report.latency_max_s
    assert started and milestones["end"], "the server's memory was read"
