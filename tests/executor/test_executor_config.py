"""The executor section and `--ray` without Ray: errors name the key and exit 2."""
from __future__ import annotations

import sys

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import main
from compress.config import ConfigError, parse_config
from compress.executor.ray_run import check_fits
from tiny_models import run_config


@pytest.mark.parametrize("section,message", [
    ({"kind": "ray", "max_retries": -1}, "executor.max_retries: Input should be greater than or equal to 0"),
    ({"kind": "local", "address": "auto"}, "executor.address: Value error, applies to executor.kind: ray only"),
    ({"kind": "ray", "retries": 2}, "executor.retries: unknown key"),
    ({"kind": "k8s"}, "executor.kind: Input should be 'local' or 'ray'"),
    ({"kind": "ray", "threads": 0}, "executor.threads: Input should be greater than or equal to 1"),
])
def test_executor_errors_name_the_key(section, message):
    with pytest.raises(ConfigError) as e:
        parse_config({"model": {"source": "x"}, "executor": section})
    assert str(e.value) == message


def test_ray_flag_without_ray_exits_2_saying_what_to_install(model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(run_config(model_dir("llama"), text_file, tmp_path / "out")))
    got = CliRunner().invoke(main, ["compare", str(path), "--ray", "auto"])
    assert got.exit_code == 2
    assert "--ray:" in got.output and "pip install 'compress[ray]'" in got.output
    got = CliRunner().invoke(main, ["compare", str(path), "--set", "executor.kind=ray"])
    assert got.exit_code == 2 and "executor.kind:" in got.output and "compress[ray]" in got.output
    assert not (tmp_path / "out").exists()


def test_a_task_no_node_can_hold_is_refused_naming_the_key():
    nodes = [{"CPU": 2.0, "memory": 4 * 2**30}, {"CPU": 8.0, "memory": 2**30}]
    check_fits(nodes, {"num_cpus": 2, "num_gpus": 0, "memory": 3 * 2**30}, "a")  # the first node
    with pytest.raises(ConfigError, match=r"^executor.threads: candidate a asks for 16 CPU.*largest has 8"):
        check_fits(nodes, {"num_cpus": 16, "num_gpus": 0, "memory": 2**30}, "a")
    with pytest.raises(ConfigError, match=r"^executor.gpus: "):
        check_fits(nodes, {"num_cpus": 1, "num_gpus": 1, "memory": 2**30}, "a")
    with pytest.raises(ConfigError, match=r"^executor: candidate a asks for 8 CPU, 0 GPU and 3.00 GiB together"):
        check_fits(nodes, {"num_cpus": 8, "num_gpus": 0, "memory": 3 * 2**30}, "a")
