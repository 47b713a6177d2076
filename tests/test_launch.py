"""Tests for the Cloud TPU launch scripts in launch/.

Most tests run the scripts with DRY_RUN=1 and compare the gcloud commands they print
("+ " lines on stderr) with the exact commands expected. A stub `gcloud` that fails the
test is first on PATH, which proves that a dry run never calls gcloud (and that these
tests do not need it installed).

The remaining tests run the scripts for real against a fake `gcloud` that keeps the VM
state in a file and runs the ssh/scp commands in local "worker" home directories. They
check what a dry run cannot: that the remote command lines actually work in a shell,
that run_tpu.sh records how a run ended, and that babysit.sh relaunches a preempted run
until it finishes. A fake `python` stands in for the venv and the training program.
"""

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

MIN_ENV = {
    "NAME": "rlhf-test",
    "ZONE": "us-west4-a",
    "PROJECT": "proj-test",
    "ACCELERATOR": "v5litepod-8",
    "RUNTIME_VERSION": "v2-alpha-tpuv5-lite",
}
LOC = ["--zone=us-west4-a", "--project=proj-test"]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
DESCRIBE = [*TPU, "describe", "rlhf-test", *LOC, "--format=value(state)"]
QR_DESCRIBE = [*QR, "describe", "rlhf-test", *LOC, "--format=value(state.state)"]
SSH_ALL = [*TPU, "ssh", "rlhf-test", *LOC, "--worker=all"]
WORKER_ENV = "VENV=rlhf_jax_venv LOG_DIR=rlhf_jax_logs PYTHON=python3 EXTRAS=tpu PIP_EXTRA_ARGS="
COMMIT = "0123abcd"
POLICY = [
    "rlhf_jax.train_policy",
    "--config",
    "configs/sentiment.py:model=774M",
    "--workdir",
    "gs://bucket/runs/sent",
]


def write_env_file(path, values):
    path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))
    return path


def commands(stderr):
    """The commands a script printed, each as its argv list."""
    return [shlex.split(line[2:]) for line in stderr.splitlines() if line.startswith("+ ")]


def gcloud_commands(stderr):
    return [c for c in commands(stderr) if c[0] == "gcloud"]


def remote_command(cmd):
    """The --command=... value of a `gcloud ... ssh` argv."""
    (value,) = [a[len("--command=") :] for a in cmd if a.startswith("--command=")]
    return value


