"""Exported HF models and PEFT adapters get the user's umask (mkdtemp and safetensors make 0700/0600)."""
import os
import stat

import pytest

from lib import files
from models import hf, llama, lora, peft
from runners import convert

TINY = llama.PRESETS["tiny"]


@pytest.fixture(params=[0o027, 0o002], ids=["umask 027", "umask 002"])
def user_umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root):
    """{relative path: permission bits} of `root` and everything under it."""
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


def test_umask_is_read_without_changing_it(user_umask):
    assert files.umask() == user_umask
    assert os.umask(user_umask) == user_umask  # still in place


def test_hf_peft_and_merged_outputs_follow_the_umask(tmp_path, user_umask):
    file_mode, dir_mode = 0o666 & ~user_umask, 0o777 & ~user_umask
    hf.save(tmp_path / "base", TINY, llama.init(TINY, seed=0), max_shard_bytes=200_000)  # sharded
    lcfg = lora.LoraConfig(r=2, alpha=4.0, target_modules=("q", "v"))
    peft.save(tmp_path / "adapter", lcfg, lora.init_adapters(TINY, lcfg, seed=0))
    with pytest.raises(SystemExit) as exit_info:
        convert.cli.run(convert.main, ["merge-lora", "--base", str(tmp_path / "base"), "--lora",
                                       str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")])
    assert exit_info.value.code == 0
    for name in ("base", "adapter", "merged"):
        found = modes(tmp_path / name)
        assert sum(p.endswith(".safetensors") for p in found) >= 1
        expected = {p: dir_mode if os.path.isdir(tmp_path / name / p) else file_mode for p in found}
        assert found == expected, name
