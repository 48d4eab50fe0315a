"""A member trained by two gloo processes (evo_sft.sft.data_parallel: the base sharded with FSDP2,
the adapter whole on each) against the same member trained alone in this process: the same
loss, gradients and adapter after three steps."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from evo_sft.io import storage
from tests.helpers.data_parallel_member import STEPS, train
from tests.helpers.paths import REPO
from tests.helpers.processes import subprocess_env

pytestmark = pytest.mark.integration  # starts two processes: ~15 s on two shared cores


def test_two_processes_train_a_member_as_one_process_does(tmp_path):
    init_method = f"file://{tmp_path / 'rendezvous'}"
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.helpers.data_parallel_member", str(rank), "2",
                               init_method, str(tmp_path)], cwd=REPO, env=subprocess_env(PYTHONPATH=str(REPO)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    for rank in ranks:
        output, _ = rank.communicate(timeout=240)
        assert rank.returncode == 0, output.decode()[-3000:]
    alone_losses, alone, _ = train()

    reports = [storage.load_json(tmp_path / f"rank{rank}.json") for rank in range(2)]
    for weight, (held, whole) in reports[0]["rows"].items():  # each rank holds its half of the base's weights
        assert held + reports[1]["rows"][weight][0] == whole and held < whole, weight
    for rank, report in enumerate(reports):
        tensors = load_file(tmp_path / f"rank{rank}.safetensors")
        assert report["losses"] == pytest.approx(alone_losses, rel=1e-5, abs=1e-6)
        assert tensors.keys() == alone.keys()
        for name, expected in alone.items():
            torch.testing.assert_close(tensors[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert len(alone_losses) == STEPS and len(set(alone_losses)) == STEPS  # three steps on different batches
    final = [name for name in alone if name.startswith("final/")]
    lm_head = [name for name in final if "lm_head" in name and "lora_B" in name]
    assert lm_head and all(alone[name].abs().max() > 0 for name in lm_head)  # the adapter moved from B = 0