class Sandbox:
    """Runs launch/ scripts with a minimal environment of their own."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.calls = tmp_path / "forbidden_gcloud_calls"
        stub = self.bin / "gcloud"
        log = shlex.quote(str(self.calls))
        stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\nexit 97\n')
        stub.chmod(0o755)

    def env(self, env_file_values=None, **overrides):
        env_file = write_env_file(self.tmp / "env.sh", env_file_values or MIN_ENV)
        env = {
            "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.home),
            "TMPDIR": str(self.tmp),
            "ENV_FILE": str(env_file),
            "DRY_RUN": "1",
            "COMMIT": COMMIT,
        }
        env.update(overrides)
        return env

    def run(self, script, *args, env_file_values=None, launch_dir=LAUNCH, **overrides):
        env = self.env(env_file_values, **overrides)
        result = subprocess.run(
            ["bash", str(launch_dir / script), *args],
            env=env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if env.get("DRY_RUN") == "1":
            assert not self.calls.exists(), "a dry run called gcloud: " + self.calls.read_text()
        return result

    def ok(self, script, *args, **kw):
        result = self.run(script, *args, **kw)
        assert result.returncode == 0, result.stderr
        return result


@pytest.fixture
def sb(tmp_path):
    return Sandbox(tmp_path)


# --- create / delete -------------------------------------------------------------------


def test_create_on_demand(sb):
    out = sb.ok("create_tpu.sh")
    create = [*TPU, "create", "rlhf-test", *LOC]
    create += ["--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]
    assert gcloud_commands(out.stderr) == [DESCRIBE, create, DESCRIBE]


def test_create_spot(sb):
    out = sb.ok("create_tpu.sh", SPOT="1")
    create = [*TPU, "create", "rlhf-test", *LOC]
    create += ["--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot"]
    assert gcloud_commands(out.stderr) == [DESCRIBE, create, DESCRIBE]


@pytest.mark.parametrize("spot", ["0", "1"])
def test_create_queued(sb, spot):
    out = sb.ok("create_tpu.sh", SPOT=spot, QUEUED="1")
    create = [*QR, "create", "rlhf-test", "--node-id=rlhf-test", *LOC]
    create += ["--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite"]
    create += ["--spot"] if spot == "1" else []
    # Queued requests are waited for: describe again after the create.
    assert gcloud_commands(out.stderr) == [QR_DESCRIBE, create, QR_DESCRIBE]


def test_create_extra_flags_and_queue_limit(sb):
    out = sb.ok(
        "create_tpu.sh", QUEUED="1", QUEUED_VALID_FOR="6h", CREATE_FLAGS="--internal-ips --tags=a,b"
    )
    create = gcloud_commands(out.stderr)[1]
    assert create[-3:] == ["--internal-ips", "--tags=a,b", "--valid-until-duration=6h"]


def test_create_leaves_a_ready_vm_alone(sb):
    out = sb.ok("create_tpu.sh", DRY_RUN_STATE="READY")
    assert gcloud_commands(out.stderr) == [DESCRIBE]
    assert "already exists" in out.stderr


def test_create_refuses_a_preempted_vm(sb):
    out = sb.run("create_tpu.sh", DRY_RUN_STATE="PREEMPTED")
    assert out.returncode != 0
    assert "PREEMPTED" in out.stderr and "delete_tpu.sh" in out.stderr
    assert gcloud_commands(out.stderr) == [DESCRIBE]


@pytest.mark.parametrize(
    "queued, expected",
    [
        ("0", [*TPU, "delete", "rlhf-test", *LOC, "--quiet"]),
        ("1", [*QR, "delete", "rlhf-test", *LOC, "--force", "--quiet"]),
    ],
)
def test_delete(sb, queued, expected):
    out = sb.ok("delete_tpu.sh", QUEUED=queued)
    assert gcloud_commands(out.stderr) == [expected]


# --- code, install, launch, logs ---------------------------------------------------------


def test_sync_ships_a_tarball_of_the_commit(sb):
    out = sb.ok("sync_code.sh")
    tarball = str(sb.tmp / f"rlhf_jax-{COMMIT}.tar.gz")
    assert commands(out.stderr) == [
        ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={tarball}", COMMIT],
        [*TPU, "scp", tarball, "rlhf-test:rlhf_jax_code.tar.gz", *LOC, "--worker=all"],
        [
            *SSH_ALL,
            "--command=rm -rf rlhf_jax.new && mkdir -p rlhf_jax.new"
            " && tar -xzf rlhf_jax_code.tar.gz -C rlhf_jax.new"
            f" && echo {COMMIT} > rlhf_jax.new/.rlhf_jax_commit"
            " && rm -rf rlhf_jax && mv rlhf_jax.new rlhf_jax && rm -f rlhf_jax_code.tar.gz",
        ],
    ]


def test_sync_clones_when_repo_url_is_set(sb):
    url = "https://example.com/org/rlhf_jax.git"
    out = sb.ok("sync_code.sh", REPO_URL=url)
    assert commands(out.stderr) == [
        [
            *SSH_ALL,
            "--command=if [ -d rlhf_jax/.git ]; then git -C rlhf_jax fetch --quiet origin;"
            f" else rm -rf rlhf_jax && git clone --quiet {url} rlhf_jax; fi"
            f" && git -C rlhf_jax checkout --quiet --force {COMMIT}",
        ]
    ]


def test_setup_workers(sb):
    out = sb.ok("setup_workers.sh")
    expected = f"--command=cd rlhf_jax && {WORKER_ENV} bash launch/install_worker.sh"
    assert gcloud_commands(out.stderr) == [[*SSH_ALL, expected]]


def test_launch_runs_run_tpu_on_all_workers_in_background(sb):
    out = sb.ok("launch.sh", *POLICY, RUN_ID="run7")
    expected = (
        f"--command=cd rlhf_jax && {{ {WORKER_ENV} RLHF_JAX_RUN_ID=run7 nohup setsid bash"
        " launch/run_tpu.sh rlhf_jax.train_policy --config configs/sentiment.py:model=774M"
        " --workdir gs://bucket/runs/sent >/dev/null 2>&1 </dev/null & }"
    )
    assert gcloud_commands(out.stderr) == [[*SSH_ALL, expected]]


def test_launch_keeps_awkward_arguments_intact(sb):
    args = ["rlhf_jax.sample", "--config.note=it's a test", "--workdir=gs://b/r x", "$HOME", ""]
    out = sb.ok("launch.sh", *args, WORKER_ENV="FOO=1 BAR=2")
    (cmd,) = gcloud_commands(out.stderr)
    words = shlex.split(remote_command(cmd))
    start = words.index("launch/run_tpu.sh") + 1
    assert words[start : words.index(">/dev/null")] == args
    assert words[words.index("nohup") - 2 : words.index("nohup")] == ["FOO=1", "BAR=2"]


def test_launch_warns_about_a_local_workdir(sb):
    out = sb.ok("launch.sh", "rlhf_jax.train_reward", "--workdir", "/tmp/run")
    assert "not in GCS" in out.stderr


@pytest.mark.parametrize(
    "args, env, expected",
    [
        ([], {}, ("--worker=0", "tail -n 100 -F rlhf_jax_logs/run.log")),
        (["all"], {}, ("--worker=all", "tail -n 100 -F rlhf_jax_logs/run.log")),
        (
            ["3"],
            {"FOLLOW": "0", "LOG_LINES": "20"},
            ("--worker=3", "tail -n 20 rlhf_jax_logs/run.log"),
        ),
    ],
)
def test_logs(sb, args, env, expected):
    out = sb.ok("logs.sh", *args, **env)
    worker, tail = expected
    expected = [*TPU, "ssh", "rlhf-test", *LOC, worker, f"--command={tail}"]
    assert gcloud_commands(out.stderr) == [expected]


def test_logs_rejects_a_bad_worker(sb):
    out = sb.run("logs.sh", "worker0")
    assert out.returncode != 0 and "usage" in out.stderr


def test_status_stop_and_ssh_all(sb):
    ctl = "cd rlhf_jax && LOG_DIR=rlhf_jax_logs bash launch/worker_ctl.sh"
    status = (
        f"--command=if [ -f rlhf_jax/launch/worker_ctl.sh ]; then {ctl} status;"
        " else echo RLHF_JAX_STATUS host=$(hostname) run=- state=none; fi"
    )
    out = sb.ok("status.sh", DRY_RUN_STATE="READY")
    assert gcloud_commands(out.stderr) == [DESCRIBE, [*SSH_ALL, status]]
    assert out.stdout.startswith("rlhf-test: READY\nRLHF_JAX_STATUS ")
    out = sb.ok("stop.sh")
    assert gcloud_commands(out.stderr) == [[*SSH_ALL, f"--command={ctl} stop"]]
    out = sb.ok("ssh_all.sh", "df -h ~")
    assert gcloud_commands(out.stderr) == [[*SSH_ALL, "--command=df -h ~"]]


# --- settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, var",
    [
        ("delete_tpu.sh", "NAME"),
        ("delete_tpu.sh", "ZONE"),
        ("delete_tpu.sh", "PROJECT"),
        ("create_tpu.sh", "ACCELERATOR"),
        ("create_tpu.sh", "RUNTIME_VERSION"),
    ],
)
def test_a_missing_variable_is_named(sb, script, var):
    values = {k: v for k, v in MIN_ENV.items() if k != var}
    out = sb.run(script, env_file_values=values)
    assert out.returncode != 0
    assert f"error: {var} is not set" in out.stderr
    assert not commands(out.stderr)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"SPOT": "yes"}, "SPOT must be 0 or 1"),
        ({"MAX_RETRIES": "-1"}, "MAX_RETRIES must be a whole number"),
        ({"POLL_SECONDS": "soon"}, "POLL_SECONDS must be a number of seconds"),
        ({"ENV_FILE": "/nonexistent/env.sh"}, "ENV_FILE=/nonexistent/env.sh does not exist"),
        ({"REMOTE_DIR": "~/code"}, "REMOTE_DIR='~/code'"),
        ({"REMOTE_DIR": "/"}, "REMOTE_DIR='/' must name a directory of its own"),
    ],
)
def test_bad_settings_fail_early(sb, overrides, message):
    out = sb.run("delete_tpu.sh", **overrides)
    assert out.returncode != 0
    assert message in out.stderr
    assert not commands(out.stderr)


def test_bad_name_fails_early(sb):
    out = sb.run("delete_tpu.sh", env_file_values={**MIN_ENV, "NAME": "My_TPU"})
    assert out.returncode != 0 and "NAME='My_TPU'" in out.stderr


def test_env_example_works_as_is(sb):
    text = (LAUNCH / "env.example.sh").read_text()
    for var in [
        "NAME", "ZONE", "PROJECT", "ACCELERATOR", "RUNTIME_VERSION", "SPOT", "QUEUED",
        "BUCKET", "REPO_URL", "VENV",
    ]:  # fmt: skip
        assert f"\n{var}=" in text, var
    out = sb.ok("create_tpu.sh", ENV_FILE=str(LAUNCH / "env.example.sh"))
    create = gcloud_commands(out.stderr)[1]
    assert "--accelerator-type=v5litepod-8" in create
    assert "--version=v2-alpha-tpuv5-lite" in create
    # The ${VAR:-default} form lets the environment override the file.
    out = sb.ok("create_tpu.sh", ENV_FILE=str(LAUNCH / "env.example.sh"), SPOT="1")
    assert gcloud_commands(out.stderr)[1][-1] == "--spot"


# --- babysit, dry run --------------------------------------------------------------------


def verbs(cmds):
    return [(c[3], c[4]) if c[0] == "gcloud" else (c[0], c[3]) for c in cmds]


def test_babysit_dry_run_creates_syncs_and_launches(sb):
    out = sb.ok("babysit.sh", *POLICY)
    cmds = commands(out.stderr)
    assert verbs(cmds) == [
        ("tpu-vm", "describe"),  # babysit: is the VM there?
        ("tpu-vm", "describe"),  # create_tpu.sh: is it there?
        ("tpu-vm", "create"),
        ("tpu-vm", "describe"),  # create_tpu.sh: is it ready?
        ("git", "archive"),
        ("tpu-vm", "scp"),
        ("tpu-vm", "ssh"),  # unpack the code
        ("tpu-vm", "ssh"),  # launch
    ]
    words = shlex.split(remote_command(cmds[-1]))
    start = words.index("launch/run_tpu.sh") + 1
    assert words[start : words.index(">/dev/null")] == POLICY
    assert "stopping after one round" in out.stderr


@pytest.mark.parametrize("queued", ["0", "1"])
def test_babysit_dry_run_replaces_a_preempted_vm(sb, queued):
    state = "SUSPENDED" if queued == "1" else "PREEMPTED"
    out = sb.ok("babysit.sh", *POLICY, QUEUED=queued, SPOT="1", DRY_RUN_STATE=state)
    group = "queued-resources" if queued == "1" else "tpu-vm"
    assert verbs(commands(out.stderr))[:5] == [
        (group, "describe"),
        (group, "delete"),
        (group, "describe"),
        (group, "create"),
        (group, "describe"),
    ]
    assert verbs(commands(out.stderr))[-1] == ("tpu-vm", "ssh")


def run_id(sb, args):
    env = sb.env()
    script = f"source {shlex.quote(str(LAUNCH / 'common.sh'))}; run_id_for \"$@\""
    out = subprocess.run(
        ["bash", "-c", script, "bash", *args], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_babysit_dry_run_stops_when_the_run_finished(sb):
    status = f"RLHF_JAX_STATUS host=w0 run={run_id(sb, POLICY)} state=exit=0"
    out = sb.ok("babysit.sh", *POLICY, DRY_RUN_STATE="READY", DRY_RUN_WORKER_STATUS=status)
    assert verbs(commands(out.stderr)) == [("tpu-vm", "describe"), ("tpu-vm", "ssh")]
    assert "finished" in out.stderr


def test_babysit_dry_run_relaunches_a_failed_run_on_a_ready_vm(sb):
    rid = run_id(sb, POLICY)
    status = "\n".join(
        [
            f"RLHF_JAX_STATUS host=w0 run={rid} state=exit=0",
            f"RLHF_JAX_STATUS host=w1 run={rid} state=exit=1",
        ]
    )
    out = sb.ok("babysit.sh", *POLICY, DRY_RUN_STATE="READY", DRY_RUN_WORKER_STATUS=status)
    assert verbs(commands(out.stderr)) == [
        ("tpu-vm", "describe"),
        ("tpu-vm", "ssh"),  # status
        ("git", "archive"),
        ("tpu-vm", "scp"),
        ("tpu-vm", "ssh"),
        ("tpu-vm", "ssh"),  # launch
    ]
    assert "ended with exit=1 on w1" in out.stderr


def test_babysit_refuses_to_start_over_another_run(sb):
    status = "RLHF_JAX_STATUS host=w0 run=12345 state=running"
    out = sb.run("babysit.sh", *POLICY, DRY_RUN_STATE="READY", DRY_RUN_WORKER_STATUS=status)
    assert out.returncode != 0 and "another run (12345 on w0)" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["rlhf_jax.train_policy"], "needs --workdir"),
        (["rlhf_jax.train_policy", "--workdir=/tmp/x"], "must be in GCS"),
    ],
)
def test_babysit_needs_a_gcs_workdir(sb, args, message):
    out = sb.run("babysit.sh", *args)
    assert out.returncode != 0 and message in out.stderr


# --- the scripts themselves ----------------------------------------------------------------


def test_scripts_parse():
    for script in sorted(LAUNCH.glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_are_shellcheck_clean():
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    out = subprocess.run(
        ["shellcheck", "-x", "--severity=warning", *scripts], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout


# --- for real, against a fake gcloud and fake workers ---------------------------------------

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A stand-in for gcloud: VM state in $FAKE/state, workers are $FAKE/w0 .. w{N-1}.
set -euo pipefail
printf '%s\n' "$*" >>"$FAKE/calls"
group=$3 verb=$4
worker=0 command="" positional=()
for arg in "${@:5}"; do
  case "$arg" in
    --worker=*) worker=${arg#--worker=} ;;
    --command=*) command=${arg#--command=} ;;
    --*) ;;
    *) positional+=("$arg") ;;
  esac
done
workers() {
  if [[ $worker == all ]]; then seq 0 $((${FAKE_WORKERS:-1} - 1)); else echo "$worker"; fi
}
ready=READY; [[ $group == queued-resources ]] && ready=ACTIVE
case "$verb" in
  describe)
    state=$(cat "$FAKE/state")
    if [[ $state == NOT_FOUND ]]; then echo "ERROR: NOT_FOUND: resource not found" >&2; exit 1; fi
    echo "$state" ;;
  create)
    failures=$(cat "$FAKE/create_failures" 2>/dev/null || echo 0)
    if ((failures > 0)); then
      echo $((failures - 1)) >"$FAKE/create_failures"
      echo "ERROR: there is no more capacity in the zone" >&2; exit 1
    fi
    echo "$ready" >"$FAKE/state"
    for w in $(seq 0 $((${FAKE_WORKERS:-1} - 1))); do mkdir -p "$FAKE/w$w"; done ;;
  delete)
    # The VM goes away with its processes, and a new one starts with an empty disk.
    # Waiting for the run's lock stands in for the processes being killed.
    for w in $(seq 0 $((${FAKE_WORKERS:-1} - 1))); do
      lock="$FAKE/w$w/rlhf_jax_logs/run.lock"
      if [[ -e $lock ]]; then flock -w 10 "$lock" true; fi
      rm -rf "$FAKE/w$w"
    done
    echo NOT_FOUND >"$FAKE/state" ;;
  ssh)
    for w in $(workers); do
      (cd "$FAKE/w$w" && HOME="$FAKE/w$w" FAKE_WORKER=$w bash -c "$command")
    done ;;
  scp)
    for w in $(workers); do cp "${positional[0]}" "$FAKE/w$w/${positional[1]#*:}"; done ;;
esac
"""

