"""``pope up`` refuses to start when the engine has an API key its clients do not send."""

from __future__ import annotations

from services.engine.settings import EngineSettings
from services.rollout.settings import RolloutSettings
from services.trainer.settings import TrainerSettings
from services.up import engine_key_problem


def test_an_engine_key_the_clients_lack_is_a_start_up_error() -> None:
    keyed = EngineSettings(api_key="k1")
    both = {"rollout": RolloutSettings(engine_api_key="k1"), "trainer": TrainerSettings(engine_api_key="k1")}
    assert engine_key_problem(keyed, **both) is None
    assert engine_key_problem(EngineSettings(), rollout=RolloutSettings(), trainer=TrainerSettings()) is None
    problem = engine_key_problem(keyed, rollout=both["rollout"], trainer=TrainerSettings(engine_api_key="k2"))
    assert problem is not None and "trainer.engine_api_key" in problem and "k1" not in problem
    missing = engine_key_problem(keyed, rollout=RolloutSettings(), trainer=both["trainer"])
    assert missing is not None and "rollout.engine_api_key" in missing


def test_the_clients_send_the_key_their_settings_hold() -> None:
    client = RolloutSettings(engine_url="http://e:1", engine_api_key="k1").engine_client(retries=1)
    assert client._http.headers["authorization"] == "Bearer k1" and client.retries == 1
    assert "authorization" not in TrainerSettings(engine_url="http://e:1").engine_client()._http.headers


def test_an_engine_admin_key_the_clients_lack_is_a_start_up_error() -> None:
    admin = EngineSettings(api_key="k1", admin_api_key="a1")
    keyed = {"engine_api_key": "k1", "engine_admin_key": "a1"}
    good = {"rollout": RolloutSettings(**keyed), "trainer": TrainerSettings(**keyed)}
    assert engine_key_problem(admin, **good) is None
    problem = engine_key_problem(admin, rollout=RolloutSettings(engine_api_key="k1"), trainer=good["trainer"])
    assert problem is not None and "rollout.engine_admin_key" in problem and "a1" not in problem
    only_admin = EngineSettings(admin_api_key="a1")
    rollout = RolloutSettings(engine_admin_key="a1")
    assert engine_key_problem(only_admin, rollout=rollout, trainer=good["trainer"]) is None
