"""`ray submit` for real, as docs/cluster.md section 6 says, on deploy/cluster-ssh.yaml (Ray's local provider, no
docker): a loopback sshd on its own port (Debian's openssh-server, fetched with `apt-get download` when the
machine has none), `ray up` of a one-node cluster on 127.0.0.1 with Ray's token authentication on,
`ray submit tune/sweep.py -- --config configs/sweep_toy_birds.yaml` run in the ssh user's home (no checkout
there: the configs come from the installed package, the relative paths from $WSSSREC_WORKDIR, which the
cluster YAML sets), the registered champion checked in the MLflow registry, `ray down`, everything stopped by
PID.

What is emulated, and why: Ray's cluster YAML has no ssh port field, so ssh reaches the port through
`ssh_proxy_command` (a small TCP relay). The ssh user is the user running the test, with a home of its own
(sshd's SetEnv HOME), so the test never touches the real home. As root, sshd needs its privilege-separation
user `sshd`; where /etc/passwd has none, sshd runs in a private mount namespace that sees a copy of
/etc/passwd with that user (nothing changes for the rest of the machine). `ray down` runs `ray stop` on the
head, which is this machine: it would stop every Ray of this user, so the test refuses to start while
another one runs.
"""
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DEBIAN_PACKAGES = ["openssh-server", "libwrap0", "rsync", "libpopt0"]
RELAY = '''import os, selectors, socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
sel = selectors.DefaultSelector()
sel.register(0, selectors.EVENT_READ)
sel.register(sock, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj == 0:
            data = os.read(0, 65536)
            if not data:
                sock.shutdown(socket.SHUT_WR)
                sel.unregister(0)
                continue
            sock.sendall(data)
        else:
            data = sock.recv(65536)
            if not data:
                sys.exit(0)
            view = memoryview(data)
            while view:
                view = view[os.write(1, view):]
'''
TINY = ["data.image_size=64", "data.batch_size=8", "data.eval_batch_size=32", "'model.decoder_widths=[8,8,8,8,8]'",
        "model.bottleneck=8", "classifier.epochs=1", "train.steps=4", "train.lr=0.01", "sweep.rungs=2",
        "sweep.max_concurrent=1", "sweep.scheduler=none", "sweep.name=submitted", "--num-samples", "1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cache_dir() -> Path:
    return Path(os.environ.get("WSSSREC_CACHE") or Path.home() / ".cache" / "wsssrec") / "debian"


def ssh_tools() -> tuple[Path, Path, dict[str, str]]:
    """(sshd, a folder with rsync, the environment sshd needs): the machine's own, else Debian's packages
    unpacked into the cache (an `rsync` wrapper sets their library path)."""
    sshd, rsync = shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("rsync")
    if Path(sshd).is_file() and rsync:
        return Path(sshd), Path(rsync).parent, {}
    root = cache_dir() / "ssh-root"
    if not (root / "usr/sbin/sshd").is_file() or not (root / "usr/bin/rsync").is_file():
        debs = cache_dir() / "ssh-debs"
        debs.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=debs, capture_output=True, text=True)
        assert proc.returncode == 0, f"apt-get download {' '.join(DEBIAN_PACKAGES)} failed:\n{proc.stderr}"
        for deb in debs.glob("*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    libs = f"{root}/lib/x86_64-linux-gnu:{root}/usr/lib/x86_64-linux-gnu"
    bin_dir = root / "wsssrec-bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "rsync"
    wrapper.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH={libs} exec {root}/usr/bin/rsync "$@"\n')
    wrapper.chmod(0o755)
    return root / "usr/sbin/sshd", bin_dir, {"LD_LIBRARY_PATH": libs}


def processes_with_home(home: Path) -> list:
    """Every process of this user whose HOME is `home`: what the test's sshd and Ray CLI started."""
    import psutil

    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"].real == os.getuid() and proc.environ().get("HOME") == str(home):
                found.append(proc)
        except (psutil.Error, AttributeError):
            continue
    return found


def other_ray_running() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["name", "uids"])
            if p.info["name"] in ("gcs_server", "raylet") and p.info["uids"] and p.info["uids"].real == os.getuid()]


def stop_all(procs: list, grace: float = 20.0) -> list[int]:
    """SIGTERM then SIGKILL, each by its PID; returns the PIDs that were still alive."""
    import psutil

    alive = [p for p in procs if p.is_running()]
    for proc in alive:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=grace)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return [p.pid for p in alive]