FAKE_PYTHON = r"""#!/usr/bin/env bash
# A stand-in for python: venv creation, pip, and a few programs.
set -euo pipefail
[[ $1 == -c ]] && exit 0
[[ $1 == -m ]] || exit 99
mod=$2
shift 2
case "$mod" in
  venv) mkdir -p "${*: -1}/bin" && cp "$0" "${*: -1}/bin/python" ;;
  pip) ;;
  fake_ok)
    args=$(printf ' [%s]' "$@")
    echo "fake_ok RLHF_JAX_DISTRIBUTED=${RLHF_JAX_DISTRIBUTED:-} cwd=$PWD args:$args" ;;
  fake_fail) echo "fake_fail"; exit 3 ;;
  fake_preempt_once)
    if [[ ! -e "$FAKE/preempted-$FAKE_WORKER" ]]; then
      touch "$FAKE/preempted-$FAKE_WORKER"
      echo PREEMPTED >"$FAKE/state"
      echo "fake_preempt_once: preempted"; exit 1
    fi
    echo "fake_preempt_once: finished" ;;
  fake_sleep)
    trap 'echo "fake_sleep: saving checkpoint"; kill "$s"; exit 42' TERM
    sleep 30 & s=$!
    echo started >"$FAKE/sleep_started"
    wait "$s" ;;
  *) echo "no module named $mod" >&2; exit 1 ;;
esac
"""


needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("git", "flock", "setsid", "nohup")),
    reason="needs git, flock, setsid and nohup",
)


def make_exe(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake(sb):
    """A fake gcloud and python; returns (sandbox, fake dir, env overrides)."""
    fake_dir = sb.tmp / "fake"
    fake_dir.mkdir()
    (fake_dir / "state").write_text("NOT_FOUND\n")
    make_exe(sb.bin / "gcloud", FAKE_GCLOUD)
    python = make_exe(sb.tmp / "python3", FAKE_PYTHON)
    env = {
        "DRY_RUN": "0",
        "FAKE": str(fake_dir),
        "PYTHON": str(python),
        "RETRY_SECONDS": "0",
        "POLL_SECONDS": "0.1",
    }
    return sb, fake_dir, env


def calls(fake_dir, *words):
    lines = (fake_dir / "calls").read_text().splitlines()
    return [line for line in lines if all(w in line.split() for w in words)]


def test_create_retries_when_the_zone_has_no_capacity(fake):
    sb, fake_dir, env = fake
    (fake_dir / "create_failures").write_text("2\n")
    out = sb.ok("create_tpu.sh", CREATE_RETRIES="3", **env)
    assert len(calls(fake_dir, "create")) == 3
    assert (fake_dir / "state").read_text().strip() == "READY"
    assert "create attempt 2/3 failed" in out.stderr


def test_create_gives_up_after_create_retries(fake):
    sb, fake_dir, env = fake
    (fake_dir / "create_failures").write_text("5\n")
    out = sb.run("create_tpu.sh", CREATE_RETRIES="2", **env)
    assert out.returncode != 0 and "could not create rlhf-test after 2 attempts" in out.stderr
    assert len(calls(fake_dir, "create")) == 2


def worker_run(sb, fake_dir, *args, **env):
    """Runs launch/run_tpu.sh as a worker would, with the fake python."""
    home = fake_dir / "w0"
    home.mkdir(exist_ok=True)
    return sb.run("run_tpu.sh", *args, HOME=str(home), FAKE_WORKER="0", **env)


def worker_status(sb, fake_dir, env):
    out = sb.ok("worker_ctl.sh", "status", HOME=str(fake_dir / "w0"), **env)
    return out.stdout.strip()


@needs_tools
def test_run_tpu_installs_runs_and_records_the_exit_status(fake):
    sb, fake_dir, env = fake
    args = ["fake_ok", "--workdir", "gs://b/r x"]
    out = worker_run(sb, fake_dir, *args, RLHF_JAX_RUN_ID="r1", **env)
    assert out.returncode == 0, out.stdout + out.stderr
    logs = fake_dir / "w0" / "rlhf_jax_logs"
    log = (logs / "run.log").read_text()
    assert f"RLHF_JAX_DISTRIBUTED=1 cwd={REPO} args: [--workdir] [gs://b/r x]" in log
    assert (fake_dir / "w0" / "rlhf_jax_venv" / ".rlhf_jax_install_stamp").exists()
    assert worker_status(sb, fake_dir, env).endswith("run=r1 state=exit=0")
    # A second run reuses the venv and records its own, failing, status.
    out = worker_run(sb, fake_dir, "fake_fail", RLHF_JAX_RUN_ID="r2", **env)
    assert out.returncode == 3
    assert "is up to date" in (logs / "run.log").read_text()
    assert worker_status(sb, fake_dir, env).endswith("run=r2 state=exit=3")


@needs_tools
def test_one_run_per_worker_and_stop_lets_it_checkpoint(fake):
    sb, fake_dir, env = fake
    home = fake_dir / "w0"
    home.mkdir()
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "run_tpu.sh"), "fake_sleep"],
        env=sb.env(HOME=str(home), FAKE_WORKER="0", RLHF_JAX_RUN_ID="long", **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not (fake_dir / "sleep_started").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert worker_status(sb, fake_dir, env).endswith("run=long state=running")
        second = worker_run(sb, fake_dir, "fake_ok", **env)
        assert second.returncode == 75 and "another run" in second.stderr
        out = sb.ok("worker_ctl.sh", "stop", HOME=str(home), **env)
        assert "sent SIGTERM" in out.stdout
        assert proc.wait(timeout=10) == 42
    finally:
        if proc.poll() is None:
            proc.kill()
    assert worker_status(sb, fake_dir, env).endswith("run=long state=exit=42")
    assert "fake_sleep: saving checkpoint" in (home / "rlhf_jax_logs" / "run.log").read_text()


@pytest.fixture
def repo_copy(tmp_path):
    """A one-commit git repository holding launch/, as sync_code.sh ships from git."""
    repo = tmp_path / "repo"
    shutil.copytree(LAUNCH, repo / "launch", ignore=shutil.ignore_patterns("env.sh", "env.*.sh"))
    shutil.copy(LAUNCH / "env.example.sh", repo / "launch" / "env.example.sh")
    (repo / "setup.py").write_text("# stands in for the project's packaging file\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "launch scripts"], check=True)
    return repo


def babysit(sb, repo, env, *args, **more):
    return sb.run(
        "babysit.sh", *args, launch_dir=repo / "launch", COMMIT="", FAKE_WORKERS="2", **env, **more
    )


@needs_tools
def test_babysit_relaunches_after_preemption_until_the_run_finishes(fake, repo_copy):
    sb, fake_dir, env = fake
    out = babysit(sb, repo_copy, env, "fake_preempt_once", "--workdir", "gs://b/runs/p")
    assert out.returncode == 0, out.stderr
    assert "finished on all workers" in out.stderr
    assert len(calls(fake_dir, "delete")) >= 1
    assert len(calls(fake_dir, "create")) == len(calls(fake_dir, "delete")) + 1
    for w in ("w0", "w1"):
        log = (fake_dir / w / "rlhf_jax_logs" / "run.log").read_text()
        assert "fake_preempt_once: finished" in log
        head = subprocess.run(
            ["git", "-C", str(repo_copy), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert (fake_dir / w / "rlhf_jax" / ".rlhf_jax_commit").read_text().strip() == head


@needs_tools
def test_babysit_gives_up_after_max_retries(fake, repo_copy):
    sb, fake_dir, env = fake
    (fake_dir / "state").write_text("READY\n")
    for w in ("w0", "w1"):
        (fake_dir / w).mkdir()
    out = babysit(sb, repo_copy, env, "fake_fail", "--workdir=gs://b/runs/f", MAX_RETRIES="1")
    assert out.returncode == 1
    assert "giving up: launched 2 times" in out.stderr and "MAX_RETRIES=1" in out.stderr
    launches = [c for c in calls(fake_dir, "ssh") if "launch/run_tpu.sh" in c]
    assert len(launches) == 2
    assert not calls(fake_dir, "delete")

