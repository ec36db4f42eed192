"""The metrics feed: which pod is read, how readings, staleness and the termination summary merge into the
status the reporter computes, the rate limit, and one tick of the read loop against a fake reporter."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest

from qlora_operator import metrics_feed as mf
from qlora_operator import trainer_metrics as tm
from qlora_operator.reporter import Reporter
from qlora_operator.settings import Settings
from qlora_operator.status import COMPLETION_INDEX
from qlora_trainer.contract import Phase

NOW = datetime(2026, 11, 27, 22, 0, 0, tzinfo=timezone.utc)
SPEC = {"dataset": {"configMap": {"name": "qa", "key": "data.jsonl"}},
        "output": {"pvc": {"claimName": "adapters", "path": "bot"}}}


def pod(name, phase="Running", created="2026-11-27T21:00:00Z", ip="127.5.0.2", index=None, terminated=None,
        deleting=False):
    meta = {"name": name, "namespace": "ml", "creationTimestamp": created}
    if index is not None:
        meta["annotations"] = {COMPLETION_INDEX: str(index)}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-27T21:59:00Z"
    status = {"phase": phase, "podIP": ip}
    if terminated is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return {"metadata": meta, "status": status}


def running_desired(message="the trainer is running (Job bot)"):
    return {
        "phase": "Running",
        "message": message,
        "conditions": [
            {"type": "Running", "status": "True", "reason": "Running", "message": message,
             "lastTransitionTime": "2026-11-27T21:00:00Z"},
            {"type": "Succeeded", "status": "Unknown", "reason": "Running", "message": message,
             "lastTransitionTime": "2026-11-27T21:00:00Z"},
        ],
    }


def test_trainer_pod_is_the_newest_running_rank0():
    pods = [
        pod("a", created="2026-11-27T21:00:00Z"),
        pod("b", created="2026-11-27T21:05:00Z"),
        pod("c", created="2026-11-27T21:09:00Z", deleting=True),
        pod("w1", created="2026-11-27T21:10:00Z", index=1),
        pod("p", phase="Pending", created="2026-11-27T21:11:00Z"),
    ]
    assert mf.trainer_pod(pods)["metadata"]["name"] == "b"
    assert mf.trainer_pod([pod("w0", index=0), pod("w1", index=1, created="2026-11-27T22:00:00Z")])[
        "metadata"]["name"] == "w0"
    assert mf.trainer_pod([pod("done", phase="Succeeded")]) is None


def test_ended_summary_is_the_newest_ended_pods():
    summary = {"status": "Succeeded", "step": 20, "totalSteps": 20}
    old = pod("a", phase="Failed", created="2026-11-27T21:00:00Z",
              terminated={"exitCode": 137, "message": "Killed"})
    new = pod("b", phase="Succeeded", created="2026-11-27T21:05:00Z",
              terminated={"exitCode": 0, "message": json.dumps(summary)})
    assert mf.ended_summary([old, new]) == summary
    assert mf.ended_summary([old]) is None  # killed: no summary
    assert mf.ended_summary([]) is None
    retry = pod("c", created="2026-11-27T21:10:00Z")
    # A retry not read yet leaves the ended attempt's summary standing; once its readings are what the feed
    # holds, they are newer than any summary.
    assert mf.ended_summary([new, retry]) == summary
    assert mf.ended_summary([new, retry], values_pod="b") == summary
    assert mf.ended_summary([new, retry], values_pod="c") is None


def test_between_attempts_the_ended_attempts_summary_wins_over_its_older_reading():
    # Attempt 1 was last read at step 20, then saved a SIGTERM checkpoint at step 22 and said so in its
    # summary; the retry's pod exists but has not been read. Status must not go back to 20.
    evicted = pod("a", phase="Failed", created="2026-11-27T21:00:00Z", terminated={"exitCode": 143, "message": json.dumps(
        {"status": "Terminated", "step": 22, "totalSteps": 40, "lastCheckpoint": {"step": 22}})})
    retry = pod("b", phase="Pending", created="2026-11-27T21:10:00Z")
    track = reading(step=20, total_steps=40, last_checkpoint_step=20, phase=Phase.TRAINING)
    previous = {"step": 22, "totalSteps": 40, "progress": "55%", "lastCheckpoint": {"step": 22}}
    summary = mf.ended_summary([evicted, retry], track.values_pod)
    out, _ = merge({"phase": "Pending", "message": "m"}, previous=previous, track=track, summary=summary)
    assert out["step"] == 22 and out["lastCheckpoint"]["step"] == 22


def test_metric_fields():
    assert mf.metric_fields({"phase": "Running", "step": 3, "loss": None, "eta": "1s"}) == {"step": 3, "eta": "1s"}


def reading(**kw):
    return tm.observe(tm.MetricsTrack(), "a", NOW, sample=tm.TrainerSample(**kw))


def merge(desired, previous=None, track=None, summary=None, last_patch=None, min_interval=5.0, now=NOW,
          shown_pod="a"):
    return mf.merge_metrics(desired, previous or {}, track, summary, "pvc://adapters/bot", now, last_patch,
                            min_interval, shown_pod=shown_pod)


def test_a_reading_adds_fields_and_the_running_reason():
    track = reading(step=5, total_steps=20, loss=2.5, phase=Phase.EVALUATING, last_checkpoint_step=5)
    out, changed = merge(running_desired(), track=track)
    assert changed
    assert out["step"] == 5 and out["progress"] == "25%" and out["loss"] == 2.5
    assert out["lastCheckpoint"] == {"step": 5, "path": "pvc://adapters/bot/checkpoints/checkpoint-5"}
    running = next(c for c in out["conditions"] if c["type"] == "Running")
    assert running["reason"] == "Evaluating" and running["lastTransitionTime"] == "2026-11-27T21:00:00Z"
    assert next(c for c in out["conditions"] if c["type"] == "Succeeded")["reason"] == "Running"
    assert out["phase"] == "Running" and out["message"] == "the trainer is running (Job bot)"


def test_a_more_telling_reason_than_running_stays():
    desired = running_desired()
    desired["conditions"][0]["reason"] = "Finishing"
    out, _ = merge(desired, track=reading(step=20, phase=Phase.TRAINING))
    assert out["conditions"][0]["reason"] == "Finishing"


def test_without_readings_the_previous_values_stay():
    previous = {"step": 7, "loss": 2.0, "progress": "35%"}
    out, changed = merge(running_desired(), previous=previous)
    assert not changed and {k: out[k] for k in previous} == previous


def test_stale_keeps_values_and_phase_and_says_since_when():
    good = reading(step=5, total_steps=20, loss=2.5, phase=Phase.TRAINING)
    previous = tm.status_fields(good.last_good, NOW, "pvc://adapters/bot")
    stale = tm.observe(good, "a", NOW + timedelta(seconds=10), error="no answer within 3s")
    out, changed = merge(running_desired(), previous=previous, track=stale, now=NOW + timedelta(minutes=3))
    assert not changed
    assert out["phase"] == "Running" and out["step"] == 5 and out["loss"] == 2.5
    assert out["message"] == ("the trainer is running (Job bot); Trainer metrics stale since "
                              "2026-11-27T22:00:10Z (no answer within 3s); last values kept")
    assert next(c for c in out["conditions"] if c["type"] == "Running")["reason"] == "Training"


def test_no_note_or_reason_outside_running():
    stale = tm.observe(reading(step=5, phase=Phase.TRAINING), "a", NOW, error="refused")
    desired = {"phase": "Pending", "message": "attempt 1 failed", "conditions": []}
    out, _ = merge(desired, track=stale)
    assert out["message"] == "attempt 1 failed" and out["phase"] == "Pending"


def test_resumed_note():
    track = tm.observe(reading(step=10, phase=Phase.TRAINING), "b", NOW,
                       sample=tm.TrainerSample(step=10, last_checkpoint_step=10, phase=Phase.TRAINING))
    out, _ = merge(running_desired(), track=track)
    assert out["message"].endswith("; resumed from the checkpoint of step 10")


def test_a_retry_that_went_back_says_which_steps_are_trained_again():
    track = tm.observe(reading(step=12, phase=Phase.TRAINING), "b", NOW,
                       sample=tm.TrainerSample(step=10, last_checkpoint_step=10, phase=Phase.TRAINING))
    out, _ = merge(running_desired(), track=track)
    assert out["message"].endswith(
        "; resumed from the checkpoint of step 10 (steps 11-12 of the attempt before are trained again)")
    assert out["step"] == 10


def test_a_retry_that_started_over_says_so():
    track = tm.observe(reading(step=12, phase=Phase.TRAINING), "b", NOW,
                       sample=tm.TrainerSample(step=1, phase=Phase.TRAINING))
    out, _ = merge(running_desired(), track=track)
    assert out["message"].endswith("; started over from step 0: no complete checkpoint to resume from")


def test_a_retrys_first_values_are_not_held_back_by_the_rate_limit():
    # Attempt 1 was read at step 27 (checkpoint 25), but the rate limit had shown only step 21 when it died.
    shown = {"step": 21, "totalSteps": 40, "progress": "52%", "epoch": 1.05, "loss": 2.0, "eta": "20s",
             "estimatedCompletionTime": "2026-11-27T22:00:20Z", "lastCheckpoint": {"step": 20}}
    first = reading(step=27, total_steps=40, epoch=1.35, loss=1.9, last_checkpoint_step=25, phase=Phase.TRAINING)
    # Attempt 2 says, while it loads, that it goes on from the checkpoint of step 25.
    loading = tm.observe(first, "b", NOW, sample=tm.TrainerSample(
        step=25, total_steps=40, epoch=1.25, last_checkpoint_step=25, phase=Phase.LOADING))
    out, changed = merge(running_desired(), previous=shown, track=loading, last_patch=NOW)
    assert changed
    assert (out["step"], out["progress"], out["epoch"]) == (25, "62%", 1.25)
    assert out["lastCheckpoint"]["step"] == 25
    assert "eta" not in out and "estimatedCompletionTime" not in out  # attempt 1's estimate is not attempt 2's
    assert out["message"].endswith("; resumed from the checkpoint of step 25 (steps 26-27 of the attempt before "
                                   "are trained again)")
    # Once its values are shown, the retry's own readings are rate limited as usual.
    training = tm.observe(loading, "b", NOW, sample=tm.TrainerSample(step=26, total_steps=40, phase=Phase.TRAINING))
    held, changed = merge(running_desired(), previous=out, track=training, last_patch=NOW, shown_pod="b")
    assert not changed and held["step"] == 25


def test_a_retry_that_has_not_said_where_it_goes_on_shows_no_eta():
    shown = {"step": 21, "totalSteps": 40, "eta": "20s", "estimatedCompletionTime": "2026-11-27T22:00:20Z"}
    first = reading(step=21, total_steps=40, eta_seconds=20, phase=Phase.TRAINING)
    starting = tm.observe(first, "b", NOW, error="connection refused")
    out, _ = merge(running_desired(), previous=shown, track=starting, last_patch=NOW)
    assert out["step"] == 21 and "eta" not in out and "estimatedCompletionTime" not in out


def test_rate_limit_holds_back_a_change_until_the_interval_passed():
    previous = {"step": 5}
    track = reading(step=6, phase=Phase.TRAINING)
    out, changed = merge(running_desired(), previous=previous, track=track, last_patch=NOW - timedelta(seconds=1))
    assert not changed and out["step"] == 5
    out, changed = merge(running_desired(), previous=previous, track=track, last_patch=NOW - timedelta(seconds=6))
    assert changed and out["step"] == 6


@pytest.mark.parametrize("phase", ["Suspended", "Pending"])
def test_no_eta_unless_running(phase):
    previous = {"step": 15, "totalSteps": 20, "eta": "5s", "estimatedCompletionTime": "2026-11-27T22:00:05Z"}
    summary = {"status": "Terminated", "reason": None, "step": 16, "totalSteps": 20}
    out, changed = merge({"phase": phase, "message": "m"}, previous=previous, summary=summary, last_patch=NOW)
    assert changed and out["step"] == 16
    assert "eta" not in out and "estimatedCompletionTime" not in out


def test_final_values_come_from_the_summary_even_when_reads_missed_them():
    previous = {"step": 15, "totalSteps": 20, "progress": "75%", "loss": 2.0, "eta": "5s",
                "estimatedCompletionTime": "2026-11-27T22:00:05Z"}
    stale = tm.observe(reading(step=15, total_steps=20, loss=2.0, phase=Phase.TRAINING), "a", NOW, error="refused")
    summary = {"status": "Succeeded", "step": 20, "totalSteps": 20, "loss": 1.5, "evalLoss": 1.7,
               "lastCheckpoint": {"step": 20, "path": "/output/bot/checkpoints/checkpoint-20"}}
    desired = {"phase": "Succeeded", "message": "training finished", "outputPath": "pvc://adapters/bot"}
    out, changed = merge(desired, previous=previous, track=stale, summary=summary, last_patch=NOW)
    assert changed  # the rate limit does not hold back the end
    assert out["step"] == 20 and out["progress"] == "100%" and out["loss"] == 1.5 and out["evalLoss"] == 1.7
    assert out["lastCheckpoint"] == {"step": 20, "path": "pvc://adapters/bot/checkpoints/checkpoint-20"}
    assert "eta" not in out and "estimatedCompletionTime" not in out
    assert out["message"] == "training finished" and out["outputPath"] == "pvc://adapters/bot"


class FakeReader:
    def __init__(self, answers):
        self.answers = answers
        self.calls = []
        self.prometheus_url = None

    async def read(self, namespace, pod, ip):
        self.calls.append((namespace, pod, ip))
        answer = self.answers[pod]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def close(self):
        pass


class FakeReporter(Reporter):
    """The real reporter's view of the cluster; its pokes recorded instead of refreshing (no API server)."""

    def __init__(self):
        super().__init__(kube=None, settings=Settings())
        self.owned = ("phase", "message")
        self.poked = []

    def poke(self, key):
        self.poked.append(key)