@pytest.fixture
def loopback_sshd(tmp_path):
    """sshd on 127.0.0.1:<free port> that lets this user in with a fresh key, with HOME set to a folder of
    the test's own. Yields (port, key, remote home, folder with rsync)."""
    sshd, rsync_dir, sshd_env = ssh_tools()
    ssh_dir = tmp_path / "ssh"
    ssh_dir.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_dir / name)], check=True)
    (ssh_dir / "authorized_keys").write_text((ssh_dir / "client.pub").read_text())
    remote_home = tmp_path / "remote-home"
    remote_home.mkdir()
    # sshd starts a session in the user's passwd home; on a real machine that is HOME as well
    (remote_home / ".bashrc").write_text('cd "$HOME"\n')
    port = free_port()
    config = ssh_dir / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {ssh_dir / 'host'}", f"PidFile {ssh_dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {ssh_dir / 'authorized_keys'}", "StrictModes no", "UsePAM no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        f"AllowUsers {getpass.getuser()}", "AllowTcpForwarding yes", "LogLevel ERROR",
        f"SetEnv HOME={remote_home} PATH={rsync_dir}:/usr/local/bin:/usr/bin:/bin",
    ]) + "\n")
    command = [str(sshd), "-D", "-e", "-f", str(config)]
    made_privsep_dir = False
    if os.geteuid() == 0:
        if not Path("/run/sshd").is_dir():  # sshd's compiled-in privilege-separation chroot (empty)
            Path("/run/sshd").mkdir(mode=0o755)
            made_privsep_dir = True
        if subprocess.run(["getent", "passwd", "sshd"], capture_output=True).returncode != 0:
            passwd = ssh_dir / "passwd"
            passwd.write_text(Path("/etc/passwd").read_text()
                              + "sshd:x:65533:65534:sshd privilege separation:/run/sshd:/usr/sbin/nologin\n")
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f'mount --bind "{passwd}" /etc/passwd && exec "$@"', "sh", *command]
    log = open(ssh_dir / "sshd.log", "w")
    proc = subprocess.Popen(command, env={**os.environ, **sshd_env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 30
    while True:
        assert proc.poll() is None, f"sshd exited: {(ssh_dir / 'sshd.log').read_text()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline, "sshd did not listen within 30 s"
            time.sleep(0.2)
    try:
        yield port, ssh_dir / "client", remote_home, rsync_dir
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: sshd and the sessions it forked
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        if made_privsep_dir:
            Path("/run/sshd").rmdir()


def cluster_yaml(tmp_path: Path, port: int, key: Path, workdir: Path, rsync_dir: Path, name: str) -> Path:
    """deploy/cluster-ssh.yaml for this machine: head 127.0.0.1 and no workers, ssh through the relay, the venv
    and the shared folder of this test, Ray on free ports."""
    text = (REPO / "deploy/cluster-ssh.yaml").read_text()
    text = text.replace("/opt/wsssrec/.venv/bin", f"{rsync_dir}:{VENV_BIN}").replace("/shared/wsssrec", str(workdir))
    config = yaml.safe_load(text)
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    config["cluster_name"] = name
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(key),
                      "ssh_proxy_command": f"{sys.executable} -I {relay} 127.0.0.1 {port}"}
    ports = {flag: free_port() for flag in ("port", "dashboard-port", "ray-client-server-port",
                                            "dashboard-agent-listen-port", "node-manager-port",
                                            "object-manager-port", "runtime-env-agent-port", "metrics-export-port")}
    flags = " ".join(f"--{flag}={value}" for flag, value in ports.items())
    # no `ray stop` first (the file has one): the head is this machine, where it would stop any Ray of this user
    config["head_start_ray_commands"] = [f"ray start --head {flags} --num-cpus=3 --dashboard-host=127.0.0.1 "
                                         "--autoscaling-config=~/ray_bootstrap_config.yaml"]
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_ray(args: list[str], env: dict[str, str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(VENV_BIN / "ray"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, \
        f"ray {args[0]} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_ray_submit_on_a_local_ssh_cluster(tmp_path, toy_dataset, loopback_sshd):
    port, key, remote_home, rsync_dir = loopback_sshd
    if other_ray_running():
        pytest.fail(f"another Ray of this user runs on this machine (PIDs {other_ray_running()}); `ray down` on a "
                    "cluster whose head is this machine would stop it: run this test alone")
    workdir = tmp_path / "shared"  # the cluster's shared disk
    (workdir / "data").mkdir(parents=True)
    (workdir / "data" / "toy-birds").symlink_to(Path(toy_dataset).parent)  # data.url's default, relative
    name = f"wsssrec-test-{os.getpid()}"
    config = cluster_yaml(tmp_path, port, key, workdir, rsync_dir, name)
    local_home = tmp_path / "local-home"  # the ray CLI's side: its own token and ssh state
    local_home.mkdir()
    env = {**os.environ, "HOME": str(local_home), "PATH": f"{rsync_dir}:{VENV_BIN}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "WSSSREC_WORKDIR",
                "WSSSREC_STORAGE", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV"):
        env.pop(var, None)
    run_ray(["get-auth-token", "--generate"], env, 120, tmp_path)
    token = (local_home / ".ray" / "auth_token").read_text()
    state_file = Path("/tmp/ray") / f"cluster-{name}.state"  # the local provider's record of the cluster
    try:
        run_ray(["up", "-y", "--no-config-cache", str(config)], env, 900, tmp_path)
        assert (remote_home / ".ray" / "auth_token").read_text() == token  # file_mounts gave the head the token
        assert "wsssrec-env" in (remote_home / ".bashrc").read_text()

        submitted = run_ray(["submit", "--no-config-cache", str(config), str(REPO / "tune/sweep.py"), "--",
                             "--config", "configs/sweep_toy_birds.yaml", *TINY], env, 1800, tmp_path)
        out = submitted.stdout + submitted.stderr
        assert "as champion" in out, out[-6000:]
        assert (remote_home / "sweep.py").is_file()  # where `ray submit` put and ran the script

        # everything went to the shared folder, nothing to the home the sweep ran in
        summary = json.loads((workdir / "runs" / "submitted" / "summary.json").read_text())
        assert summary["registered"]["alias"] == "champion" and summary["best"]["outcome"] == "complete"
        assert (workdir / "runs" / "ray" / "submitted").is_dir()  # sweep.storage_path's default
        assert not any((remote_home / p).exists() for p in ("runs", "mlflow.db", "mlartifacts", "mlruns", "data"))
        import mlflow

        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        champion = client.get_model_version_by_alias("wsssrec-segmenter", "champion")
        assert str(champion.version) == summary["registered"]["version"]
        assert champion.run_id == summary["best"]["run_id"]
        assert float(champion.tags["metric.val/method/miou"]) == pytest.approx(
            summary["best"]["metrics"]["val/method/miou"], abs=1e-5)
        parent = client.search_runs([client.get_experiment_by_name("wsssrec").experiment_id],
                                    "tags.`wsssrec.kind` = 'sweep'")
        assert len(parent) == 1 and parent[0].info.status == "FINISHED"
        assert parent[0].data.params["sweep.storage_path"] == ""  # the default, resolved on the head

        # the head runs with token authentication: a client with another token is refused
        wrong = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * len(token)}
        gcs = yaml.safe_load(config.read_text())["head_start_ray_commands"][0].split("--port=")[1].split()[0]
        refused = subprocess.run([str(VENV_BIN / "ray"), "status", f"--address=127.0.0.1:{gcs}"], env=wrong,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0, refused.stdout[-2000:]
    finally:
        down = subprocess.run([str(VENV_BIN / "ray"), "down", "-y", str(config)], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        time.sleep(2)
        left = stop_all(processes_with_home(remote_home))  # the head's Ray processes, if `ray down` left any
        stop_all(processes_with_home(local_home))  # ssh control masters of the ray CLI
        state_file.unlink(missing_ok=True)
        state_file.with_suffix(".lock").unlink(missing_ok=True)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    assert not left, f"processes of the cluster still ran after `ray down`: {left}"


def test_ssh_cluster_yaml_passes_ray_schema_and_sets_the_shared_places():
    from ray.autoscaler._private.local.config import bootstrap_local
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "deploy/cluster-ssh.yaml").read_text()))
    validate_config(config)
    config = bootstrap_local(config)
    assert config["provider"]["type"] == "local" and not (config.get("docker") or {}).get("image")  # no docker
    env_line = config["setup_commands"][0]
    for setting in ("WSSSREC_WORKDIR=/shared/wsssrec", "RAY_ADDRESS=auto", "RAY_AUTH_MODE=token", ".venv/bin:$PATH"):
        assert setting in env_line
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


def test_the_wheel_ships_the_configs_and_finds_them_outside_a_checkout(tmp_path):
    """configs/ goes into the wheel as `wsssrec_configs`; installed from it (no checkout), `configs/...` names
    resolve there when the working directory has no such file."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("data_shards", "trainer", "tune", "deploy", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("wsssrec-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    code = ("import trainer.config as c, tune.settings as s; "
            "print(c.__file__); print(c.find_config('configs/sweep_toy_birds.yaml')); "
            "print(c.find_config('configs/deepspeed/zero2.json')); "
            "print(s.load_sweep('configs/sweep_toy_birds.yaml').experiment.train.steps)")
    work = tmp_path / "home"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, sweep_file, deepspeed, steps = proc.stdout.split()
    assert module == str(target / "trainer" / "config.py")  # the installed copy, not the checkout
    assert sweep_file == str(target / "wsssrec_configs" / "sweep_toy_birds.yaml")
    assert deepspeed == str(target / "wsssrec_configs" / "deepspeed" / "zero2.json")
    assert steps == "400"  # the sweep file's own overrides, its experiment config found beside it
