"""The leak check of every Ray test (``ray_hygiene``), run on a tiny test file of its own in a separate pytest
with its own local Ray: a test that leaves a placement group or an actor behind fails, naming it, and the test
after it finds all of Ray's CPUs free."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

LEAKY_TESTS = '''
import pytest
import ray
from ray_hygiene import RESTARTS, ray_left_as_found, start_session_ray  # noqa: F401


@pytest.fixture(scope="session")
def ray_local():
    start_session_ray(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                      log_to_driver=False)
    yield ray
    ray.shutdown()


def test_1_leaves_a_placement_group(ray_local):
    from ray.util.placement_group import placement_group

    ray.get(placement_group([{"CPU": 1}]).ready(), timeout=60)


def test_2_finds_every_cpu_free(ray_local):
    from ray.util.placement_group import placement_group, remove_placement_group

    assert ray.available_resources()["CPU"] == 2
    group = placement_group([{"CPU": 2}])
    ray.get(group.ready(), timeout=60)
    remove_placement_group(group)


def test_3_leaves_a_detached_actor_holding_a_cpu(ray_local):
    @ray.remote(num_cpus=1)
    class Holder:
        def ping(self):
            return 1

    holder = Holder.options(lifetime="detached", name="holder").remote()
    assert ray.get(holder.ping.remote(), timeout=60) == 1


def test_4_finds_every_cpu_free_again(ray_local):
    assert ray.available_resources()["CPU"] == 2
    with pytest.raises(ValueError):
        ray.get_actor("holder")  # killed by the check
    assert RESTARTS == []  # removing what was left was enough: Ray was not restarted


def test_5_a_test_without_the_session_ray_fixture_is_not_checked():
    from ray.util.placement_group import placement_group

    assert ray.is_initialized()  # the session's Ray is up, but this test did not ask for it: not its to check
    ray.get(placement_group([{"CPU": 0.5}]).ready(), timeout=60)


def test_6_another_driver_leaves_an_actor_this_process_has_no_handle_of(ray_local):
    import subprocess
    import sys

    # A CLI joined through RAY_ADDRESS, as the fault tests run one; a detached actor outlives its driver.
    script = ("import ray; ray.init(address='auto'); A = ray.remote(num_cpus=1)(type('Stray', (), {'ping': lambda s: 1}));"
              "a = A.options(lifetime='detached').remote(); ray.get(a.ping.remote())")
    env = {**__import__("os").environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)


def test_7_finds_every_cpu_free_after_the_stray(ray_local):
    assert ray.available_resources()["CPU"] == 1.5 and RESTARTS == []  # all but test_5's unchecked 0.5
'''


@pytest.mark.timeout(300)
def test_a_test_that_leaves_ray_resources_behind_fails_naming_them_and_the_next_starts_clean(tmp_path):
    (tmp_path / "test_leaky.py").write_text(LEAKY_TESTS)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "RAY_AUTH_MODE": "disabled", "LOOKAHEAD_TEST_RAY_GRACE_S": "5",
           "COLUMNS": "1000"}  # the summary's lines are cut to the terminal's width: make it wide everywhere
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "test_leaky.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    out = result.stdout
    assert result.returncode == 1, out[-4000:] + result.stderr[-2000:]
    assert "7 passed" in out and "3 errors" in out, out[-4000:]  # each leaky test passed, then failed its teardown
    # the short summary's ERROR lines: one per leaky test (the failure sections above them repeat the report)
    reports = [line for line in out.splitlines() if line.startswith("ERROR ")]
    assert [line.split(" ")[1] for line in reports] == [
        "test_leaky.py::test_1_leaves_a_placement_group", "test_leaky.py::test_3_leaves_a_detached_actor_holding_a_cpu",
        "test_leaky.py::test_6_another_driver_leaves_an_actor_this_process_has_no_handle_of"]
    assert all("left in the session's Ray:" in line for line in reports), out[-4000:]
    assert "test_1_leaves_a_placement_group left in the session's Ray: placement group" in reports[0], reports[0]
    assert "[{'CPU': 1.0}]" in reports[0] and "1 CPU still reserved (removed)" in reports[0], reports[0]
    assert "test_3_leaves_a_detached_actor_holding_a_cpu left in the session's Ray: actor " in reports[1]
    assert "Holder (" in reports[1], reports[1]
    assert "1 CPU still reserved (removed)" in reports[1], reports[1]
    # an actor of another driver: killed by its process (asking Ray for a handle this process lacks aborts pytest)
    assert "actor Stray (" in reports[2] and "1 CPU still reserved (removed)" in reports[2], reports[2]