def owned_by(obj, uid):
    obj["metadata"]["ownerReferences"] = [{"controller": True, "uid": uid}]
    obj["metadata"]["labels"] = {"qlora.io/finetune": obj["metadata"].pop("run", None) or "x"}
    return obj


def show_run(reporter, name, uid, pods=()):
    """The reporter sees resource `name` (uid `uid`), its Job and `pods` (pod bodies) of that Job."""
    reporter.saw_finetune({"metadata": {"namespace": "ml", "name": name, "uid": uid}, "spec": SPEC, "status": {}})
    reporter.saw_job(owned_by({"metadata": {"namespace": "ml", "name": name, "uid": f"job-{uid}",
                                            "labels": {}, "run": name}}, uid))
    for p in pods:
        p["metadata"]["run"] = name
        reporter.saw_pod(owned_by(p, f"job-{uid}"))


@pytest.fixture
def feed():
    reporter = FakeReporter()
    reader = FakeReader({
        "bot-x": tm.TrainerSample(step=3, total_steps=10, loss=2.0, phase=Phase.TRAINING),
        "down-x": tm.MetricsUnreadable("connection refused"),
    })
    f = mf.MetricsFeed(Settings(scrape_interval=1, status_min_interval=0.5), reader=reader)
    f.attach(reporter)
    show_run(reporter, "bot", "uid-bot", [pod("bot-x", ip="127.5.0.2")])
    show_run(reporter, "down", "uid-down", [pod("down-x", ip="127.5.0.3")])
    show_run(reporter, "idle", "uid-idle", [pod("idle-x", phase="Pending")])
    return f


