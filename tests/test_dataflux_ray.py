"""The Ray Data engine on a local 2-CPU Ray instance: same results and bookkeeping as the local engine."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from dataflux_ui.models import Answer, ClipStep, Question, Run, Sample
from dataflux_ui.pipeline import Components, PipelineConfig, run_pipeline
from dataflux_ui.store import open_store
from model.data import generate_dataset

pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from dataflux_ui.ray_engine import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_ray_engine_on_three_clips(ray_local, tmp_path, tiny):
    generate_dataset(tmp_path / "data", 3, 0, 0, seed=21, workers=1)
    store = open_store(tmp_path / "ray.sqlite")
    config = PipelineConfig(model="tiny-random", captioner="reference", categories_per_clip=1, answer_tokens=8)
    result = run_pipeline(store, tmp_path / "data", config, engine="ray", progress=False)
    assert result["clips"] == 3 and result["complete_clips"] == 3 and result["failed_clips"] == 0
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(ClipStep)) == 12
        questions = session.scalar(select(func.count()).select_from(Question))
        assert questions >= 3
        assert session.scalar(select(func.count()).select_from(Answer)) == 2 * questions
        assert session.scalar(select(func.count()).select_from(Sample)) == questions
        assert session.scalar(select(Run.state).order_by(Run.id.desc())) == "finished"
    # the local engine resumes a Ray run (and vice versa): nothing left to do, nothing added
    again = run_pipeline(store, tmp_path / "data", components=Components(config, model=tiny), progress=False)
    assert again["questions"] == questions and again["complete_clips"] == 3
    store.close()
