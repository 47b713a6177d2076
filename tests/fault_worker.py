"""Runs an entry point (`python -m <module> ...`) with a fault armed, for tests/test_faults.py.

  python tests/fault_worker.py <fault> <module> [args...]

Faults (the process kills itself with SIGKILL, as `kill -9` or a lost VM would):
  kill_on_commit:N   when orbax renames its N-th temporary checkpoint directory into place: a
                     save in progress, every file written and nothing committed;
  kill_after_step:N  right after the metrics row of step N reached the file, once a checkpoint
                     is committed (saves are asynchronous), so that there is one to resume;
  kill_on_replace:NAME  when an atomic write is about to move its finished temporary file onto
                     a file called NAME (a label export in progress).
"""

import os
import re
import runpy
import signal
import sys
import time


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    if kind == "kill_on_commit":
        count, rename = [0], os.rename

        def fatal_rename(src, dst, *a, **kw):
            # The step directory's rename is the commit ("4.orbax-checkpoint-tmp" -> "4");
            # item directories inside it are renamed before.
            if re.fullmatch(r"\d+\.orbax-checkpoint-tmp.*", os.path.basename(os.fspath(src))):
                count[0] += 1
                if count[0] == int(arg):
                    _die()
            return rename(src, dst, *a, **kw)

        os.rename = fatal_rename
    elif kind == "kill_after_step":
        from rlhf_jax import metrics

        write = metrics.MetricWriter.write

        def fatal_write(self, step, values, *a, **kw):
            write(self, step, values, *a, **kw)
            if step == int(arg):
                self.flush()
                ckpt = os.path.join(self._workdir, "checkpoints")
                deadline = time.time() + 120
                while time.time() < deadline and not any(
                        name.isdigit() for name in os.listdir(ckpt)):
                    time.sleep(0.05)
                _die()

        metrics.MetricWriter.write = fatal_write
    elif kind == "kill_on_replace":
        replace = os.replace

        def fatal_replace(src, dst, *a, **kw):
            if os.path.basename(os.fspath(dst)) == arg:
                _die()
            return replace(src, dst, *a, **kw)

        os.replace = fatal_replace
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    fault, module, *args = sys.argv[1:]
    arm(fault)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
