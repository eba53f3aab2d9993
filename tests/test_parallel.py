"""Tests for kd_jax/parallel.py: the mesh, batch checks, and multi-process start-up.

Start-up failures are tested in this process (they end before JAX is touched); successful
launches run as subprocesses started the way a cluster launcher starts them.
"""

import os
import socket
import subprocess
import sys
import textwrap
import threading

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from kd_jax import parallel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "KD_JAX_")
_LAUNCH_VARIABLES = {
    "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
    "JAX_LOCAL_DEVICE_IDS", "KUBERNETES_SERVICE_HOST",
}


def _without_launch_variables(env):
    return {k: v for k, v in env.items()
            if not k.startswith(_LAUNCH_PREFIXES) and k not in _LAUNCH_VARIABLES}


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables, whatever machine the tests run on."""
    for name in set(os.environ) - set(_without_launch_variables(os.environ)):
        monkeypatch.delenv(name)
    return monkeypatch


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_env(task, ntasks, port, job_id="4242"):
    return {"SLURM_JOB_ID": job_id, "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
            "JAX_COORDINATOR_PORT": str(port)}


def _set(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)


# --------------------------------------------------------------------------------- mesh


def test_make_mesh_is_one_auto_data_axis_over_all_devices():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.axis_types == (AxisType.Auto,)  # jax.make_mesh alone would make it Explicit
    assert list(mesh.devices.flat) == jax.devices()
    x = jax.device_put(np.arange(8.0), parallel.batch_sharding(mesh))
    total = jax.jit(lambda a: a.sum(), out_shardings=parallel.replicated(mesh))(x)
    assert float(total) == 28.0
    with pytest.raises(ValueError, match="devices is empty"):
        parallel.make_mesh([])


def test_make_mesh_orders_devices_by_process_and_id():
    code = textwrap.dedent("""
        import jax
        from kd_jax import parallel
        d = jax.devices()
        print([x.id for x in parallel.make_mesh([d[3], d[0], d[2]]).devices.flat],
              [x.id for x in parallel.make_mesh().devices.flat])
    """)
    env = {**_without_launch_variables(os.environ), "PYTHONPATH": ROOT,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split("\n")[0] == "[0, 2, 3] [0, 1, 2, 3]", out.stderr[-3000:]


def test_check_batch_size_names_both_numbers():
    mesh8 = jax.sharding.AbstractMesh((8,), ("data",))
    with pytest.raises(ValueError, match=r"batch size 100 .* 8 devices.*96 or 104"):
        parallel.check_batch_size(100, mesh8)
    parallel.check_batch_size(96, mesh8)


# ------------------------------------------------------------------ single process


def test_one_process_is_a_no_op(clean_env):
    assert parallel.maybe_initialize_distributed() is False
    assert parallel.maybe_initialize_distributed(num_processes=1) is False
    assert parallel.maybe_initialize_distributed("10.0.0.1:1234", 1, 0) is False
    clean_env.setenv("JAX_NUM_PROCESSES", "1")
    assert parallel.maybe_initialize_distributed() is False
    clean_env.delenv("JAX_NUM_PROCESSES")
    _set(clean_env, _slurm_env(0, 1, _free_port()))  # `srun -n 1` or a batch script
    assert parallel.maybe_initialize_distributed() is False
    _set(clean_env, _slurm_env(1, 4, _free_port()))
    assert parallel.maybe_initialize_distributed(num_processes=1, process_id=0) is False
    assert not jax.distributed.is_initialized()


# --------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, env, fragments", [
    (dict(num_processes=2), {},
     ["--num-processes 2", "without a coordinator address", "--coordinator-address host:port",
      "JAX_COORDINATOR_ADDRESS", "--num-processes 1"]),
    (dict(process_id=1), {}, ["--process-id 1", "without a coordinator address"]),
    (dict(coordinator_address="10.0.0.1:1234"), {},
     ["--coordinator-address 10.0.0.1:1234", "without a process count", "--num-processes",
      "JAX_NUM_PROCESSES"]),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2), {},
     ["without a process id", "--process-id", "JAX_PROCESS_ID"]),
    (dict(coordinator_address="node001", num_processes=2, process_id=0), {},
     ["--coordinator-address node001", "not host:port"]),
    (dict(coordinator_address="node001:99999", num_processes=2, process_id=0), {},
     ["node001:99999", "1-65535"]),
    (dict(coordinator_address="http://node001:1234", num_processes=2, process_id=0), {},
     ["not host:port"]),
    (dict(coordinator_address="node001:1234", num_processes=2, process_id=2), {},
     ["--process-id 2", "out of range", "--num-processes 2", "from 0 to 1"]),
    (dict(coordinator_address="node001:1234", num_processes=2, process_id=-1), {},
     ["--process-id -1", ">= 0"]),
    (dict(coordinator_address="node001:1234", num_processes=0, process_id=0), {},
     ["--num-processes 0", ">= 1"]),
    (dict(coordinator_address="node001:1234", num_processes="2", process_id=0), {},
     ["--num-processes 2", "must be an integer"]),
    ({}, {"JAX_NUM_PROCESSES": "two"},
     ["environment variable JAX_NUM_PROCESSES='two' must be an integer"]),
    ({}, {"KD_JAX_PROCESS_ID": "1.5"},
     ["environment variable KD_JAX_PROCESS_ID='1.5' must be an integer"]),
    ({}, {"JAX_NUM_PROCESSES": "2"}, ["JAX_NUM_PROCESSES=2 was given without a coordinator"]),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"},
     ["JAX_PROCESS_ID=5", "out of range", "JAX_NUM_PROCESSES=2"]),
    ({}, {"KD_JAX_COORDINATOR": "h", "KD_JAX_NUM_PROCESSES": "2", "KD_JAX_PROCESS_ID": "0"},
     ["KD_JAX_COORDINATOR=h", "not host:port"]),
    # An argument overrides the environment: the bad variable is never read.
    (dict(coordinator_address="h:1", process_id=3), {"JAX_COORDINATOR_ADDRESS": "bad",
                                                     "JAX_NUM_PROCESSES": "2"},
     ["--process-id 3", "out of range", "JAX_NUM_PROCESSES=2"]),
    (dict(initialization_timeout=0), {}, ["initialization_timeout", "positive"]),
])
def test_settings_are_validated_up_front_naming_the_flag(clean_env, kwargs, env, fragments):
    _set(clean_env, env)
    with pytest.raises(ValueError) as info:
        parallel.maybe_initialize_distributed(**kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not jax.distributed.is_initialized()


# ------------------------------------------------------------- failures at start-up


def test_a_process_that_never_arrives_is_named(clean_env):
    address = f"127.0.0.1:{_free_port()}"
    errors = {}

    def peer():  # Process 2 of 3 arrives; process 1 never does.
        try:
            parallel.maybe_initialize_distributed(address, 3, 2, initialization_timeout=6)
        except parallel.DistributedInitError as err:
            errors["peer"] = str(err)

    thread = threading.Thread(target=peer)
    thread.start()
    with pytest.raises(parallel.DistributedInitError) as info:
        parallel.maybe_initialize_distributed(address, 3, 0, initialization_timeout=2)
    thread.join()
    message = str(info.value)
    assert "\n" not in message
    for fragment in ["process 0 of 3", "timed out after 2 s", f"at {address}",
                     "for process 1,", "never connected"]:
        assert fragment in message, (fragment, message)
    assert "process 2" not in message.split("for process")[1].split(";")[0]
    assert isinstance(info.value, RuntimeError)
    # The peer gave up on its own deadline, knowing it had reached process 0.
    assert "process 2 of 3" in errors["peer"] and "answered, but not all 3" in errors["peer"]


def test_an_unreachable_coordinator_times_out(clean_env):
    address = f"127.0.0.1:{_free_port()}"  # nobody listens there
    with pytest.raises(parallel.DistributedInitError) as info:
        parallel.maybe_initialize_distributed(address, 2, 1, initialization_timeout=1)
    message = str(info.value)
    for fragment in ["process 1 of 2", "timed out after 1 s", f"process 0, at {address} never "
                     "answered", "--coordinator-address"]:
        assert fragment in message, (fragment, message)


def test_processes_started_for_different_counts_are_refused(clean_env):
    address = f"127.0.0.1:{_free_port()}"
    errors = {}

    def coordinator():
        try:
            parallel.maybe_initialize_distributed(address, 2, 0, initialization_timeout=20)
        except parallel.DistributedInitError as err:
            errors["coordinator"] = str(err)

    thread = threading.Thread(target=coordinator)
    thread.start()
    with pytest.raises(parallel.DistributedInitError, match="refused this process") as info:
        parallel.maybe_initialize_distributed(address, 3, 1, initialization_timeout=20)
    thread.join()
    assert "started for 3 processes, process 0 for 2" in str(info.value)
    assert "same process count" in errors["coordinator"]


def test_a_busy_coordinator_port_is_reported(clean_env):
    with socket.create_server(("", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(parallel.DistributedInitError, match=f"cannot listen on port {port}"):
            parallel.maybe_initialize_distributed(f"localhost:{port}", 2, 0,
                                                  initialization_timeout=1)


@pytest.mark.parametrize("launcher, env", [
    ("Slurm", _slurm_env(1, 2, 0)),
    ("Open MPI", {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://127.0.0.1:34911",
                  "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
                  "OMPI_COMM_WORLD_LOCAL_RANK": "1"}),
])
def test_a_detected_cluster_that_fails_says_so_in_one_line(clean_env, launcher, env):
    _set(clean_env, {**env, "JAX_COORDINATOR_PORT": str(_free_port())})  # nobody listens
    with pytest.raises(parallel.DistributedInitError) as info:
        parallel.maybe_initialize_distributed(initialization_timeout=1)
    message = str(info.value)
    assert "\n" not in message
    for fragment in [f"process 1 of 2 of a {launcher} launch", "timed out", "never answered",
                     "--coordinator-address", "--num-processes 1 runs one process alone"]:
        assert fragment in message, (fragment, message)


def test_an_unreadable_cluster_layout_is_reported(clean_env):
    _set(clean_env, {**_slurm_env(0, 2, _free_port()), "SLURM_NTASKS": "two"})
    with pytest.raises(parallel.DistributedInitError) as info:
        parallel.maybe_initialize_distributed(initialization_timeout=1)
    message = str(info.value)
    assert "\n" not in message
    for fragment in ["detected a Slurm launch", "reading its process layout failed", "'two'",
                     "--num-processes 1"]:
        assert fragment in message, (fragment, message)


# ----------------------------------------------- launches that start as one (subprocesses)


def _launch(args, envs, timeout=300):
    """Starts one process per environment, as a launcher would; returns their outputs."""
    base = _without_launch_variables(os.environ)
    base["PYTHONPATH"] = os.pathsep.join([ROOT, HERE])
    base.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, *args], env={**base, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for env in envs]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, out[-3000:]
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


_GLOBAL_SUM = textwrap.dedent("""
    import jax, numpy as np
    from kd_jax import parallel
    assert parallel.maybe_initialize_distributed(initialization_timeout=60)
    mesh = parallel.make_mesh()
    local = np.full((1,), jax.process_index() + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(parallel.batch_sharding(mesh), local, (2,))
    total = jax.jit(lambda a: a.sum(), out_shardings=parallel.replicated(mesh))(x)
    print("OK", jax.process_index(), jax.process_count(), mesh.size, float(total))
""")


@pytest.mark.slow
def test_jax_environment_variables_start_two_processes_as_one():
    address = f"127.0.0.1:{_free_port()}"
    envs = [{"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": str(i)} for i in range(2)]
    outputs = _launch(["-c", _GLOBAL_SUM], envs, timeout=120)
    for i, out in enumerate(outputs):
        assert f"OK {i} 2 2 3.0" in out, out[-3000:]


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_slurm_launch_trains_as_one_process_with_two_devices(tmp_path):
    # What `srun -n 2 python engine_run.py` sets; only the coordinator port is pinned, since
    # JAX would derive it from the job id.
    port = _free_port()
    engine = os.path.join(HERE, "engine_run.py")
    outputs = _launch([engine, "--out", str(tmp_path / "slurm.npz"), "--from-environment"],
                      [_slurm_env(i, 2, port) for i in range(2)])
    for i, out in enumerate(outputs):
        assert f"initialized {i} 2" in out, out[-3000:]
    _launch([engine, "--out", str(tmp_path / "two.npz")],
            [{"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}])
    multi, single = _load(tmp_path / "slurm.npz"), _load(tmp_path / "two.npz")
    assert multi.keys() == single.keys()
    for k in multi:
        np.testing.assert_allclose(multi[k], single[k], rtol=1e-5, atol=1e-6, err_msg=k)