def test_attach_makes_the_reporter_own_the_metric_fields(feed):
    assert feed.reporter.enrich == feed.enrich
    assert set(tm.METRIC_FIELDS) <= set(feed.reporter.owned) and "phase" in feed.reporter.owned


def test_tick_reads_running_trainers_and_pokes_what_changed(feed):
    asyncio.run(feed.tick())
    assert sorted(feed.reader.calls) == [("ml", "bot-x", "127.5.0.2"), ("ml", "down-x", "127.5.0.3")]
    assert sorted(feed.reporter.poked) == [("ml", "bot"), ("ml", "down")]  # "down" turned stale
    # The reporter then refreshes: enrich merges the reading.
    out = feed.enrich(feed.reporter.finetunes[("ml", "bot")], running_desired(), NOW)
    assert out["step"] == 3 and out["progress"] == "30%"
    feed.reporter.written[("ml", "bot")] = out
    down = feed.enrich(feed.reporter.finetunes[("ml", "down")], running_desired(), NOW)
    assert down["message"].endswith("; no trainer metrics read yet (connection refused)")
    feed.reporter.written[("ml", "down")] = down
    # Nothing new on the next tick: no pokes.
    feed.reporter.poked.clear()
    asyncio.run(feed.tick())
    assert feed.reporter.poked == []


