"""The suite's compile gate (tests/test_aot.py) compiled in a background process from the start of the session.

Its ~1,600 compilations (every shipped config for sm_80 and sm_90) take minutes of CPU, while the interpreter's
tests run on one core: tests/conftest.py starts them here, at low priority, as soon as the session has collected
a test that reads them, and orders those tests last, so the compilations use the cores the other tests leave idle
instead of adding their time to the suite's. The process runs without TRITON_INTERPRET (its workers compile for
the GPU) and writes its results to a file the ``gate_results`` fixture reads; a failure says why, with the log.

    python tests/compile_gate.py OUT.pickle JOBS      # what the session starts
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile


def reads_sass(case, arch: int) -> bool:
    """The compilations whose SASS the gate's tests read: sm_90's fp16 / bf16 matrix-multiplying kernels (wgmma,
    TMA, hot loops). Token merging's kernels aside: the matching computes its similarities in IEEE fp32 from the
    keys (the reference's numbers, so the same pairs), on FMA units by design; the others multiply no matrices.
    nvdisasm is most of a cached compilation's time, so the rest is not read (`vivit-kernels compile-report` reads
    all)."""
    return arch == 90 and case.label.startswith(("fp16", "bf16")) and not case.kernel.startswith(
        ("_layer_norm", "_attn_bwd_preprocess")) and not case.module.endswith(".token_merge")


class BackgroundGate:
    """The gate's compilations running in a process of their own (niced), until :meth:`results` collects them."""

    def __init__(self, jobs: int):
        self.dir = tempfile.mkdtemp(prefix="vivit-kernels-gate-")
        self.out = os.path.join(self.dir, "results.pickle")
        self.log_path = os.path.join(self.dir, "log")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.out, str(jobs)], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, preexec_fn=_lower_priority)
        self._results = None

    def results(self) -> list:
        """Wait for the compilations; their AotResults, or an error with the process's log."""
        if self._results is None:
            code = self.proc.wait()
            if code != 0 or not os.path.exists(self.out):
                with open(self.log_path) as f:
                    log = f.read()
                raise RuntimeError(f"the compile gate's process exited with {code}:\n{log[-4000:]}")
            with open(self.out, "rb") as f:
                self._results = pickle.load(f)
        return self._results

    def stop(self) -> None:
        """End the process and its workers if the session ends first (an interrupted or filtered run)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def _lower_priority() -> None:
    """In the child before it runs: a process group of its own (stop() ends it with its workers) in the session's
    own scheduling group (a new session would get a new autogroup, with a CPU share equal to the tests', whatever
    its nice value), at low priority: the tests in the foreground first, the compilations take what they leave."""
    os.setpgid(0, 0)
    os.nice(19)


def main(out: str, jobs: int) -> None:
    from vivit_kernels.tools import aot

    results = aot.run(aot.collect_cases(), archs=(80, 90), jobs=jobs, progress=False, sass=reads_sass)
    with open(out + ".partial", "wb") as f:
        pickle.dump(results, f)
    os.replace(out + ".partial", out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