def test_tick_forgets_deleted_resources(feed):
    asyncio.run(feed.tick())
    assert "uid-bot" in feed.tracks
    feed.reporter.forget(("ml", "bot"))
    asyncio.run(feed.tick())
    assert "uid-bot" not in feed.tracks


def test_a_run_made_again_under_the_same_name_shows_nothing_of_the_previous_one(feed):
    # The old run ended at step 812; its pod, still terminating, keeps sending events after the new run
    # (same name, new uid, a Job of its own) was created.
    old_pod = pod("bot-old", phase="Failed", created="2026-11-27T21:30:00Z", terminated={
        "exitCode": 143, "message": json.dumps({"status": "Terminated", "step": 812, "totalSteps": 1000,
                                                "lastCheckpoint": {"step": 800}})})
    feed.reporter.saw_pod(owned_by(old_pod, "job-uid-bot"))
    asyncio.run(feed.tick())
    old_running = pod("bot-x", ip="127.5.0.2")
    show_run(feed.reporter, "bot", "uid-bot-2")  # deleted and created again: a new Job, no pod yet
    feed.reporter.saw_pod(owned_by(old_running, "job-uid-bot"))
    body = feed.reporter.finetunes[("ml", "bot")]
    pending = {"phase": "Pending", "message": "waiting for the trainer pod", "conditions": []}
    out = feed.enrich(body, pending, NOW)
    assert not set(tm.METRIC_FIELDS) & set(out), out
    feed.reader.calls.clear()
    asyncio.run(feed.tick())
    assert ("ml", "bot-x", "127.5.0.2") not in feed.reader.calls  # the old run's trainer is not read
    assert "uid-bot" not in feed.tracks and "uid-bot-2" not in feed.tracks


def test_the_checkpoint_path_comes_from_the_spec_parsed_once_per_generation(feed, monkeypatch):
    calls = []
    real = __import__("qlora_operator.reporter", fromlist=["parse_spec"]).parse_spec
    monkeypatch.setattr("qlora_operator.reporter.parse_spec", lambda raw: calls.append(1) or real(raw))
    body = feed.reporter.finetunes[("ml", "bot")]
    for _ in range(3):
        asyncio.run(feed.tick())
        feed.enrich(body, running_desired(), NOW)
    assert len(calls) == 2  # once for each run read (bot and down), not once a tick and a refresh


def test_the_loop_survives_a_failing_tick(feed):
    calls = 0

    async def boom():
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        raise asyncio.CancelledError

    feed.tick = boom
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(feed.run())
    assert calls == 2
